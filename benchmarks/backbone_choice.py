"""Which EfficientNet-Lite0 taps, feature width and input normalisation: measured, not guessed.

    python benchmarks/backbone_choice.py                          # every demo category, Test
    python benchmarks/backbone_choice.py --data ../shared/data --categories magnetic_tile \\
        --max-images 200 --variants 4+10 4+7 4+7+10

For each variant (tapped blocks, channel pooling, normalisation) the script extracts features of
each category's Test set, computes the self-kNN table once (K up to 25, exclude self), and
prints PatchCluster K = 25 and PatchCore metrics (image AUROC with the plain maximum, pixel
AUROC, PRO) and the feature time per image; then the mean over categories. Each variant is
compared with the others under the same kNN, maps and metrics. The ImageNet check (top-1 of
scikit-image's chelsea and coffee and scikit-learn's flower, and their probability) is printed
for each normalisation.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata
from sklearn.datasets import load_sample_image

from patchlab.backbones import BACKBONES, EfficientNetLite0Taps, build_backbone
from patchlab.config import RunConfig
from patchlab.data import load_mvtec
from patchlab.demo import DEMO_CATEGORIES, demo_path, make_demo_data
from patchlab.experiment import rescore
from patchlab.features import aggregate
from patchlab.images import load_masks, preprocess, read_rgb
from patchlab.knn import knn
from patchlab.methods import ScoringInputs

NORMS = {
    "tf": ((127 / 255,) * 3, (128 / 255,) * 3),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def parse_variant(text: str) -> tuple[tuple[int, ...], int | None, str]:
    """'4+10' or '4+10/76' (channel pooling to 76) or '4+10:imagenet' (normalisation)."""
    norm = "tf"
    if ":" in text:
        text, norm = text.split(":")
    dim = None
    if "/" in text:
        text, dim_text = text.split("/")
        dim = int(dim_text)
    return tuple(int(b) for b in text.split("+")), dim, norm


def imagenet_check(norm: str) -> str:
    model = build_backbone("efficientnet_lite0", "imagenet")
    mean, std = NORMS[norm]
    out = []
    photos = (
        ("chelsea", skdata.chelsea(), 285),  # Egyptian cat
        ("coffee", skdata.coffee(), 967),  # espresso
        ("flower", load_sample_image("flower.jpg"), 985),  # daisy
    )
    for name, arr, cls in photos:
        x = preprocess(Image.fromarray(arr).convert("RGB"), 256, 224, mean, std)
        with torch.inference_mode():
            p = model(x[None]).softmax(1)[0]
        out.append(f"{name}: top-1 {int(p.argmax())} (want {cls}), p = {float(p[cls]):.3f}")
    return "; ".join(out)


def features_of(images, model, dim, norm, batch=16) -> tuple[torch.Tensor, float]:
    mean, std = NORMS[norm]
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = torch.stack(
                [preprocess(read_rgb(p), 256, 224, mean, std) for p in images.paths[i : i + batch]]
            )
            out.append(aggregate(model.taps(x), dim))
    return torch.cat(out), (time.perf_counter() - t0) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="MVTec-layout folder (default: the demo)")
    parser.add_argument("--categories", nargs="+", default=list(DEMO_CATEGORIES))
    parser.add_argument("--setting", default="test")
    parser.add_argument("--max-images", type=int, default=None, help="every n-th image to fit")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["4+10", "4+10:imagenet", "4+7", "4+7+10", "4+10+14", "3+10", "4+10/76"],
    )
    args = parser.parse_args()
    root = make_demo_data(demo_path()) if args.data is None else args.data
    default = BACKBONES["efficientnet_lite0"].tap_names
    print(f"torch threads {torch.get_num_threads()}; default taps {default}")
    for norm in NORMS:
        print(f"ImageNet check, {norm} normalisation: {imagenet_check(norm)}")
    rows = []
    for text in args.variants:
        taps, dim, norm = parse_variant(text)
        model = EfficientNetLite0Taps(taps)
        model.load_weights(EfficientNetLite0Taps.imagenet_state_dict())
        model.eval()
        for category in args.categories:
            images = load_mvtec(root, category, args.setting)
            if args.max_images and len(images) > args.max_images:
                step = -(-len(images) // args.max_images)
                images = images.subset(list(range(0, len(images), step)))
            masks = load_masks(images)
            feats, per_image = features_of(images, model, dim, norm)
            n, h, w, d = feats.shape
            groups = torch.arange(n).repeat_interleave(h * w)
            t0 = time.perf_counter()
            table = knn(feats.reshape(-1, d), 25, query_groups=groups, progress=False)
            t_knn = time.perf_counter() - t0
            inputs = ScoringInputs(feats, table)
            config = RunConfig(data=str(root), category=category, k=25, image_score="max")
            for method in ("patchcluster", "patchcore"):
                m = rescore(replace(config, method=method), images, inputs, masks).metrics
                rows.append((text, d, category, method, m, per_image, t_knn))
                print(
                    f"{text:>14} d={d:<4} {category:>13} {method:>12}: image AUROC "
                    f"{m['image_auroc']:.3f} pixel AUROC {m['pixel_auroc']:.3f} PRO "
                    f"{m['pro']:.3f} | {1000 * per_image:.0f} ms/img, kNN {t_knn:.1f} s",
                    flush=True,
                )
    print("\nmean over categories (PatchCluster K=25 | PatchCore)")
    print(
        "| variant | d | image AUROC | pixel AUROC | PRO | PatchCore pixel AUROC | PRO | ms/img |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for text in args.variants:
        mine = [r for r in rows if r[0] == text]
        pc = [r[4] for r in mine if r[3] == "patchcluster"]
        core = [r[4] for r in mine if r[3] == "patchcore"]

        def mean(ms, key):
            return np.mean([m[key] for m in ms])

        print(
            f"| {text} | {mine[0][1]} | {mean(pc, 'image_auroc'):.3f} | "
            f"{mean(pc, 'pixel_auroc'):.3f} | {mean(pc, 'pro'):.3f} | "
            f"{mean(core, 'pixel_auroc'):.3f} | {mean(core, 'pro'):.3f} | "
            f"{1000 * np.mean([r[5] for r in mine]):.0f} |"
        )


if __name__ == "__main__":
    main()
