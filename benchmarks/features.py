"""Feature extraction: seconds per image of each backbone, measured in the same run.

    python benchmarks/features.py                  # 64 demo images, batch 16, every backbone
    python benchmarks/features.py --n 128 --batch-size 32

Each backbone runs in its own process (one warm-up batch, then the timed images), on the same
preprocessed inputs; the script prints seconds per image, the feature shape and the ratio to
the paper's wide_resnet50_2 (the peer). Weights do not change the time: random ones are used, so
the script runs where the WideResNet-50-2 ImageNet weights cannot be downloaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

from patchlab.backbones import BACKBONES, build_backbone, get_backbone
from patchlab.data import load_mvtec
from patchlab.demo import demo_path, make_demo_data
from patchlab.features import aggregate
from patchlab.images import preprocess, read_rgb


def measure(name: str, n: int, batch_size: int) -> dict:
    spec = get_backbone(name)
    root = make_demo_data(demo_path())
    paths = [p for c in ("brick", "washer") for p in load_mvtec(root, c, "mix").paths][:n]
    x = torch.stack([preprocess(read_rgb(p), 256, 224, spec.mean, spec.std) for p in paths])
    model = build_backbone(name, "none")
    with torch.inference_mode():
        aggregate(model.taps(x[:batch_size]), spec.dim)  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(x), batch_size):
            out = aggregate(model.taps(x[i : i + batch_size]), spec.dim)
        seconds = time.perf_counter() - t0
    return {"seconds_per_image": seconds / len(x), "shape": list(out.shape[1:]), "n": len(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.n, args.batch_size)))
        return
    print(f"threads {torch.get_num_threads()}, {args.n} images, batch {args.batch_size}")
    results = {}
    for name in BACKBONES:
        cmd = [sys.executable, __file__, "--one", name, "--n", str(args.n)]
        cmd += ["--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    peer = results["wide_resnet50_2"]["seconds_per_image"]
    for name, r in results.items():
        print(
            f"{name:>20}: {1000 * r['seconds_per_image']:7.1f} ms/image, features "
            f"{tuple(r['shape'])}, {peer / r['seconds_per_image']:5.2f}x the speed of "
            "wide_resnet50_2"
        )


if __name__ == "__main__":
    main()
