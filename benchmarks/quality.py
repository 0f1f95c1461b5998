"""Which blind detector on real data: a grid of configurations over every real set here.

    python benchmarks/quality.py                         # every real set, every group of rows
    python benchmarks/quality.py --sets piped --groups core wide
    python benchmarks/quality.py --report                # print the tables of the results so far
    python benchmarks/quality.py --sets demo             # the demo: reported, never decides

Sets: the eight PIPED paper classes (``piped/<class>``, Test setting: 72 images each) and
magnetic tile (``tile``: Test setting, 582 images; ``tile-mix``: all 1 344, 1.05 million
patches at 224 px, hours of neighbour search on 2 cores), read from ``--data``
(default ``../shared/data``); ``demo`` is the offline demo (never in the mean).

Rows (``ROWS``): today's default (PatchCluster, K = 25, ``self`` exclusion, 256 -> 224 centre
crop, PatchCore's image re-weighting) and every variant of one axis: input size and crop
(224 crop, no crop, 320, 448), K (fixed, and relative to the set's size), exclusion (``self``,
``image``), method (PatchCluster, mutual scoring, PatchCore), MuSc's LNAMD (sizes 3, 1, 5).
Every row reports the image AUROC under every image-score rule, without and with RsCIN
(windows 2, 3), so the image-score axis costs nothing more; the main columns use the
row's own rule (``patchcore`` where a table exists, else ``max``).

Each (set, row) is one line of a JSON-lines file (``--results``), written as it finishes, so
an interrupted run resumes where it stopped. Features and neighbour tables come from
patchlab's cache: only the input size changes the features; K, exclusion and the image score
re-score a stored table (rows sharing a table are run together, the table computed once at
the widest K). ``seconds`` is the row's scoring time plus, for the first row of a table, the
features and table it computed.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from patchlab.config import PAPER_SETTINGS, RunConfig
from patchlab.diagnostics import K_LADDER, STABLE, choose_k, k_stability
from patchlab.experiment import load_images, prepare, rescore
from patchlab.maps import IMAGE_SCORES, image_scores_by_rule, rscin
from patchlab.methods import score_patches
from patchlab.metrics import format_metric, image_auroc

SIZES = {"224crop": (256, 224), "224": (224, None), "320": (320, 320), "448": (448, 448)}
K_RELATIVE = (0.1, 0.25)  # K = round(share * n_images)
RSCIN = (2, 3)  # MuSc's windows on MVTec AD
PIPED = (
    "PA_BDP01_TL",
    "PA_BFT01_TL",
    "PA_BRG01_RL",
    "PA_BRG02_RL",
    "PA_BTN01_RL",
    "PA_FLR01_TL",
    "PA_FLR02_TL",
    "PA_FVN01_TL",
)
BASE = dict(PAPER_SETTINGS, k=25)  # the old default of `patchlab run`: every row's base
SCORES = Path("runs/quality/scores")  # mutual scoring's patch scores, per set and size
DEFAULT_ROW = "patchcluster K=25 @224crop"


@dataclass(frozen=True)
class Row:
    """One configuration of the grid: RunConfig overrides on today's defaults."""

    name: str
    group: str
    size: str = "224crop"
    overrides: dict = field(default_factory=dict)
    k_share: float | None = None  # K relative to the set's size


def rows() -> list[Row]:
    """The grid. ``core``: three methods at every input size; ``wide``: every other axis at
    224 px (crop and no crop)."""
    out = []
    for size in SIZES:
        out += [
            Row(f"patchcluster K=25 @{size}", "core", size, {"method": "patchcluster", "k": 25}),
            Row(f"patchcore @{size}", "core", size, {"method": "patchcore", "k": 1}),
            Row(f"mutual @{size}", "core", size, {"method": "mutual"}),
        ]
    for size in ("224crop", "224"):
        for k in K_LADDER:
            if k not in (1, 25):
                out.append(Row(f"patchcluster K={k} @{size}", "wide", size, {"k": k}))
        for share in K_RELATIVE:
            out.append(Row(f"patchcluster K={share:g}n @{size}", "wide", size, k_share=share))
        for k in (1, 25):
            out.append(Row(f"image-excl K={k} @{size}", "wide", size, {"k": k, "exclude": "image"}))
        lnamd = {"local_sizes": (3, 1, 5)}
        out.append(Row(f"patchcluster K=25 LNAMD @{size}", "wide", size, lnamd))
        out.append(Row(f"mutual LNAMD @{size}", "wide", size, {"method": "mutual", **lnamd}))
    return out


