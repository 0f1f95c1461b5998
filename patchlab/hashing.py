"""Digests of files' bytes (image files and weights files in cache keys), remembered within
the process.

A digest is remembered per (path, size, mtime, ctime, algorithm): any write to a file changes
its ctime, which no tool can set back, so a remembered digest is never stale, and a key that
names thousands of images (or a 100 MB weights file) is hashed once per process.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

ALGORITHMS = {
    "blake2b-128": lambda: hashlib.blake2b(digest_size=16),  # 0.45 s for 51 MB of tiles
    "sha256": hashlib.sha256,
}


def file_digest(path: str | Path, algorithm: str = "blake2b-128") -> str:
    """Hex digest of the bytes of ``path`` (one of :data:`ALGORITHMS`)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r} is unknown; choose one of {list(ALGORITHMS)}")
    st = os.stat(path)
    resolved = str(Path(path).resolve())
    return _digest(resolved, st.st_size, st.st_mtime_ns, st.st_ctime_ns, algorithm)


@functools.lru_cache(maxsize=1 << 16)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, algorithm: str) -> str:
    digest = ALGORITHMS[algorithm]()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
