"""Self-kNN of a patch bank: patchlab against faiss, scikit-learn and the GEMM floor.

Every backend runs in its own subprocess on the same seeded data, so that its peak resident
memory can be read (``ru_maxrss``) and one backend's allocations do not inflate another's.

    python benchmarks/knn.py                           # the sizes of docs/performance.md
    python benchmarks/knn.py --sizes 50000x1024x100    # one size: N x d x K
    python benchmarks/knn.py --backends torch faiss    # a subset

Data: a seeded Gaussian mixture (64 clusters; patch features cluster the same way), float32,
or with ``--bank FILE.npy`` real features (e.g. a patchlab feature cache file), N rows evenly
spread over the file. The CPU self-kNN skips block pairs that cannot hold neighbours, so its
speed depends on how clustered the data are: measure both.
Printed per size and backend: seconds, ratio to faiss (> 1: slower than faiss), peak extra
resident memory over the data itself, and the share of neighbours identical to faiss' (up to
ties). The GEMM floor is the distance FLOPs (2 N^2 d) divided by the GFLOP/s of one large
float32 matmul measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

DEFAULT_SIZES = ("20000x1536x100", "50000x1024x100", "50000x64x10")
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
)
DEFAULT_BACKENDS = ("torch", "keops", "faiss", "sklearn", "floor")
KEOPS_LIMIT_S = 600.0


def make_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n, d) float32: 64 Gaussian clusters of unequal spread."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, d), dtype=np.float32) * 3
    spread = rng.uniform(0.5, 1.5, 64).astype(np.float32)
    label = rng.integers(0, 64, n)
    return centres[label] + spread[label, None] * rng.standard_normal((n, d), dtype=np.float32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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
    elif backend == "floor":
        import torch

        a = torch.randn(4096, d)
        b = torch.randn(8192, d)
        a @ b.T
        reps, t = 3, time.perf_counter()
        for _ in range(reps):
            a @ b.T
        gflops = 2 * 4096 * 8192 * d * reps / (time.perf_counter() - t) / 1e9
        extra = {"gflops": gflops}
        return {"seconds": 2 * n * n * d / gflops / 1e9, **extra}
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.save(f"/tmp/knn_bench_{backend}_{n}_{d}_{k}.npy", idx.astype(np.int64))
    return {"seconds": seconds, "peak_extra_mb": peak - before, **extra}


def _drop_self(idx: np.ndarray, k: int) -> np.ndarray:
    """Remove each row's own index (or the last column where ties put it elsewhere)."""
    rows = np.arange(idx.shape[0])[:, None]
    keep = idx != rows
    keep[keep.sum(1) > k, -1] = False
    return idx[keep].reshape(idx.shape[0], k)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of each row's neighbour set found by both."""
    return float(np.mean([len(np.intersect1d(r, s)) / len(r) for r, s in zip(a, b, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--backends", nargs="+", default=list(DEFAULT_BACKENDS), choices=BACKENDS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--bank",
        default=None,
        help="real features instead of the Gaussian mixture: a .npy array (..., d), such as a "
        "patchlab feature cache file; N rows are taken evenly spread, d is the file's",
    )
    parser.add_argument(
        "--keops-limit",
        type=float,
        default=KEOPS_LIMIT_S,
        help="skip KeOps where its projected time exceeds this (seconds)",
    )
    parser.add_argument(
        "--child", nargs=4, metavar=("BACKEND", "N", "D", "K"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        backend, n, d, k = args.child[0], *map(int, args.child[1:])
        print(json.dumps(run_backend(backend, n, d, k, args.device, args.keops_limit, args.bank)))
        return

    data = args.bank or "Gaussian mixture (64 clusters)"
    print(f"device={args.device} threads={os.cpu_count()} python={sys.version.split()[0]}")
    print(f"data: {data}")
    header = (
        f"{'N x d, K':>18}  {'backend':>8}  {'seconds':>8}  {'vs faiss':>8}  {'peak MB':>8}  same"
    )
    print(header)
    for size in args.sizes:
        n, d, k = map(int, size.split("x"))
        results = {}
        order = ["faiss"] + [b for b in args.backends if b != "faiss"]
        for backend in order if "faiss" in args.backends else args.backends:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                backend,
                str(n),
                str(d),
                str(k),
                "--device",
                args.device,
                *(["--bank", args.bank] if args.bank else []),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                results[backend] = {"skipped": out.stderr.strip().splitlines()[-1][:120]}
            else:
                results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results.get("faiss", {}).get("seconds")
        peer = "faiss" if "faiss" in results else "torch"  # whose neighbours "same" compares to
        ref = f"/tmp/knn_bench_{peer}_{n}_{d}_{k}.npy"
        for backend, r in results.items():
            label = f"{n}x{d}, {k}"
            if "skipped" in r:
                print(f"{label:>18}  {backend:>8}  skipped: {r['skipped']}")
                continue
            ratio = f"{r['seconds'] / base:8.2f}" if base else "     n/a"
            peak = f"{r['peak_extra_mb']:8.0f}" if "peak_extra_mb" in r else "       -"
            mine = f"/tmp/knn_bench_{backend}_{n}_{d}_{k}.npy"
            same = "-"
            if backend != peer and os.path.exists(ref) and os.path.exists(mine):
                same = f"{agreement(np.load(mine), np.load(ref)):.5f}"
            note = f"  ({r['gflops']:.0f} GFLOP/s)" if "gflops" in r else ""
            if "gpu_peak_mb" in r:
                note += f"  (GPU peak {r['gpu_peak_mb']:.0f} MB)"
            print(f"{label:>18}  {backend:>8}  {r['seconds']:8.2f}  {ratio}  {peak}  {same}{note}")


if __name__ == "__main__":
    main()
