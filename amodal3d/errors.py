"""The errors a user can fix: bad config, bad data, bad input files, a checkpoint that is
missing or not what was asked for. The CLI prints one of these as one line (what is
wrong, which file, key or value, what to do) and exits 2; any other exception is a bug
and keeps its traceback. `--traceback` (or AMODAL3D_TRACEBACK=1) shows both."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by what the user gave."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema or the stage."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be read, or is not of the stage it should be."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """A checkpoint (or a finished run of a stage) that does not exist."""


class DatasetError(UserError, RuntimeError):
    """A dataset folder, or the object source it is built from, that cannot be read as it should."""


class InputError(UserError, ValueError):
    """A bad input file or entry of `predict`; its message names it."""