def data_sets(names: list[str], data: Path) -> list[tuple[str, RunConfig]]:
    """(name, base config) of every set asked for; ``piped`` means its eight classes. The
    base is the old default (the paper's settings, K = 25): each row changes one axis of it."""
    out = []
    for name in names:
        if name == "piped":
            out += data_sets([f"piped/{c}" for c in PIPED], data)
        elif name.startswith("piped/"):
            cat = name.split("/", 1)[1]
            root = str(data / "piped")
            out.append((name, RunConfig(data=root, category=cat, setting="test", **BASE)))
        elif name in ("tile", "tile-mix"):
            setting = "test" if name == "tile" else "mix"
            config = RunConfig(data=str(data), category="magnetic_tile", setting=setting, **BASE)
            out.append((name, config))
        elif name == "demo":
            from patchlab.demo import DEMO_CATEGORIES, demo_path, make_demo_data

            root = make_demo_data(demo_path())
            out += [
                (f"demo/{c}", RunConfig(data=str(root), category=c, **BASE))
                for c in DEMO_CATEGORIES
            ]
        else:
            raise SystemExit(f"unknown set {name!r}: piped, piped/<class>, tile, tile-mix, demo")
    return out


def row_config(base: RunConfig, row: Row, n_images: int | None = None) -> RunConfig:
    resize, crop = SIZES[row.size]
    config = replace(base, resize=resize, crop=crop, **row.overrides)
    if row.k_share is not None:
        config = replace(config, k=max(1, round(row.k_share * n_images)))
    return config


def preparation(config: RunConfig) -> tuple:
    """What decides the prepared inputs (features, table kind): rows sharing it share them."""
    table = config.method in ("patchcluster", "patchcore")
    return (config.resize, config.crop, config.local_sizes, config.exclude if table else None)


def run_set(name: str, base: RunConfig, grid: list[Row], done: dict, out) -> None:
    """Every row of ``grid`` not yet ``done`` on one set, a preparation at a time.

    ``done`` maps (set, row) to the settings its line recorded (None for lines written
    before settings were recorded): a row whose settings changed since is run again."""
    n_images = len(load_images(base)) if any(r.k_share for r in grid) else None
    groups: dict[tuple, list[Row]] = {}
    for row in grid:
        config = row_config(base, row, n_images)
        if (name, row.name) in done and done[(name, row.name)] in (None, settings(config)):
            continue
        groups.setdefault(preparation(config), []).append(row)
    for members in groups.values():
        configs = [row_config(base, r, n_images) for r in members]
        widest = max(c.k for c in configs)
        ladder = any(c.method == "patchcluster" and c.exclude == "self" for c in configs)
        if ladder and members[0].size in ("224crop", "224") and configs[0].local_sizes == (3,):
            widest = max(widest, K_LADDER[-1])  # the K diagnostic reads the whole ladder
        t0 = time.perf_counter()
        first = replace(configs[0], k_max=widest, rscin=RSCIN)  # rscin: load global features
        images, inputs, masks, _ = prepare(first, progress=True)
        prep_seconds = time.perf_counter() - t0
        curve = None
        if inputs.neighbours is not None and first.exclude == "self" and widest >= K_LADDER[-1]:
            curve = k_stability(inputs.neighbours, len(images), K_LADDER)
        for row, config in zip(members, configs, strict=True):
            record = score_row(
                name, row, replace(config, k_max=widest), images, inputs, masks, SCORES
            )
            record["seconds"] = round(record["seconds"] + prep_seconds, 1)
            prep_seconds = 0.0
            if curve is not None and row.overrides.get("method", "patchcluster") == "patchcluster":
                record["k_stability"] = curve
            out.write(json.dumps(record) + "\n")
            out.flush()
            print(line(record), flush=True)


