"""Shared test setup: repo root importable, quiet HDF5 locking, few CPU threads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
