"""The on-disk cache of expensive results (features, neighbour tables).

Files are named by a hash of everything that changes their content, and written atomically
(a temporary file in the same folder, then a rename), so an interrupted run never leaves a
half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np


def default_cache_dir() -> Path:
    """``$PATCHLAB_CACHE`` if set, else ``~/.cache/patchlab``."""
    return Path(os.environ.get("PATCHLAB_CACHE", Path.home() / ".cache" / "patchlab"))


def cache_key(record: dict) -> str:
    """A short stable hash of a JSON-serialisable record."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:24]


def atomic_save(path: Path, **arrays: np.ndarray) -> None:
    """Write one array (``.npy``) or several (``.npz``) through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.suffix == ".npy":
                (array,) = arrays.values()
                np.save(f, array)
            else:
                np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
