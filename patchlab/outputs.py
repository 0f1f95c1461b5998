"""A run's outputs on disk: ``metrics.json``, ``image_scores.csv`` and ``maps.npz``, as one set.

The three files are written into a temporary folder beside ``out`` and the folder is then
renamed into place; an older run's folder is moved aside first and removed last. Killing the
process at any moment leaves either the old set or the new one under ``out`` (never files from
two runs), and the next run cleans up what a killed one left beside it.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

import numpy as np

from patchlab.atomic import atomic_folder, clean_leftovers, writable
from patchlab.experiment import Result
from patchlab.report import REPORT_LEFTOVER

OUTPUT_FILES = ("metrics.json", "image_scores.csv", "maps.npz", "report.html", "overlays", "bank")
# what killed writes inside a run folder leave (a report's, a folder's atomic replacement):
# the next save removes them (_clean_leftovers), so they are not "other files"
LEFTOVERS = (REPORT_LEFTOVER, ".overlays.", ".bank.")
_HELD: dict[Path, int] = {}  # the --out folders whose lock this process holds


@contextmanager
def out_lock(out: str | Path) -> Iterator[None]:
    """One run per ``out`` at a time: an exclusive lock on ``.<name>.lock`` beside it, held
    from before the work to the last rename (the kernel drops it when the process ends, killed
    too). Re-entrant within a process; ``out`` is checked by the caller (:func:`check_out`).

    Raises
    ------
    ValueError
        When another process holds it, naming ``out``: before any work, never after it.
    """
    out = Path(out).absolute()
    if out in _HELD or fcntl is None:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)  # callers have checked out (check_out)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(
            f"another patchlab run is writing to --out {out}; wait for it to finish or choose "
            "another folder"
        ) from None
    _HELD[out] = fd
    try:
        yield
    finally:
        del _HELD[out]
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def check_out(out: str | Path) -> Path:
    """``out`` as a Path once it is known to be usable, before any work is done.

    It must be a folder (or not exist yet) whose parent can be created and written, holding
    no files but a previous run's outputs (they are replaced as a set).

    Raises
    ------
    ValueError
        Naming ``out`` and what to do.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder path")
    for parent in out.parents:  # a path inside a file
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file; choose a folder path")
    if out.is_dir():
        foreign = sorted(
            p.name
            for p in out.iterdir()
            if p.name not in OUTPUT_FILES and not p.name.startswith(LEFTOVERS)
        )
        if foreign:
            raise ValueError(
                f"--out {out} holds other files ({', '.join(foreign[:3])}); a run replaces its "
                "folder as a whole: choose an empty or new folder"
            )
    err = writable(out.parent)
    if err is not None:
        raise ValueError(
            f"--out {out} cannot be written ({err.strerror or err}); choose another folder"
        ) from err
    return out


def save_result(
    result: Result,
    out: str | Path,
    report: bool = False,
    progress: bool = False,
    bank: Callable[[Result, Path], object] | None = None,
) -> Path:
    """Write ``metrics.json``, ``image_scores.csv`` and ``maps.npz`` (and, with ``report``,
    ``report.html`` and ``overlays/``, :mod:`patchlab.report`) into ``out``, as one set.

    A report of the run replaced is not dropped: it is drawn again for the new run (with a
    warning saying so), so ``out`` never holds a report of other results, nor loses one.
    ``bank(result, folder)`` writes the memory bank into ``out/bank`` within the same set
    (:func:`patchlab.saved.save_bank`, ``--save-bank``)."""
    out = check_out(out)  # at save time: the folder may have changed during the run
    with out_lock(out):
        return _save(result, out, report, progress, bank)


def _save(result: Result, out: Path, report: bool, progress: bool, bank=None) -> Path:
    """:func:`save_result` with the lock held."""
    _clean_leftovers(out)  # only this process writes beside out now
    if not report and (out / "report.html").is_file():
        warnings.warn(
            f"{out} held a report of the run it replaces: drawing it again for this run",
            stacklevel=3,
        )
        report = True
    if bank is None and (out / "bank").is_dir():
        warnings.warn(
            f"{out} held the saved bank of the run it replaces: it goes with that run (pass "
            "--save-bank to save this run's)",
            stacklevel=3,
        )
    with atomic_folder(out) as tmp:  # the new set written beside, then put in place whole
        arrays, record = _write(result, tmp)
        if report:
            from patchlab.report import write_report

            write_report(tmp, arrays, record, progress)
        if bank is not None:
            bank(result, tmp / "bank")
    return out


def _clean_leftovers(out: Path) -> None:
    """Remove what killed saves left beside ``out``; put back an old set if ``out`` is gone."""
    clean_leftovers(out)  # killed between the two renames: the old set put back
    if out.is_dir():
        clean_leftovers(out / "overlays")  # a killed `patchlab report`'s
        clean_leftovers(out / "bank")
    for left in out.glob(f"{REPORT_LEFTOVER}*") if out.is_dir() else ():
        shutil.rmtree(left, ignore_errors=True)  # a killed `patchlab report`'s folder


def _write(result: Result, folder: Path) -> tuple[dict, dict]:
    """The three files; returns the arrays of ``maps.npz`` and the ``metrics.json`` record."""
    from patchlab.images import load_display
    from patchlab.report import N_SHOW

    record = {**result.metrics, "config": result.config.to_dict()}
    (folder / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    order = np.argsort(-result.image_scores, kind="stable")
    labels = result.images.labels  # 1 defective, 0 good; -1 unknown: an empty cell
    with open(folder / "image_scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "score"])
        for i in order:
            label = "" if labels[i] < 0 else int(labels[i])
            writer.writerow([str(result.images.paths[i]), label, f"{result.image_scores[i]:.6g}"])
    config = result.config
    shown = order[:N_SHOW]
    arrays = dict(
        maps=result.maps.astype(np.float32),
        masks=result.masks.astype(np.uint8),
        labels=result.images.labels,
        image_scores=result.image_scores,
        paths=np.array([str(p) for p in result.images.paths]),
        # the most anomalous images as the model saw them: a report needs no data folder
        shown=shown,
        shown_images=np.stack(
            [load_display(result.images.paths[i], config.resize, config.crop) for i in shown]
        ),
    )
    np.savez_compressed(folder / "maps.npz", **arrays)
    return arrays, record
