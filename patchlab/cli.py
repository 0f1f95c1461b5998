"""The ``patchlab`` command.

patchlab demo                      generate the demo data (if absent), run PatchCluster and
                                   PatchCore on every demo category, print one table
patchlab demo-data OUT             write the offline demo data set to OUT
patchlab run DATA --category C     one run; writes metrics.json, image_scores.csv, maps.npz
patchlab run FOLDER --unlabeled    rank a plain folder of images
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields

from patchlab.backbones import BACKBONES
from patchlab.config import RunConfig
from patchlab.data import SETTINGS
from patchlab.demo import DEMO_CATEGORIES, demo_path, make_demo_data
from patchlab.knn import BACKENDS, EXCLUDE_MODES
from patchlab.maps import IMAGE_SCORES
from patchlab.methods import METHODS


def _add_method_options(p: argparse.ArgumentParser) -> None:
    """The options a table of `patchlab reproduce` sets per cell itself."""
    p.add_argument("--setting", default="test", choices=SETTINGS)
    p.add_argument("--k", type=int, default=25, help="neighbours averaged (Eq. 2)")
    p.add_argument("--k-max", type=int, default=None, help="neighbour table width")
    p.add_argument("--exclude", default="self", choices=EXCLUDE_MODES)
    p.add_argument("--coreset", type=float, default=1.0, help="bank fraction in (0, 1]")


def _add_run_options(p: argparse.ArgumentParser, backbone: str = "efficientnet_lite0") -> None:
    """Options shared by every command that runs the pipeline (one per RunConfig field)."""
    p.add_argument(
        "--backbone",
        default=backbone,
        choices=tuple(BACKBONES),
        help=f"feature extractor (default {backbone})",
    )
    p.add_argument(
        "--weights",
        default="imagenet",
        help="imagenet (default), none (seeded random: tests only), or a state-dict path",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--no-crop", action="store_true", help="resize to 224 without centre crop")
    p.add_argument(
        "--image-score",
        default=IMAGE_SCORES[0],
        choices=IMAGE_SCORES,
        help="re-weighted maximum (patchcore: PatchCore's; eq3: as printed) or plain max",
    )
    p.add_argument("--b", type=int, default=9, help="neighbours of f* in Eq. 3")
    p.add_argument("--sigma", type=float, default=4.0, help="Gaussian blur of the maps, pixels")
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--k-img", type=int, default=50, help="SPADE: nearest images")
    p.add_argument("--mutual-ratio", type=float, default=0.3, help="mutual: share of images")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _config(args: argparse.Namespace, **overrides) -> RunConfig:
    values = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    if getattr(args, "no_crop", False):
        values |= {"resize": 224, "crop": None}
    return RunConfig(**(values | overrides))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchlab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="score one image set and write maps, scores, metrics")
    run.add_argument("data", help="MVTec AD layout folder, or an image folder with --unlabeled")
    run.add_argument("--category", default=None)
    run.add_argument("--unlabeled", action="store_true", help="DATA is a plain image folder")
    run.add_argument("--method", default="patchcluster", choices=sorted(METHODS))
    run.add_argument("--out", required=True, help="output folder")
    _add_method_options(run)
    _add_run_options(run)

    demo = sub.add_parser("demo", help="run PatchCluster and PatchCore on the demo data")
    demo.add_argument("--data", default=None, help="demo data folder (default: data/demo)")
    demo.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    _add_method_options(demo)
    _add_run_options(demo)

    rep = sub.add_parser("reproduce", help="compute one of the paper's tables (2-7)")
    rep.add_argument("data", help="MVTec AD layout folder (categories, or one category)")
    rep.add_argument("--table", type=int, required=True, choices=[2, 3, 4, 5, 6, 7])
    rep.add_argument("--out", required=True, help="output folder (CSV + markdown)")
    rep.add_argument("--categories", nargs="+", default=None)
    rep.add_argument(
        "--settings", nargs="+", default=["mix", "test", "ano"], choices=["mix", "test", "ano"]
    )
    _add_run_options(rep, backbone="wide_resnet50_2")  # the paper's

    data = sub.add_parser("demo-data", help="write the offline demo data set")
    data.add_argument("out")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    data.add_argument("--overwrite", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"patchlab {args.command}: error: {err}", file=sys.stderr)
        return 2


def cmd_run(args: argparse.Namespace) -> int:
    from patchlab.experiment import run, save_result

    result = run(_config(args), progress=not args.quiet)
    out = save_result(result, args.out)
    m = result.metrics
    print(f"{result.images.name}: {m['n_images']} images, {m['n_patches']} patches")
    if result.images.has_labels:
        print(_format_table([(args.method, m)]))
    print(f"wrote {out / 'metrics.json'}, {out / 'image_scores.csv'}, {out / 'maps.npz'}")
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


def cmd_demo_data(args: argparse.Namespace) -> int:
    out = make_demo_data(
        args.out, categories=args.categories, seed=args.seed, overwrite=args.overwrite
    )
    print(f"demo data in {out}: {', '.join(args.categories)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from patchlab.experiment import rescore, run

    root = make_demo_data(demo_path(args.data), categories=args.categories)
    rows = []
    for category in args.categories:
        config = _config(args, data=str(root), category=category, method="patchcluster")
        first = run(config, progress=not args.quiet)
        rows.append((f"{category} patchcluster K={config.k}", first.metrics))
        core = rescore(
            _config(args, data=str(root), category=category, method="patchcore"),
            first.images,
            first.inputs,
            first.masks,
        )
        rows.append((f"{category} patchcore", core.metrics))
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

    def cell(value) -> str:
        return "  n/a" if value is None else f"{value:.3f}"

    width = max(len(name) for name, _ in rows)
    lines = [f"{'run':<{width}}  image_auroc  max_auroc  pixel_auroc    pro"]
    for name, m in rows:
        plain = m.get("image_auroc_by_score", {}).get("max", m["image_auroc"])
        lines.append(
            f"{name:<{width}}  {cell(m['image_auroc']):>11}  {cell(plain):>9}"
            f"  {cell(m['pixel_auroc']):>11}  {cell(m['pro']):>5}"
        )
    return "\n".join(lines)


COMMANDS = {
    "run": cmd_run,
    "demo": cmd_demo,
    "demo-data": cmd_demo_data,
    "reproduce": cmd_reproduce,
}

if __name__ == "__main__":
    raise SystemExit(main())
