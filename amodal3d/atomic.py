"""Atomic file writes: a reader (the bench, a resumed run, a dataset reader) sees the
old file or the new one, never half of one. Write to a temporary name in the same
folder, optionally fsync, then rename over the target."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None], durable: bool = False) -> Path:
    """Call write(tmp) for a temporary sibling of `path`, then rename it over `path`.
    durable: fsync the file and its folder (datasets; a crash must not lose the rename)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")  # a killed process leaves at most this (builds clean *.tmp)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)  # an error, not a kill: leave nothing behind
        raise
    if durable:
        _fsync_dir(out.parent)
    return out


def write_text_atomic(path: str | os.PathLike, text: str, durable: bool = False) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text), durable)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2, durable: bool = False) -> Path:
    """JSON with sorted keys (values JSON cannot hold are written as strings)."""
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    return write_text_atomic(path, text, durable)


def save_png_atomic(image, path: str | os.PathLike) -> Path:
    """A PIL image as PNG."""
    return replace_atomically(path, lambda tmp: image.save(tmp, format="PNG"))
