"""Mutual scoring's per-image minima: patchlab against faiss, each in its own process.

    python benchmarks/mutual.py                          # PIPED class features (72 images)
    python benchmarks/mutual.py --images 72 --size 28    # a seeded random set of that shape

Mutual scoring (MuSc's MSM, ``patchlab.methods.mutual``) needs, for every patch, its distance
to the nearest patch of every image: an (N, n) table that patchlab streams a block of images
at a time (``patchlab.knn.nearest_per_group``). The natural peer is one faiss
``IndexFlatL2`` per image searched with k = 1 for every patch (faiss returns squared
distances: their square roots are compared). Printed: seconds of each, the ratio, the largest
difference of the minima, and the GEMM floor (2 N^2 d FLOPs at the speed of one large float32
matmul measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def features(args) -> np.ndarray:
    """(n, h * w, d) float32: pretrained Lite0 features of a PIPED class, or seeded noise."""
    if args.random:
        rng = np.random.default_rng(0)
        return rng.standard_normal((args.images, args.size**2, 152), dtype=np.float32)
    from patchlab.config import RunConfig
    from patchlab.experiment import feature_options, load_images
    from patchlab.features import extract_features

    config = RunConfig(data=str(SHARED / "piped"), category=args.category, setting="test")
    x = extract_features(load_images(config), **feature_options(config, progress=False))
    return x.reshape(x.shape[0], -1, x.shape[-1]).numpy()


def run(engine: str, path: str, out: str) -> None:
    x = np.load(path)
    n, p, d = x.shape
    flat = np.ascontiguousarray(x.reshape(n * p, d))
    t0 = time.perf_counter()
    if engine == "patchlab":
        import torch

        from patchlab.knn import nearest_per_group

        minima = nearest_per_group(torch.from_numpy(flat), torch.from_numpy(flat), p, False)
        minima = minima.numpy()
    elif engine == "faiss":
        import faiss

        minima = np.empty((n * p, n), dtype=np.float32)
        for j in range(n):
            index = faiss.IndexFlatL2(d)
            index.add(np.ascontiguousarray(x[j]))
            minima[:, j] = np.sqrt(np.maximum(index.search(flat, 1)[0][:, 0], 0))
    else:  # floor: one large matmul's speed
        import torch

        a = torch.from_numpy(flat)
        t0 = time.perf_counter()
        for r in range(0, len(a), 4096):
            torch.mm(a[r : r + 4096], a.T)
        minima = None
    seconds = time.perf_counter() - t0
    if minima is not None:
        np.save(out, minima)
    Path(out + ".json").write_text(json.dumps({"seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--category", default="PA_BDP01_TL")
    parser.add_argument("--random", action="store_true", help="seeded noise instead")
    parser.add_argument("--images", type=int, default=72)
    parser.add_argument("--size", type=int, default=28, help="patch grid side")
    parser.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return run(args.engine, args.path, args.out)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/x.npy"
        x = features(args)
        np.save(path, x)
        n, p, d = x.shape
        print(f"{n} images x {p} patches x {d} channels: {n * p} rows")
        found = {}
        for engine in ("faiss", "patchlab", "floor"):
            out = f"{tmp}/{engine}"
            cmd = [sys.executable, __file__, "--engine", engine, "--path", path, "--out", out]
            subprocess.run(cmd, check=True)
            found[engine] = json.loads(Path(out + ".json").read_text())["seconds"]
        gap = np.abs(np.load(f"{tmp}/patchlab.npy") - np.load(f"{tmp}/faiss.npy"))
        gap[np.arange(n * p), np.repeat(np.arange(n), p)] = 0  # own image: 0 in sqrt's steep part
        diff = gap.max()
        ours, peer, floor = found["patchlab"], found["faiss"], found["floor"]
        print(f"faiss (one IndexFlatL2 per image) {peer:8.2f} s")
        print(f"patchlab nearest_per_group        {ours:8.2f} s   {peer / ours:.2f}x faiss")
        print(f"float32 GEMM floor (2 N^2 d)       {floor:8.2f} s   patchlab at {floor / ours:.0%}")
        print(f"largest |difference| of the minima (other images): {diff:.2e}")


if __name__ == "__main__":
    main()
