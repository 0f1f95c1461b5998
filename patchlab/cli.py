"""The ``patchlab`` command.

patchlab demo                      generate the demo data (if absent), run PatchCluster and
                                   PatchCore on every demo category, print one table
patchlab demo-data OUT             write the offline demo data set to OUT
patchlab run DATA --category C     one run; writes metrics.json, image_scores.csv, maps.npz
patchlab run FOLDER --unlabeled    rank a plain folder of images
patchlab report RUN_DIR            report.html and overlay PNGs of a finished run
patchlab score IMAGES --bank RUN   new images against a run's saved bank (run --save-bank)
patchlab reproduce DATA --table N  one of the paper's tables
patchlab k-curve DATA --category C without labels: the stability of the scores over K
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from functools import partial
from pathlib import Path

from patchlab.config import RunConfig
from patchlab.data import BLIND_SETTINGS
from patchlab.demo import DEMO_CATEGORIES, DEMO_DEFAULTS, DEMO_SETS, make_demo_data
from patchlab.diagnostics import K_LADDER, STABLE
from patchlab.metrics import format_metric
from patchlab.reproduce import PER_CELL, REPRODUCE_DEFAULTS, TABLES

TYPES = {"int": int, "float": float, "str": str}


def add_config_options(p: argparse.ArgumentParser, skip: tuple[str, ...] = (), **defaults) -> None:
    """One option per :class:`RunConfig` field (but ``data`` and ``skip``): its name, default,
    help and choices come from the field, so the CLI cannot drift from the config."""
    for f in fields(RunConfig):
        if f.name == "data" or f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        help_ = f.metadata["help"]
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=help_)
            continue
        choices = f.metadata["choices"]
        if f.type.startswith("tuple["):  # e.g. --local-sizes 1 3 5 (none: the empty tuple)
            shown = " ".join(map(str, default)) or "none"
            help_ = f"{help_} (default {shown})"
            p.add_argument(flag, type=int, nargs="*", default=default, help=help_)
            continue
        kind = TYPES[f.type.split(" | ")[0]]
        shown = "" if default is None else f" (default {default})"
        p.add_argument(flag, type=kind, default=default, choices=choices, help=help_ + shown)
    if "crop" not in skip:
        p.add_argument(
            "--no-crop",
            action="store_true",
            help="resize straight to the --crop side (224), no centre crop: nothing cut away",
        )
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, **overrides) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if getattr(args, "no_crop", False):  # the same input side, the border kept
        values |= {"resize": values.get("crop") or RunConfig.crop, "crop": None}
    return RunConfig(**(values | overrides))


def _add_demo(sub) -> None:
    """The ``demo`` command's options: the paper's settings, run's own otherwise."""
    demo = sub.add_parser(
        "demo",
        help="run PatchCluster and PatchCore on the demo data",
        epilog="example: patchlab demo --categories brick washer",
    )
    demo.add_argument("--data", default=None, help="demo data folder (default: data/demo)")
    demo.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    add_config_options(demo, skip=DEMO_SETS, **DEMO_DEFAULTS)