def settings(config: RunConfig) -> dict:
    """What a line records of its config (as JSON gives it back; k_max is the table's width,
    shared by the rows run together, and changes no result)."""
    return json.loads(json.dumps({k: v for k, v in config.to_dict().items() if k != "k_max"}))


def mutual_scores(name: str, config: RunConfig, inputs, folder: Path) -> torch.Tensor:
    """Mutual scoring's patch scores, one size at a time, kept on disk per (set, input,
    size, ratio): the rows with and without LNAMD share the size-3 scores (on magnetic tile
    each size is ~10 minutes of GEMM on 2 cores)."""
    parts = []
    for x in (inputs, *inputs.others):
        tag = f"{name}-{config.resize}-{config.crop}-r{x.local}-m{config.mutual_ratio}"
        path = folder / (tag.replace("/", "_") + ".npy")
        if path.is_file():
            parts.append(torch.from_numpy(np.load(path)).double())
            continue
        score = score_patches("mutual", x, 1, progress=True, ratio=config.mutual_ratio)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(path, score.numpy())
        parts.append(score.double())
    return (sum(parts) / len(parts)).float()  # as score_patches averages the sizes


def score_row(name, row, config, images, inputs, masks, scores_dir: Path) -> dict:
    t0 = time.perf_counter()
    kept = None
    if config.method == "mutual":
        kept = mutual_scores(name, config, inputs, scores_dir)
    result = rescore(config, images, inputs, masks, progress=True, patch_scores=kept)
    seconds = time.perf_counter() - t0
    patch = result.patch_scores
    labels = images.labels
    # every rule's scores once (support distances are a kNN), then the same smoothed by RsCIN
    by_rule = image_scores_by_rule(patch, inputs, config.b, config.top_q)
    smoothed = {r: rscin(s, inputs.global_features, RSCIN) for r, s in by_rule.items()}
    m = result.metrics
    return {
        "set": name,
        "row": row.name,
        "group": row.group,
        "k": config.k,
        "n_images": len(images),
        "image_rule": m["image_score"],
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m["pixel_auroc"],
        "pro": m["pro"],
        "image_auroc_by_rule": {r: image_auroc(labels, s) for r, s in by_rule.items()},
        "image_auroc_by_rule_rscin": {r: image_auroc(labels, s) for r, s in smoothed.items()},
        "seconds": seconds,
        "config": settings(config),
    }


def line(r: dict) -> str:
    cells = [format_metric(r[key]) for key in ("image_auroc", "pixel_auroc", "pro")]
    return f"{r['set']:>20}  {r['row']:<34} " + " / ".join(cells) + f"  {r['seconds']:.1f} s"


