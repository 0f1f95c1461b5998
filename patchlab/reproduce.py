"""The paper's tables: every method, setting, K and coreset ratio on an MVTec-layout data set.

    patchlab reproduce DATA --table 2 --out OUT

Every cell is one :func:`patchlab.experiment.run` of its own configuration (:func:`cell_config`),
through the same caches as ``patchlab run``: the features and the widest neighbour table of a
(category, setting) are computed once, and every method and K of the table reuses them.

Every finished cell is appended to ``OUT/table<N>.csv`` at once, and a rerun skips the cells
already there (resume after an interruption). ``OUT/table<N>.md`` holds the markdown table, mean
over categories.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from patchlab.config import PAPER_SETTINGS, RunConfig
from patchlab.data import BLIND_SETTINGS
from patchlab.experiment import run
from patchlab.maps import NEEDS_SUPPORT
from patchlab.metrics import format_metric

METRICS = ("image_auroc", "pixel_auroc", "pro")
SCORE_RULES = ("max", *NEEDS_SUPPORT)  # the paper's image-score rules: columns of the CSV
FIELDS = (
    "table",
    "category",
    "setting",
    "row",
    "method",
    "k",
    "coreset",
    "exclude",
    "k_img",
    *METRICS,
    *(f"image_auroc_{rule}" for rule in SCORE_RULES),
    "negative_weights",
    "seconds",
)


@dataclass(frozen=True)
class Row:
    """One method variant of a table."""

    label: str
    method: str
    k: int = 1
    coreset: float = 1.0
    exclude: str = "self"


# the defaults of `patchlab reproduce`: the paper's backbone, its 256 -> 224 input, its
# locally aware 3 x 3 features and PatchCore's image re-weighting (Eq. 3), whatever the
# defaults of `patchlab run` (chosen on real data, docs/results.md) are
REPRODUCE_DEFAULTS = dict(PAPER_SETTINGS, backbone="wide_resnet50_2", resize=256, crop=224)
# what each cell of a table sets itself (the command offers no option for these)
PER_CELL = ("category", "setting", "bank_setting", "unlabeled", "method", "k", "k_max")
PER_CELL += ("exclude", "coreset")

PAPER_METHODS = (
    Row("PaDiM", "padim"),
    Row("SPADE", "spade"),
    Row("PatchCore-100%", "patchcore", exclude="nearest"),
    Row("PatchCore-25%", "patchcore", coreset=0.25, exclude="nearest"),
    Row("PatchCore+LOF", "patchcore_lof", k=100),
    Row("PatchCluster-25%", "patchcluster", k=25, coreset=0.25),
    Row("PatchCluster-100%", "patchcluster", k=100),
    Row("Mutual (MuSc-style)", "mutual"),
)
TABLES: dict[int, tuple[str, tuple[Row, ...]]] = {
    2: ("methods under the blind settings", PAPER_METHODS),
    3: ("per category, PatchCluster-25%", (Row("PatchCluster-25%", "patchcluster", 25, 0.25),)),
    4: (
        "one-class setting (bank: train/good)",
        (
            Row("PatchCore-100%", "patchcore", exclude="none"),
            Row("PatchCore-25%", "patchcore", coreset=0.25, exclude="none"),
            Row("PatchCluster-25%", "patchcluster", k=25, coreset=0.25, exclude="none"),
            Row("PatchCluster-100%", "patchcluster", k=100, exclude="none"),
        ),
    ),
    5: (
        "PatchCluster-100% against K",
        tuple(Row(f"K={k}", "patchcluster", k=k) for k in (1, 5, 10, 25, 50, 100, 200)),
    ),
    6: (
        "SPADE-Cluster against K",
        tuple(Row(f"K={k}", "spade_cluster", k=k) for k in (1, 5, 10, 25, 50, 100)),
    ),
    7: (
        "coreset ratio with its K",
        tuple(
            Row(f"{r:.0%} (K={k})", "patchcluster", k=k, coreset=r)
            for r, k in ((0.01, 5), (0.1, 10), (0.25, 25), (1.0, 100))
        ),
    ),
}


def categories_of(data: Path) -> list[str | None]:
    """Category folders under ``data`` (None when ``data`` is itself a category)."""
    if (data / "test").is_dir():
        return [None]
    found = sorted(p.name for p in data.iterdir() if (p / "test").is_dir())
    if not found:
        raise FileNotFoundError(
            f"{data} holds no MVTec AD category (a folder with test/ and ground_truth/); the "
            "tables need labelled data: an unlabelled folder cannot be evaluated"
        )
    return found


def reproduce(
    data: str | Path,
    table: int,
    out: str | Path,
    *,
    base: RunConfig | None = None,
    categories: list[str] | None = None,
    settings: tuple[str, ...] = BLIND_SETTINGS,
    progress: bool = True,
) -> Path:
    """Compute table ``table`` and write ``OUT/table<N>.csv`` and ``OUT/table<N>.md``.

    Parameters
    ----------
    data : MVTec AD layout folder (categories, or one category).
    table : one of :data:`TABLES` (2-7).
    base : settings shared by every cell (weights, seed, cache, device, backend, ...); default
        :data:`REPRODUCE_DEFAULTS` (the paper's backbone, input, features and image score).
    categories : default every category under ``data``.
    settings : blind settings to run (tables 3-7 use them too; table 4 is always one-class).
    """
    if table not in TABLES:
        raise ValueError(f"table={table} is unknown; choose one of {sorted(TABLES)}")
    data, out = Path(data), Path(out)
    cats = categories or categories_of(data)
    base = base or RunConfig(data=str(data), **REPRODUCE_DEFAULTS)
    title, rows = TABLES[table]
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"table{table}.csv"
    _check_resume(out / f"table{table}.json", base)
    done = _done_cells(csv_path)
    cell_settings = ("one-class",) if table == 4 else settings
    # largest coreset first: a smaller ratio's greedy picks are a prefix of a larger one's,
    # cut from the cache instead of recomputed (the markdown keeps the table's own row order)
    by_ratio = sorted(rows, key=lambda r: -r.coreset if r.coreset < 1 else -2.0)
    cells = [(c, s, r) for c in cats for s in cell_settings for r in by_ratio]
    bar = tqdm(cells, desc=f"table {table}", unit="cell", disable=not progress)
    for category, setting, row in bar:
        if (category or "", setting, row.label) in done:
            continue
        bar.set_postfix_str(f"{category} {setting} {row.label}")
        t0 = time.perf_counter()
        config = cell_config(base, data, category, setting, row, rows)
        metrics = run(config, progress=False).metrics
        _append(csv_path, _record(table, category, setting, row, metrics, time.perf_counter() - t0))
    (out / f"table{table}.md").write_text(markdown(csv_path, table, title, base.image_score) + "\n")
    return out


def cell_config(
    base: RunConfig,
    data: Path,
    category: str | None,
    setting: str,
    row: Row,
    rows: tuple[Row, ...],
) -> RunConfig:
    """The run of one cell: a method variant on one (category, setting).

    ``setting="one-class"`` (table 4) scores the test images against a bank of train/good
    patches; the blind settings score a set against itself. The neighbour table is made as
    wide as the widest row sharing its bank and exclusion, so it is computed once per table.
    """
    one_class = setting == "one-class"

    # self-kNN: dropping the first neighbour and dropping the query itself remove the same
    # zero distance, so the two tables hold identical distances; 'nearest' reuses 'self' there
    def exclusion(r: Row) -> str:
        if one_class:
            return "none"
        return "self" if (r.exclude, r.coreset) == ("nearest", 1.0) else r.exclude

    same = [r.k for r in rows if (r.coreset, exclusion(r)) == (row.coreset, exclusion(row))]
    return replace(
        base,
        data=str(data),
        category=category,
        setting="test" if one_class else setting,
        bank_setting="train" if one_class else None,
        method=row.method,
        k=row.k,
        k_max=max(same),
        coreset=row.coreset,
        exclude=exclusion(row),
    )


def _record(table, category, setting, row, metrics, seconds) -> dict:
    """One line of the CSV."""
    by_rule = metrics.get("image_auroc_by_score", {})
    return {
        "table": table,
        "category": category,
        "setting": setting,
        "row": row.label,
        "method": row.method,
        "k": row.k,
        "coreset": row.coreset,
        "exclude": row.exclude,
        "k_img": metrics.get("k_img"),
        **{m: metrics[m] for m in METRICS},
        # the image AUROC under every image-score rule (methods without a neighbour
        # table have only the plain maximum: the same value in every column)
        **{
            f"image_auroc_{r}": by_rule.get(r, by_rule.get("max", metrics["image_auroc"]))
            for r in SCORE_RULES
        },
        "negative_weights": metrics["negative_weights"],
        "seconds": round(seconds, 2),
    }


def combine(parts: list[str | Path], table: int, out: str | Path) -> Path:
    """Join the ``table<N>.csv`` of several output folders (e.g. one per blind setting, run
    side by side) into ``OUT/table<N>.csv`` and its markdown. A cell found twice is an error."""
    settings = {(Path(p) / f"table{table}.json").read_text() for p in parts}
    if len(settings) > 1:
        raise ValueError(f"the folders {parts} hold tables computed with different settings")
    rows, seen = [], set()
    for part in parts:
        path = Path(part) / f"table{table}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run `patchlab reproduce` there first")
        with open(path, newline="") as f:
            for record in csv.DictReader(f):
                key = (record["category"], record["setting"], record["row"])
                if key in seen:
                    raise ValueError(f"cell {key} appears in more than one of {parts}")
                seen.add(key)
                rows.append(record)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / f"table{table}.csv"
    csv_path.unlink(missing_ok=True)
    shared = settings.pop()
    (out / f"table{table}.json").write_text(shared)
    for record in rows:
        _append(csv_path, record)
    rule = json.loads(shared)["image_score"]
    (out / f"table{table}.md").write_text(markdown(csv_path, table, TABLES[table][0], rule) + "\n")
    return out


def _check_resume(path: Path, base: RunConfig) -> None:
    """Record the shared settings beside the CSV; refuse to resume a table made with others."""
    missing = "(not recorded)"
    cell_fields = {"data", "category", "setting", "method", "k", "k_max", "coreset", "exclude"}
    # where the cells run changes no result: a table resumes on another device or cluster
    where = {"cache_dir", "device", "backend", "scheduler"}
    shared = {k: v for k, v in base.to_dict().items() if k not in cell_fields | where}
    shared = json.loads(json.dumps(shared))  # as recorded: tuples become lists
    if path.is_file():
        before = {k: v for k, v in json.loads(path.read_text()).items() if k not in where}
        if before != shared:
            diff = {
                k: (before.get(k, missing), shared.get(k, missing))
                for k in sorted(before.keys() | shared.keys())
                if before.get(k, missing) != shared.get(k, missing)
            }
            raise ValueError(
                f"{path.parent} holds a table computed with other settings {diff} "
                "(before, now); use another --out folder or delete it"
            )
    path.write_text(json.dumps(shared, indent=1) + "\n")


def _done_cells(path: Path) -> set[tuple[str, str, str]]:
    if not path.is_file():
        return set()
    with open(path, newline="") as f:
        return {(r["category"], r["setting"], r["row"]) for r in csv.DictReader(f)}


def _append(path: Path, record: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
        f.flush()


def markdown(csv_path: Path, table: int, title: str, image_score: str) -> str:
    """The table in the paper's shape: one line per row label, (setting x metric) columns,
    the mean over categories (table 3: one line per category); then the image AUROC under
    every image-score rule."""
    with open(csv_path, newline="") as f:
        records = list(csv.DictReader(f))
    settings = list(dict.fromkeys(r["setting"] for r in records))
    by = "category" if table == 3 else "row"
    if by == "row":  # the table's own row order, whatever order the cells were computed in
        order = {row.label: i for i, row in enumerate(TABLES[table][1])}
        records.sort(key=lambda r: order.get(r["row"], len(order)))
    labels = list(dict.fromkeys(r[by] for r in records))

    def mean(label: str, setting: str, column: str) -> str:
        vals = [
            float(r[column])
            for r in records
            if r[by] == label
            and r["setting"] == setting
            and r.get(column) not in ("", "None", None)
        ]
        return format_metric(float(np.mean(vals)) if vals else None)

    lines = [
        f"Table {table}: {title}; mean over {len({r['category'] for r in records})} "
        f"categories (image AUROC with image score {image_score!r} / pixel AUROC / PRO; n/a "
        "where undefined).",
        "",
    ]
    head = " | ".join(f"{s} I-AUROC | {s} P-AUROC | {s} PRO" for s in settings)
    lines += [f"| {by} | {head} |", "|---" * (1 + 3 * len(settings)) + "|"]
    for label in labels:
        cells = [mean(label, s, m) for s in settings for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    shown = [s for s in settings if s != "ano"]
    if records and shown:
        lines += [
            "",
            "Image AUROC under each image-score rule (max: the plain maximum; patchcore: "
            "PatchCore's re-weighting; eq3: Eq. 3 as printed). Methods without a neighbour "
            "table always use the maximum:",
            "",
            f"| {by} | " + " | ".join(f"{s} {rule}" for s in shown for rule in SCORE_RULES) + " |",
            "|---" * (1 + len(shown) * len(SCORE_RULES)) + "|",
        ]
        for label in labels:
            cells = [mean(label, s, f"image_auroc_{rule}") for s in shown for rule in SCORE_RULES]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