def _add_score(sub) -> None:
    """The ``score`` command: new images against a saved bank, with the bank's settings."""
    sc = sub.add_parser(
        "score",
        help="score new images against a run's saved memory bank (patchlab run --save-bank)",
        epilog="example: patchlab score new/ --bank runs/brick --out runs/brick-next --report",
    )
    sc.add_argument(
        "images",
        nargs="+",
        help="image files and folders (or, with --category, "
        "an MVTec AD layout folder: its --setting images, with metrics)",
    )
    sc.add_argument("--bank", required=True, help="a run folder written with --save-bank")
    sc.add_argument("--out", required=True, help="output folder")
    sc.add_argument("--category", default=None, help="IMAGES is an MVTec AD layout folder")
    sc.add_argument("--setting", default="test", choices=BLIND_SETTINGS + ("train",))
    sc.add_argument("--k", type=int, default=None, help="K of Eq. 2 (default: the run's)")
    sc.add_argument(
        "--add",
        action="store_true",
        help="score blind on the bank plus the new images (default: against the bank)",
    )
    sc.add_argument(
        "--save-bank",
        action="store_true",
        help="with --add: write the grown bank into OUT/bank for the next batch",
    )
    sc.add_argument("--report", action="store_true", help="also write report.html and overlays")
    sc.add_argument(
        "--weights",
        default=None,
        help="the bank's weights file where it lies now (its content must match)",
    )
    for flag, kind in (("--backbone", str), ("--resize", int), ("--crop", int)):
        sc.add_argument(
            flag, type=kind, default=None, help="refused unless the bank's (default: the bank's)"
        )
    sc.add_argument(
        "--cache-dir", default=None, help="default: $PATCHLAB_CACHE, else ~/.cache/patchlab"
    )
    sc.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_k_curve(sub) -> None:
    """The ``k-curve`` command's options: the K ladder, the threshold, and the run's own."""
    kc = sub.add_parser(
        "k-curve",
        help="without labels: how PatchCluster's scores settle as K grows, and a K to use",
        epilog="example: patchlab k-curve data/mvtec_ad --category bottle",
    )
    kc.add_argument("data", help="MVTec AD layout folder, or an image folder with --unlabeled")
    kc.add_argument("--ladder", type=int, nargs="+", default=list(K_LADDER), help="K values")
    kc.add_argument("--threshold", type=float, default=STABLE, help="stable: Spearman >= this")
    add_config_options(kc, skip=("method", "k", "k_max"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="score one image set and write maps, scores, metrics",
        epilog="example: patchlab run data/demo --category brick --k 25 --report --out runs/brick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("data", help="MVTec AD layout folder, or an image folder with --unlabeled")
    run.add_argument("--out", required=True, help="output folder")
    run.add_argument(
        "--report",
        action="store_true",
        help="also write report.html (offline) and overlays/*.png of the most anomalous images",
    )
    run.add_argument(
        "--save-bank",
        action="store_true",
        help="also write OUT/bank: the memory bank, to score new images later (patchlab score)",
    )
    add_config_options(run)
    _add_score(sub)

    rpt = sub.add_parser(
        "report",
        help="write report.html and overlay PNGs for a finished run",
        epilog="example: patchlab report runs/brick",
    )
    rpt.add_argument("run_dir", help="the --out folder of a patchlab run")
    rpt.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_demo(sub)

    rep = sub.add_parser(
        "reproduce",
        help="compute one of the paper's tables (2-7)",
        epilog="example: patchlab reproduce data/mvtec_ad --table 2 --out runs/table2",
    )
    rep.add_argument("data", help="MVTec AD layout folder (categories, or one category)")
    rep.add_argument("--table", type=int, required=True, choices=sorted(TABLES))
    rep.add_argument("--out", required=True, help="output folder (CSV + markdown)")
    rep.add_argument("--categories", nargs="+", default=None)
    rep.add_argument("--settings", nargs="+", default=list(BLIND_SETTINGS), choices=BLIND_SETTINGS)
    add_config_options(rep, skip=PER_CELL, **REPRODUCE_DEFAULTS)  # the paper's settings

    _add_k_curve(sub)

    data = sub.add_parser(
        "demo-data",
        help="write the offline demo data set",
        epilog="example: patchlab demo-data data/demo",
    )
    data.add_argument("out")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    data.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    from patchlab.malloc import tune_malloc

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_malloc()  # ~1.4x faster feature extraction here (patchlab.malloc)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, RuntimeError, OSError) as err:  # OSError: missing, unwritable, ...
        print(f"patchlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: what was finished is cached, the outputs untouched
        print(
            f"patchlab {args.command}: interrupted; the cache keeps what was finished, so the "
            "same command resumes from there",
            file=sys.stderr,
        )
        return 130
    finally:
        if "patchlab.distributed" in sys.modules:  # --scheduler: close what this run opened
            sys.modules["patchlab.distributed"].close_all()


def cmd_run(args: argparse.Namespace) -> int:
    from patchlab.experiment import run
    from patchlab.outputs import check_out, out_lock, save_result

    config = _config(args)
    bank = None
    if args.save_bank:
        from patchlab.saved import check_savable, save_bank

        check_savable(config)  # before the work
        bank = save_bank
    check_out(args.out)  # a bad --out is found before the work, not after it
    with out_lock(args.out):  # one run per --out: a second one stops here, before its work
        result = run(config, progress=not args.quiet)
        out = save_result(result, args.out, args.report, not args.quiet, bank)
    m = result.metrics
    print(f"{result.images.name}: {m['n_images']} images, {m['n_patches']} patches")
    if result.images.has_labels:
        print(_format_table([(args.method, m)]))
    print(f"wrote {out / 'metrics.json'}, {out / 'image_scores.csv'}, {out / 'maps.npz'}")
    if args.report:
        print(f"report: {out / 'report.html'} and {out / 'overlays'}/")
    if args.save_bank:
        print(f"bank: {out / 'bank'} (patchlab score IMAGES --bank {out} --out OUT)")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from patchlab.data import load_mvtec, load_paths
    from patchlab.outputs import check_out, out_lock, save_result
    from patchlab.saved import grow_bank, load_bank, score_images

    if args.save_bank and not args.add:
        raise ValueError("--save-bank with score writes the grown bank: add --add")
    bank_dir = Path(args.bank).resolve()
    out = Path(args.out).resolve()
    if (out == bank_dir or out in bank_dir.parents) and not args.save_bank:
        raise ValueError(
            f"--out {args.out} holds the bank scored against ({args.bank}): writing there would "
            "replace it; choose another folder (or --add --save-bank to grow it in place)"
        )
    bank = load_bank(args.bank)
    if args.category is not None:
        if len(args.images) > 1:
            raise ValueError("with --category, give one MVTec AD layout folder")
        images = load_mvtec(args.images[0], args.category, args.setting)
    else:
        images = load_paths(args.images)
    expect = {"backbone": args.backbone, "resize": args.resize, "crop": args.crop}
    expect["weights"] = args.weights
    check_out(args.out)
    with out_lock(args.out):
        result = score_images(
            bank,
            images,
            k=args.k,
            add=args.add,
            expect=expect,
            cache_dir=args.cache_dir,
            category=args.category,
            progress=not args.quiet,
        )
        grow = partial(grow_bank, bank) if args.save_bank else None
        out = save_result(result, args.out, args.report, not args.quiet, grow)
    how = "added to" if args.add else "against"
    print(f"{images.name}: {len(images)} images scored {how} the bank of {len(bank)} images")
    if images.has_labels:
        print(_format_table([(result.config.method, result.metrics)]))
    print(f"wrote {out / 'metrics.json'}, {out / 'image_scores.csv'}, {out / 'maps.npz'}")
    if args.save_bank:
        print(f"bank: {out / 'bank'} ({len(bank) + len(images)} images)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from patchlab.report import report_from_folder

    written = report_from_folder(args.run_dir, progress=not args.quiet)
    print(f"wrote {written[-1]} and {len(written) - 1} overlay PNGs in {written[0].parent}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from patchlab.reproduce import reproduce

    t0 = time.perf_counter()
    out = reproduce(
        args.data,
        args.table,
        args.out,
        base=_config(args, data=args.data),
        categories=args.categories,
        settings=tuple(args.settings),
        progress=not args.quiet,
    )
    print((out / f"table{args.table}.md").read_text())
    print(f"wrote {out / f'table{args.table}.csv'} ({time.perf_counter() - t0:.0f} s)")
    return 0


def cmd_k_curve(args: argparse.Namespace) -> int:
    from patchlab.diagnostics import choose_k, k_stability
    from patchlab.experiment import prepare

    ladder = sorted(set(args.ladder))
    if len(ladder) < 2 or ladder[0] < 1:
        raise ValueError(f"--ladder {' '.join(map(str, args.ladder))}: give two or more K >= 1")
    # one size, no image re-scoring: the curve reads the neighbour table alone
    single = dict(local_sizes=tuple(args.local_sizes[:1]), rscin=())
    config = _config(args, method="patchcluster", k=ladder[-1], **single)
    images, inputs, _, _ = prepare(config, progress=not args.quiet)
    curve = k_stability(inputs.neighbours, len(images), tuple(ladder))
    print(f"{images.name}: {len(images)} images; Spearman correlation of the scores at K and")
    print("the next K (patch scores; image scores = the largest patch score): 1 = same ranking")
    print(f"{'K':>5} {'next':>5} {'patches':>8} {'images':>7}")
    for c in curve:
        print(f"{c['k']:>5} {c['next_k']:>5} {c['rho_patch']:>8.4f} {c['rho_image']:>7.4f}")
    k = choose_k(curve, args.threshold)
    print(
        f"suggested K = {k}: the smallest K from which the image ranking stays stable "
        f"(>= {args.threshold}); the largest K of the ladder when it never does"
    )
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    out = make_demo_data(
        args.out, categories=args.categories, seed=args.seed, overwrite=args.overwrite
    )
    print(f"demo data in {out}: {', '.join(args.categories)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from patchlab.demo import run_demo

    rows = run_demo(_config(args, data=""), args.data, args.categories, not args.quiet)
    print(
        f"\nbackbone={args.backbone} weights={args.weights!r} setting={args.setting} "
        f"exclude={args.exclude} image_score={args.image_score}"
        + (
            " (random weights: the numbers test the pipeline, not the method)"
            if args.weights == "none"
            else ""
        )
    )
    print(_format_table(rows))
    return 0


def _format_table(rows: list[tuple[str, dict]]) -> str:
    """image_auroc uses the configured image score; max_auroc the plain maximum."""

    width = max(len(name) for name, _ in rows)
    lines = [f"{'run':<{width}}  image_auroc  max_auroc  pixel_auroc    pro"]
    for name, m in rows:
        plain = m.get("image_auroc_by_score", {}).get("max", m["image_auroc"])
        lines.append(
            f"{name:<{width}}  {format_metric(m['image_auroc']):>11}  {format_metric(plain):>9}"
            f"  {format_metric(m['pixel_auroc']):>11}  {format_metric(m['pro']):>5}"
        )
    return "\n".join(lines)


COMMANDS = {
    "run": cmd_run,
    "score": cmd_score,
    "report": cmd_report,
    "demo": cmd_demo,
    "demo-data": cmd_demo_data,
    "reproduce": cmd_reproduce,
    "k-curve": cmd_k_curve,
}

if __name__ == "__main__":
    raise SystemExit(main())