def report(records: list[dict]) -> str:
    """Markdown: the mean over the real sets of every row, next to the default; then every
    set's own table; then the image-score rules."""
    latest = {(r["set"], r["row"]): r for r in records}
    sets = sorted({s for s, _ in latest})
    real = [s for s in sets if not s.startswith("demo/")]
    names = [r.name for r in rows()]
    text = []
    piped = [s for s in real if s.startswith("piped/")]
    for title, chosen in (
        ("mean over the real sets", real),
        ("mean over the PIPED classes", piped if len(piped) < len(real) else []),
        ("demo (never decides)", [s for s in sets if s.startswith("demo/")]),
    ):
        if not chosen:
            continue
        text.append(f"\n### {title}: {', '.join(chosen)}\n")
        text.append(
            "| configuration | image AUROC | pixel AUROC | PRO | worst set Δ vs default | seconds |"
        )
        text.append("|---|---|---|---|---|---|")
        for name in names:
            have = [latest[(s, name)] for s in chosen if (s, name) in latest]
            if len(have) != len(chosen):
                continue
            cells = [_mean(have, key) for key in ("image_auroc", "pixel_auroc", "pro")]
            worst = _worst(latest, chosen, name)
            secs = np.mean([h["seconds"] for h in have])
            mark = " (default)" if name == DEFAULT_ROW else ""
            text.append(f"| {name}{mark} | " + " | ".join(cells) + f" | {worst} | {secs:.0f} |")
    for title, chosen in (("the real sets", real), ("the PIPED classes", piped)):
        if chosen and (chosen is real or len(piped) < len(real)):
            text += rule_table(latest, chosen, names, title)
    text += candidates(latest, real)
    text += k_diagnostic(latest, sets)
    for s in sets:
        text.append(f"\n### {s}\n")
        text.append("| configuration | image AUROC | pixel AUROC | PRO | seconds |")
        text.append("|---|---|---|---|---|")
        for name in names:
            if (s, name) in latest:
                r = latest[(s, name)]
                cells = [_mean([r], key) for key in ("image_auroc", "pixel_auroc", "pro")]
                text.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    return "\n".join(text)


def candidates(latest: dict, sets: list[str], top: int = 15) -> list[str]:
    """The decision table: every (row, image-score rule, RsCIN or not) measured on every real
    set, as the mean over the sets and its worst loss against the default on any set and
    metric; a candidate passes when it improves the mean of every metric and loses no more
    than 0.02 anywhere. Sorted by the mean of the three metrics."""
    default = [latest.get((s, DEFAULT_ROW)) for s in sets]
    if None in default:
        return []

    def metrics(r: dict, rule: str, smoothed: bool) -> tuple | None:
        image = r["image_auroc_by_rule_rscin" if smoothed else "image_auroc_by_rule"].get(rule)
        return None if image is None else (image, r["pixel_auroc"], r["pro"])

    base = [metrics(r, r["image_rule"], False) for r in default]
    found = []
    for name in [r.name for r in rows()]:
        have = [latest.get((s, name)) for s in sets]
        if None in have:
            continue
        for rule in IMAGE_SCORES:
            for smoothed in (False, True):
                values = [metrics(r, rule, smoothed) for r in have]
                if None in values:
                    continue
                mean = np.mean(values, 0)
                worst = min(min(np.subtract(v, b)) for v, b in zip(values, base, strict=True))
                passes = bool(np.all(mean > np.mean(base, 0)) and worst >= -0.02)
                label = f"{name}, {rule}" + (" + RsCIN" if smoothed else "")
                found.append((float(mean.mean()), label, mean, worst, passes))
    found.sort(key=lambda x: -x[0])
    text = [f"\n### candidates for the defaults (mean over {len(sets)} real sets)\n"]
    text.append("| configuration, image score | image | pixel | PRO | worst Δ | passes |")
    text.append("|---|---|---|---|---|---|")
    for _, label, mean, worst, passes in found[:top]:
        cells = " | ".join(f"{v:.3f}" for v in mean)
        text.append(f"| {label} | {cells} | {worst:+.3f} | {'yes' if passes else 'no'} |")
    return text


