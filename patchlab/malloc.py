"""glibc's malloc thresholds for the backbone's buffers (a process setting, not the library's).

With glibc's defaults (a dynamic mmap threshold) many convolution buffers are fresh mmaps,
page-faulted on every batch. Measured (Lite0, 64 demo images, 2 threads): 33-37 ms/image by
default, 22-26 ms with these; a process keeps at most 256 MiB of freed heap. The CLI sets them
for itself (:func:`tune_malloc`); Dask workers get them as environment variables
(:mod:`patchlab.distributed`); a notebook kernel gets them when exported before `jupyter lab`.
"""

from __future__ import annotations

MALLOC_TRIM_THRESHOLD = 256 << 20
MALLOC_MMAP_THRESHOLD = 32 << 20


def tune_malloc() -> bool:
    """Set :data:`MALLOC_TRIM_THRESHOLD` and :data:`MALLOC_MMAP_THRESHOLD` in this process
    (glibc's ``mallopt``); False where the C library is not glibc. Process-wide: the CLI calls
    it, the library never does on its own."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_trim_threshold, MALLOC_TRIM_THRESHOLD)) and bool(
        mallopt(m_mmap_threshold, MALLOC_MMAP_THRESHOLD)
    )
