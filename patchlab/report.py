"""Pictures of a run for people without a notebook: ``report.html`` and PNG overlays.

    patchlab run DATA --category C --report --out runs/C      # with the run
    patchlab report runs/C                                    # later, from its files

``report.html`` is self-contained (plotly.js inline: it opens offline): the run's settings and
metrics, the most anomalous images under their anomaly maps with the ground-truth outline, and
where labels exist the image ROC, the pixel ROC and the PRO curve.
``overlays/NN_<folder>_<image>.png`` are the same images as plain PNGs: the image, its map
blended over it in the Inferno colours, the mask outline in cyan. Everything is drawn from the
run's ``maps.npz`` and ``metrics.json`` (which keep the shown images), so a report needs
neither the data nor the cache.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from patchlab.atomic import clean_leftovers, replace_folder
from patchlab.metrics import format_metric, pixel_roc_curve, pro_curve, roc_curve
from patchlab.viz import image_name, map_range, overlay_image

REPORT_LEFTOVER = ".report-"  # the prefix of a report drawn beside a run (a killed one's stays)

N_SHOW = 8  # images in the report and its overlays, most anomalous first


def write_report(
    folder: str | Path, maps: dict, metrics: dict, progress: bool = True
) -> list[Path]:
    """``report.html`` and ``overlays/*.png`` into ``folder``.

    Parameters
    ----------
    folder : the run's output folder (or a temporary one that becomes it)
    maps : the arrays of ``maps.npz``: ``maps`` (n, S, S), ``masks``, ``labels``,
        ``image_scores``, ``paths``, and ``shown`` (indices of the most anomalous images)
        with ``shown_images`` (their pictures as the model saw them, (m, S, S, 3) uint8)
    metrics : the record of ``metrics.json`` (metrics and ``config``)

    Returns
    -------
    The written files.
    """
    folder = Path(folder)
    shown = np.asarray(maps["shown"])
    pictures = np.asarray(maps["shown_images"])
    names = [image_name(maps["paths"][i]).rsplit(".", 1)[0].replace("/", "_") for i in shown]
    written = []
    (folder / "overlays").mkdir(exist_ok=True)
    bar = tqdm(total=len(shown) + 1, desc="report", unit="file", disable=not progress)
    zrange = map_range(maps["maps"])  # one colour scale for the set, as the widgets
    for rank, (i, picture) in enumerate(zip(shown, pictures, strict=True)):
        path = folder / "overlays" / f"{rank + 1:02d}_{names[rank]}.png"
        Image.fromarray(overlay_image(picture, maps["maps"][i], maps["masks"][i], zrange)).save(
            path
        )
        written.append(path)
        bar.update()
    page = folder / "report.html"
    page.write_text(_html(maps, metrics, shown, pictures))
    written.append(page)
    bar.update()
    bar.close()
    return written


def report_from_folder(folder: str | Path, progress: bool = True) -> list[Path]:
    """:func:`write_report` for a finished run's folder (``patchlab report RUN_DIR``)."""
    folder = Path(folder)
    clean_leftovers(folder / "overlays")  # of a report killed between its renames
    for name in ("maps.npz", "metrics.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} does not exist: pass the --out folder of a patchlab run"
            )
    try:
        with np.load(folder / "maps.npz") as z:
            maps = {key: z[key] for key in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as err:
        # np.load reads what is not a zip archive as a pickle, and refuses it by saying so
        why = "not an .npz archive" if "pickle" in str(err) or not str(err) else str(err)
        raise ValueError(f"{folder / 'maps.npz'} cannot be read ({why}); run again") from None
    missing = {"maps", "masks", "labels", "image_scores", "paths", "shown", "shown_images"}
    if missing - set(maps):
        raise ValueError(
            f"{folder / 'maps.npz'} lacks {', '.join(sorted(missing - set(maps)))} (written by "
            "an older patchlab, or not by patchlab); run the command again"
        )
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{folder / 'metrics.json'} is not valid JSON ({err})") from None
    if not isinstance(metrics, dict) or not isinstance(metrics.get("config", {}), dict):
        raise ValueError(
            f"{folder / 'metrics.json'} holds {type(metrics).__name__}, not a run's metrics "
            "(a JSON object); run the command again"
        )
    shown, n = np.asarray(maps["shown"]), len(np.asarray(maps["paths"]))
    if shown.ndim != 1 or shown.dtype.kind not in "iu" or ((shown < 0) | (shown >= n)).any():
        raise ValueError(
            f"{folder / 'maps.npz'}: 'shown' must index its {n} images; run the command again"
        )
    # drawn beside the run, then moved in: a killed report leaves the old one or none
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=REPORT_LEFTOVER))
    try:
        write_report(tmp, maps, metrics, progress)
        replace_folder(tmp / "overlays", folder / "overlays")  # each put in place whole
        os.replace(tmp / "report.html", folder / "report.html")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [*sorted((folder / "overlays").glob("*.png")), folder / "report.html"]


def _html(maps: dict, metrics: dict, shown: np.ndarray, pictures: np.ndarray) -> str:
    """The page: settings, metrics, the overlay grid, the curves (plotly.js inline once)."""
    import patchlab.viz as viz

    labels = np.asarray(maps["labels"])
    titles = [
        viz.tile_title(r, maps["paths"][i], labels[i], maps["image_scores"][i])
        for r, i in enumerate(shown)
    ]
    figures = [
        viz.overlay_grid(
            list(pictures),
            np.asarray(maps["maps"])[shown],
            titles,
            np.asarray(maps["masks"])[shown],
        )
    ]
    if (labels >= 0).all() and 0 < labels.sum() < len(labels):
        figures.append(viz.roc_figure({"image": roc_curve(labels, maps["image_scores"])}))
    if np.asarray(maps["masks"]).any():
        figures.append(
            viz.roc_figure(
                {"pixel": pixel_roc_curve(maps["masks"], maps["maps"])}, "pixel ROC", "pixel"
            )
        )
        figures.append(viz.pro_figure({"PRO": pro_curve(maps["masks"], maps["maps"])}))
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=(j == 0)) for j, fig in enumerate(figures)
    ]
    config = metrics.get("config", {})
    unlabelled = (labels < 0).all()  # a plain folder: no labels, so no AUROC or PRO to show
    keys = ("n_images", "n_bank", "image_score")
    keys = keys if unlabelled else ("image_auroc", "pixel_auroc", "pro", *keys)
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_fmt(metrics.get(key)))}</td></tr>"
        for key in keys
    )
    where = ("data",) if unlabelled else ("data", "category", "setting")
    settings = ", ".join(
        f"{key}={config.get(key)}" for key in (*where, "method", "k", "backbone", "weights")
    )
    # beyond the paper: shown where they changed the result
    extras = {
        "local_sizes": config.get("local_sizes", [3]) != [3],
        "rscin": bool(config.get("rscin")),
        "top_q": metrics.get("image_score") == "top",
    }
    settings += "".join(f", {key}={config.get(key)}" for key, show in extras.items() if show)
    if unlabelled:
        settings += ". An unlabelled folder: the images ranked by score, no AUROC or PRO"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>patchlab report</title>"
        "<style>body{font-family:sans-serif;margin:1em}th{text-align:left;padding-right:1em}"
        "</style></head><body>"
        f"<h1>patchlab report</h1><p>{html.escape(settings)}</p><table>{rows}</table>"
        f"<h2>The {len(shown)} most anomalous images</h2>"
        + "".join(f"<div>{part}</div>" for part in parts)
        + "</body></html>\n"
    )


def _fmt(value) -> str:
    return format_metric(value) if value is None or isinstance(value, float) else str(value)