def k_diagnostic(latest: dict, sets: list[str]) -> list[str]:
    """How often the label-free K (patchlab.diagnostics.choose_k on each set's stability
    curve) is the K the labels would pick, and what it costs against K = 25 and the best K."""
    text = ["\n### the label-free K against the labels' K (224 crop, self exclusion)\n"]
    text.append(
        f"| set | K (images, {STABLE}) | K (patches, {STABLE}) | labels' best K "
        "| mean of 3 metrics: chosen / K=25 / best |"
    )
    text.append("|---|---|---|---|---|")
    hits, n_sets, better, regret = 0, 0, 0, []
    for s in sets:
        ladder = {}
        for k in K_LADDER:
            name = "patchcore @224crop" if k == 1 else f"patchcluster K={k} @224crop"
            if (s, name) in latest:
                ladder[k] = latest[(s, name)]
        curve = next((r["k_stability"] for r in ladder.values() if "k_stability" in r), None)
        if curve is None or len(ladder) < len(K_LADDER):
            continue
        score = {
            k: np.mean([r[m] or 0 for m in ("image_auroc", "pixel_auroc", "pro")])
            for k, r in ladder.items()
        }
        by_image, by_patch = choose_k(curve, key="rho_image"), choose_k(curve, key="rho_patch")
        best = max(score, key=score.get)
        n_sets += 1
        hits += by_image == best
        better += score[by_image] >= score[25]
        regret.append(score[best] - score[by_image])
        text.append(
            f"| {s} | {by_image} | {by_patch} | {best} | "
            f"{score[by_image]:.3f} / {score[25]:.3f} / {score[best]:.3f} |"
        )
    if n_sets:
        text.append(
            f"\nthe image-ranking rule picked the labels' K on {hits} of {n_sets} sets; its K "
            f"scored at least K = 25's on {better} of {n_sets}; mean loss against the best K "
            f"{np.mean(regret):.3f} (largest {max(regret):.3f})"
        )
    return text


def rule_table(latest: dict, chosen: list[str], names: list[str], title: str) -> list[str]:
    """Image AUROC of every row under every image-score rule, without and with RsCIN."""
    text = [f"\n### image AUROC by image-score rule (mean over {title}; + RsCIN 2, 3)\n"]
    rules = " | ".join(IMAGE_SCORES) + " | " + " | ".join(f"{r}+RsCIN" for r in IMAGE_SCORES)
    text += [f"| configuration | {rules} |", "|---" * (1 + 2 * len(IMAGE_SCORES)) + "|"]
    for name in names:
        have = [latest[(s, name)] for s in chosen if (s, name) in latest]
        if len(have) != len(chosen) or not have:
            continue
        cells = []
        for key in ("image_auroc_by_rule", "image_auroc_by_rule_rscin"):
            for rule in IMAGE_SCORES:
                values = [h[key].get(rule) for h in have]
                cells.append("—" if None in values else f"{np.mean(values):.3f}")
        text.append(f"| {name} | " + " | ".join(cells) + " |")
    return text


def _mean(have: list[dict], key: str) -> str:
    values = [h[key] for h in have]
    return format_metric(None if None in values else float(np.mean(values)))


def _worst(latest: dict, sets: list[str], name: str) -> str:
    """The largest loss against the default row on any set and metric."""
    losses = []
    for s in sets:
        if (s, DEFAULT_ROW) not in latest:
            return "—"
        a, b = latest[(s, name)], latest[(s, DEFAULT_ROW)]
        for key in ("image_auroc", "pixel_auroc", "pro"):
            if a[key] is not None and b[key] is not None:
                losses.append(a[key] - b[key])
    return f"{min(losses):+.3f}" if losses else "—"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--sets", nargs="+", default=["piped", "tile"])
    parser.add_argument("--groups", nargs="+", default=["core", "wide"], choices=["core", "wide"])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rows", nargs="+", default=None, help="only these row names")
    parser.add_argument("--results", type=Path, default=Path("runs/quality/results.jsonl"))
    parser.add_argument("--report", action="store_true", help="only print the tables")
    args = parser.parse_args()
    args.results.parent.mkdir(parents=True, exist_ok=True)
    records = []
    if args.results.exists():
        records = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    if not args.report:
        grid = [
            r
            for r in rows()
            if r.group in args.groups
            and r.size in args.sizes
            and (args.rows is None or r.name in args.rows)
        ]
        done = {(r["set"], r["row"]): r.get("config") for r in records}
        with args.results.open("a") as out:
            for name, base in data_sets(args.sets, args.data):
                run_set(name, base, grid, done, out)
        records = [json.loads(x) for x in args.results.read_text().splitlines() if x.strip()]
    print(report(records))


if __name__ == "__main__":
    main()
