"""Self-kNN of a patch bank: patchlab against faiss, scikit-learn, KeOps and the GEMM floor.

Every backend runs in its own subprocess on the same data, so that its peak resident memory can
be read (``ru_maxrss``) and one backend's allocations do not inflate another's.

    python benchmarks/knn.py                                  # the cases of docs/performance.md
    python benchmarks/knn.py --cases demo:31360x25 mixture:50000x1024x100
    python benchmarks/knn.py --backends torch faiss           # a subset

Banks (``NAME:N x K``, or ``mixture:N x d x K``):

- ``demo``: the pretrained EfficientNet-Lite0 features (152-d) of the demo's four Test sets
  (125 440 patches), N rows evenly spread; ``demo-wrn``: the same images, WideResNet-50-2 with
  seeded random weights (1024-d; its ImageNet weights cannot be downloaded here).
- ``tile``, ``tile-wrn``: the same two backbones on the magnetic-tile Test set
  (``../shared/data``, 456 288 patches).
- ``tile224``, ``tile320``, ``tile448``: every patch of whole tile images (evenly spread over
  the Test set, as many as N needs), as a run's bank holds them, at 224 px (256 resize, 224
  crop: 784 patches an image), 320 px (1 600) and 448 px (3 136); pretrained Lite0 (152-d).
- ``mixture``: a seeded Gaussian mixture (64 clusters), unusually kind to block skipping.

Features come from patchlab's cache (``$PATCHLAB_CACHE``), computed once. Printed per case and
backend: seconds, the speed-up over faiss (faiss' seconds / these; above 1: faster), peak
extra resident memory over the data, the share of rows whose k neighbour set equals faiss',
and the share of rows (on a sample of ``--check`` rows) whose set equals a float64 brute
force. The GEMM floors
(``floor``: float32, ``floor-bf16``: bf16 products) are the full N x N distance GEMM
(2 N^2 d FLOPs, what faiss computes; patchlab's self-kNN computes half) at the GFLOP/s of a
4096 x 8192 block measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_CASES = (  # issue 20's table: whole tile images at 224, 320 and 448 px; 1024-d
    "tile224:87808x25",
    "tile224:87808x100",
    "tile224:87808x200",
    "tile320:179200x25",
    "tile320:179200x100",
    "tile448:351232x25",
    "tile-wrn:50000x100",
)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
# torch-noskip: the CPU search without skipping block pairs (Engine(skip=False))
BACKENDS = (
    "torch",
    "torch-noskip",
    "torch-tf32",
    "torch-bf16",
    "keops",
    "faiss",
    "sklearn",
    "floor",
    "floor-bf16",
)
DEFAULT_BACKENDS = ("torch", "faiss", "floor", "floor-bf16")
KEOPS_LIMIT_S = 600.0


def make_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32: 64 Gaussian clusters of unequal spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d), dtype=np.float32) * 3
    spread = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    label = rng.integers(0, 64, n)
    return centres[label] + spread[label, None] * rng.standard_normal((n, d), dtype=np.float32)


def rss_mb() -> float:
    """Resident memory now, in MB; also resets the peak (VmHWM) to it, so that
    :func:`peak_mb` reads the peak since this call."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    """The peak resident memory (VmHWM) since the last :func:`rss_mb`, in MB (getrusage's
    maxrss would count the parent's memory at fork: it is kept across exec)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def load_bank(path: str, n: int) -> np.ndarray:
    """(n, d) float32: n rows spread evenly over a saved feature array (any shape (..., d)),
    e.g. a patchlab feature cache file ``features-<key>.npy``."""
    f = np.load(path, mmap_mode="r")
    f = f.reshape(-1, f.shape[-1])
    if n > len(f):
        raise ValueError(f"{path} holds {len(f)} rows, fewer than N = {n}")
    return np.ascontiguousarray(f[:: len(f) // n][:n], dtype=np.float32)


def run_backend(
    backend: str, n: int, d: int, k: int, device: str, limit: float, bank: str | None = None
) -> dict:
    """Run one backend in this process; returns seconds, memory and the neighbour indices."""
    x = make_bank(n, d) if bank is None else load_bank(bank, n)
    # import every library first, so that "peak extra" counts the search's memory only
    # (faiss is absent on the GPU machine: there the peer is patchlab's own fp32 torch run)
    import importlib.util

    import sklearn.neighbors  # noqa: F401
    import torch  # noqa: F401

    if importlib.util.find_spec("faiss") is not None:
        import faiss  # noqa: F401

    import patchlab.knn  # noqa: F401

    before = rss_mb()
    t0 = time.perf_counter()
    extra: dict = {}
    if backend.startswith("torch") or backend == "keops":
        import torch

        from patchlab.knn import Engine, knn

        name, _, precision = backend.partition("-")
        skip = None
        if precision == "noskip":
            skip, precision = False, "fp32"
        q = torch.from_numpy(x).to(device)
        engine = Engine(backend=name, precision=precision or "fp32", skip=skip)
        kw = dict(engine=engine, progress=False)
        if name == "torch":  # load the compiled merge and re-rank (numba's disk cache) first
            knn(
                q[:600], k, exclude="self", engine=Engine(skip=True, block_size=256), progress=False
            )
            before = rss_mb()
        if device == "cuda":  # warm-up: CUDA context, cuBLAS handles, KeOps compilation
            knn(q[:4096], k, exclude="self", **kw)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if backend == "keops":
            # time a slice of the queries first; skip the full size if it would run too long
            m = max(500, n // 50)
            t = time.perf_counter()
            knn(q[:m], k, q, exclude="none", engine=engine, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            projected = (time.perf_counter() - t) * n / m
            if projected > limit:
                return {"skipped": f"projected {projected:.0f} s (> {limit:.0f} s)"}
        t0 = time.perf_counter()
        table = knn(q, k, exclude="self", **kw)
        if device == "cuda":
            torch.cuda.synchronize()
            extra = {"gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20}
        idx = table.indices.cpu().numpy()
    elif backend == "faiss":
        import faiss

        index = faiss.IndexFlatL2(d)
        index.add(x)
        _, idx = index.search(x, k + 1)  # squared distances; the first hit is the query itself
        idx = _drop_self(idx, k)
    elif backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", n_jobs=-1).fit(x)
        idx = nn.kneighbors(return_distance=False)
    elif backend.startswith("floor"):
        import torch

        from patchlab.knn._precision import bf16_block

        a, b = torch.randn(4096, d), torch.randn(8192, d)
        norm, out = torch.zeros(8192), torch.empty(4096, 8192)  # no allocation in the loop
        if backend == "floor":  # float32: the GEMM form patchlab's fp32 pass runs
            gemm = lambda: torch.addmm(norm[None], a, b.T, alpha=-2.0, out=out)  # noqa: E731
        else:  # bf16 products, float32 sums: patchlab's bf16 pass
            a, b = a.bfloat16(), b.bfloat16()
            gemm = lambda: bf16_block(a, b, norm, out=out)  # noqa: E731
        gemm()
        best = min(_timed(gemm) for _ in range(3))
        gflops = 2 * 4096 * 8192 * d / best / 1e9
        # the seconds of the full N x N distance GEMM at that rate (faiss computes all of it;
        # patchlab's self-kNN half of it)
        return {"seconds": 2 * n * n * d / gflops / 1e9, "gflops": gflops}
    seconds = time.perf_counter() - t0
    peak = peak_mb()
    np.save(f"/tmp/knn_bench_{backend}_{n}_{d}_{k}.npy", idx.astype(np.int64))
    return {"seconds": seconds, "peak_extra_mb": peak - before, **extra}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _drop_self(idx: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own index (or the last column where ties put it elsewhere)."""
    rows = np.arange(idx.shape[0])[:, None]
    keep = idx != rows
    keep[keep.sum(1) > k, -1] = False
    return idx[keep].reshape(idx.shape[0], k)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each row's neighbour set found by both."""
    return float(np.mean([len(np.intersect1d(r, s)) / len(r) for r, s in zip(a, b, strict=True)]))


BANKS = {  # name: (backbone, weights, data root, categories, (resize, crop))
    "demo": ("efficientnet_lite0", "imagenet", None, ("brick", "gravel", "grass", "washer"), None),
    "demo-wrn": ("wide_resnet50_2", "none", None, ("brick", "gravel", "grass", "washer"), None),
    "tile": ("efficientnet_lite0", "imagenet", SHARED, ("magnetic_tile",), None),
    "tile-wrn": ("wide_resnet50_2", "none", SHARED, ("magnetic_tile",), None),
    # whole images, as a run's bank holds them: 112 tile images are 87 808 patches at 224 px,
    # 179 200 at 320 px and 351 232 at 448 px
    "tile224": ("efficientnet_lite0", "imagenet", SHARED, ("magnetic_tile",), (256, 224)),
    "tile320": ("efficientnet_lite0", "imagenet", SHARED, ("magnetic_tile",), (320, 320)),
    "tile448": ("efficientnet_lite0", "imagenet", SHARED, ("magnetic_tile",), (448, 448)),
}


def prepare_bank(name: str, n: int) -> str:
    """A .npy of n rows of a real bank's Test-set patch features: rows evenly spread over
    every image, or (banks with an input size) every patch of images evenly spread over the
    set, as many as n rows need."""
    import torch

    from patchlab.data import load_mvtec
    from patchlab.demo import demo_path, make_demo_data
    from patchlab.features import extract_features

    backbone, weights, root, categories, size = BANKS[name]
    path = f"/tmp/knn_bench_bank_{name}_{n}.npy"
    if Path(path).is_file():
        return path
    if root is None:
        root = make_demo_data(demo_path())
    elif not Path(root, categories[0]).is_dir():
        raise FileNotFoundError(f"{root / categories[0]} is not here: bank {name!r} needs it")
    parts = []
    for category in categories:
        images = load_mvtec(root, category, "test")
        kw = {} if size is None else {"resize": size[0], "crop": size[1]}
        if size is not None:  # whole images: as many as n rows need, evenly spread
            grid = extract_features(images.subset([0]), backbone=backbone, **kw).shape[1:3]
            need = -(-n // (grid[0] * grid[1]))
            if need > len(images):
                raise ValueError(f"bank {name!r} holds {len(images)} images, fewer than {need}")
            images = images.subset(np.linspace(0, len(images) - 1, need).round().astype(int))
        feats = extract_features(images, backbone=backbone, weights=weights, progress=True, **kw)
        parts.append(feats.reshape(-1, feats.shape[-1]))
    full = torch.cat(parts).numpy()
    if n > len(full):
        raise ValueError(f"bank {name!r} holds {len(full)} rows, fewer than N = {n}")
    rows = full[:n] if size is not None else full[:: len(full) // n][:n]
    np.save(path, np.ascontiguousarray(rows))
    return path


def float64_agreement(x: np.ndarray, k: int, found: dict, rows: int, seed: int = 0) -> dict:
    """Share of ``rows`` sampled rows whose k neighbour set (self excluded) equals a float64
    brute force's, for every backend's saved indices."""
    import torch

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), min(rows, len(x)), replace=False))
    bank = torch.from_numpy(x).double()
    ref = []
    for s in range(0, len(sample), 256):
        part = sample[s : s + 256]
        d = torch.cdist(bank[part], bank)
        d[torch.arange(len(part)), torch.from_numpy(part)] = float("inf")
        ref.append(d.topk(k, dim=1, largest=False).indices.sort(1).values.numpy())
    ref = np.concatenate(ref)
    return {b: float((np.sort(idx[sample], 1) == ref).all(1).mean()) for b, idx in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", type=int, default=1000, help="rows checked against float64")
    parser.add_argument(
        "--keops-limit",
        type=float,
        default=KEOPS_LIMIT_S,
        help="skip KeOps where its projected time exceeds this (seconds)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--bank", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backend, n, d, k = args.child[0], *map(int, args.child[1:])
        print(json.dumps(run_backend(backend, n, d, k, args.device, args.keops_limit, args.bank)))
        return

    print(f"device={args.device} threads={os.cpu_count()} python={sys.version.split()[0]}")
    print(
        f"{'case':>24}  {'backend':>12}  {'seconds':>8}  {'x faiss':>8}  {'peak MB':>8}  "
        f"{'= faiss':>7}  {'= float64':>9}"
    )
    for case in args.cases:
        try:
            run_case(case, args)
        except (FileNotFoundError, ValueError) as err:
            print(f"{case:>24}  skipped: {err}")


def run_case(case: str, args: argparse.Namespace) -> None:
    name, _, size = case.partition(":")
    dims = list(map(int, size.split("x")))
    if name == "mixture":
        (n, d, k), bank = dims, None
    else:
        (n, k), bank = dims, prepare_bank(name, dims[0])
        d = np.load(bank, mmap_mode="r").shape[1]
    results = {}
    order = ["faiss"] + [b for b in args.backends if b != "faiss"]
    for backend in order if "faiss" in args.backends else args.backends:
        cmd = [sys.executable, __file__, "--child", backend, str(n), str(d), str(k)]
        cmd += ["--device", args.device, *(["--bank", bank] if bank else [])]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            results[backend] = {"skipped": out.stderr.strip().splitlines()[-1][:120]}
        else:
            results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    found = {
        b: np.load(f"/tmp/knn_bench_{b}_{n}_{d}_{k}.npy")
        for b, r in results.items()
        if "skipped" not in r and not b.startswith("floor")
    }
    x = make_bank(n, d) if bank is None else np.load(bank)
    exact = float64_agreement(x, k, found, args.check) if args.check else {}
    base = results.get("faiss", {}).get("seconds")
    label = f"{name} {n}x{d}, {k}"
    for backend, r in results.items():
        if "skipped" in r:
            print(f"{label:>24}  {backend:>12}  skipped: {r['skipped']}")
            continue
        ratio = f"{base / r['seconds']:8.2f}" if base else "     n/a"
        peak = f"{r['peak_extra_mb']:8.0f}" if "peak_extra_mb" in r else "       -"
        same = "-"
        if backend in found and "faiss" in found and backend != "faiss":
            same = f"{agreement(found[backend], found['faiss']):.5f}"
        f64 = f"{exact[backend]:.4f}" if backend in exact else "-"
        note = f"  ({r['gflops']:.0f} GFLOP/s)" if "gflops" in r else ""
        if "gpu_peak_mb" in r:
            note += f"  (GPU peak {r['gpu_peak_mb']:.0f} MB)"
        print(
            f"{label:>24}  {backend:>12}  {r['seconds']:8.2f}  {ratio}  {peak}  {same:>7}  "
            f"{f64:>9}{note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
