"""Writing so that a reader, or a kill, never sees half of a file or of a set of files.

The one way patchlab replaces what it writes (cache entries, a run's folder, a report):

- :func:`atomic_file`: a file written as a temporary file in the same folder, then renamed
  over its path (a rename within a file system is atomic).
- :func:`atomic_folder`: a folder written as a temporary folder beside it, then put in place
  whole (:func:`replace_folder`); :func:`clean_leftovers` repairs what a kill between its two
  renames leaves.

Both give the files the permissions the umask allows, as ``open`` and ``mkdir`` would (the
``tempfile`` functions they use make private files and folders; a shared cache is not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

TMP_SUFFIX = ".tmp"  # a file being written (patchlab.cache removes orphans of killed writes)


def current_umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def writable(folder: Path) -> OSError | None:
    """Create ``folder`` if needed and probe it with a temporary file: None when it can be
    written, else the error (for a message that names the folder and says what to do)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
            pass
    except OSError as err:
        return err
    return None


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """An open binary file that becomes ``path`` when the block ends without an error; on an
    error (or a kill) ``path`` is left as it was and the temporary file is removed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=TMP_SUFFIX)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """A new empty folder beside ``path`` that replaces ``path`` as a whole when the block ends
    without an error (:func:`replace_folder`); on an error it is removed, ``path`` untouched."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    os.chmod(tmp, 0o777 & ~current_umask())
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path``: the old folder moved aside whole
    (``.<name>.old-*/run``), ``new`` renamed in, the old one removed. A kill between the two
    renames leaves the old folder aside, where :func:`clean_leftovers` finds it."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
        os.replace(path, old / "run")
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_leftovers(path: Path) -> None:
    """Remove what killed :func:`atomic_folder` writes left beside ``path``; if ``path`` is
    gone, put back the old folder a kill left aside. Call it where only one writer runs."""
    for left in sorted(path.parent.glob(f".{path.name}.old-*")):
        if not path.exists() and (left / "run").is_dir():
            os.replace(left / "run", path)
        shutil.rmtree(left, ignore_errors=True)
    for left in path.parent.glob(f".{path.name}.new-*"):
        shutil.rmtree(left, ignore_errors=True)
