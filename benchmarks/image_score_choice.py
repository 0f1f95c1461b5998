"""Which image score: the image AUROC of every rule, for PatchCluster and PatchCore.

    python benchmarks/image_score_choice.py                      # every demo category, Test
    python benchmarks/image_score_choice.py --data ../shared/data --categories magnetic_tile

Rules (patchlab.maps.image_scores): ``max`` (the largest patch score a*), ``patchcore``
(PatchCore's re-weighting, weight in [0, 1)) and ``eq3`` (Eq. 3 as printed, exp(a*) in the
numerator). Each (category, method, K) is one run through the cached pipeline (the features
and the neighbour table are computed once, for the largest K), then re-scored under every rule;
the script prints the image AUROC of each rule and how many images got a negative weight under
``eq3``, then the mean over categories.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from patchlab.config import RunConfig
from patchlab.demo import DEMO_CATEGORIES, demo_path, make_demo_data
from patchlab.experiment import prepare, rescore
from patchlab.maps import IMAGE_SCORES

RUNS = (("patchcluster", 25), ("patchcluster", 100), ("patchcore", 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="MVTec-layout folder (default: the demo)")
    parser.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    parser.add_argument("--setting", default="test")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    args = parser.parse_args()
    root = make_demo_data(demo_path()) if args.data is None else args.data
    k_max = max(k for _, k in RUNS)
    rows = []
    for category in args.categories:
        base = RunConfig(
            data=str(root),
            category=category,
            setting=args.setting,
            backbone=args.backbone,
            weights=args.weights,
            k_max=k_max,
        )
        images, inputs, masks, _ = prepare(base, progress=True)
        for method, k in RUNS:
            config = replace(base, method=method, k=k, image_score="max")
            m = rescore(config, images, inputs, masks, pixel_metrics=False).metrics
            negative = rescore(
                replace(config, image_score="eq3"), images, inputs, masks, pixel_metrics=False
            ).metrics["negative_weights"]
            by = m["image_auroc_by_score"]
            rows.append((category, f"{method} K={k}", by, negative))
            print(
                f"{category:>13} {method:>12} K={k:<3} "
                + "  ".join(f"{rule} {by[rule]:.3f}" for rule in IMAGE_SCORES)
                + f"  (eq3: {negative}/{len(images)} negative weights)",
                flush=True,
            )
    print(f"\nmean over {len(args.categories)} categories ({args.setting} setting)")
    print("| method | " + " | ".join(IMAGE_SCORES) + " | eq3 negative weights |")
    print("|---" * (2 + len(IMAGE_SCORES)) + "|")
    for method, k in RUNS:
        mine = [r for r in rows if r[1] == f"{method} K={k}"]
        cells = [f"{np.mean([r[2][rule] for r in mine]):.3f}" for rule in IMAGE_SCORES]
        print(f"| {method} K={k} | " + " | ".join(cells) + f" | {sum(r[3] for r in mine)} |")


if __name__ == "__main__":
    main()
