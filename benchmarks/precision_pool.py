"""Reduced-precision kNN (TF32 / bf16 GEMM + exact float32 re-ranking) on real patch features:
which candidate pool makes the result equal to the float32 search?

    python benchmarks/precision_pool.py DATA --category C --setting test --device cuda

Prints, per precision and pool, the time and the share of queries whose k neighbour sets equal
the float32 ones (and the largest relative distance difference). With ``--float64`` every row,
the float32 search's too, is also compared with a float64 brute force (blocked ``cdist``): the
float32 GEMM form ||f||^2 + ||m||^2 - 2<f, m> is itself inexact for near neighbours, so a
disagreement with float32 is not necessarily an error of the reduced-precision search.
On the CPU ``tf32`` is plain float32, so ``--precisions tf32`` there measures the re-ranking.
"""

from __future__ import annotations

import argparse
import time

import torch

from patchlab.data import load_mvtec
from patchlab.features import extract_features, resolve_device
from patchlab.knn import Engine, knn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--category", default=None)
    parser.add_argument("--setting", default="test")
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", nargs="+", default=["tf32", "bf16"])
    parser.add_argument("--pools", nargs="+", type=int, default=[0, 8, 32, 128])
    parser.add_argument(
        "--max-patches", type=int, default=None, help="use the first N patches of the bank"
    )
    parser.add_argument("--float64", action="store_true", help="also compare with float64")
    args = parser.parse_args()

    device = resolve_device(args.device)
    images = load_mvtec(args.data, args.category, args.setting)
    feats = extract_features(images, device=device, progress=False)
    bank = feats.reshape(-1, feats.shape[-1])[: args.max_patches].to(device)
    print(f"{images.name}: {bank.shape[0]} patches x {bank.shape[1]}, k={args.k}, {device}")

    def timed(**kw):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        table = knn(bank, args.k, exclude="self", engine=Engine(**kw), progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return table, time.perf_counter() - t

    timed()  # warm-up
    exact, t_exact = timed()
    ref = exact.indices.sort(1).values
    truth = brute_float64(bank, args.k) if args.float64 else None

    def report(name: str, table, t: float) -> None:
        same = (table.indices.sort(1).values == ref).all(1).float().mean().item()
        rel = (table.distances - exact.distances).abs() / exact.distances.clamp_min(1e-6)
        line = (
            f"{name:<15} {t:7.2f} s   identical rows {same:.5f}   "
            f"max rel. distance diff {rel.max().item():.2e}"
        )
        if truth is not None:
            same64 = (table.indices.sort(1).values.cpu() == truth).all(1).float().mean().item()
            line += f"   identical to float64 {same64:.5f}"
        print(line)

    report("fp32", exact, t_exact)
    for precision in args.precisions:
        for pool in args.pools:
            table, t = timed(precision=precision, pool=pool)
            report(f"{precision} pool={pool}", table, t)


def brute_float64(bank: torch.Tensor, k: int, rows: int = 2048) -> torch.Tensor:
    """Sorted index sets of the k nearest neighbours (self excluded), in float64, blocked."""
    x = bank.double()
    out = torch.empty(len(x), k, dtype=torch.int64)
    for s in range(0, len(x), rows):
        d = torch.cdist(x[s : s + rows], x)
        d[torch.arange(d.shape[0]), torch.arange(s, s + d.shape[0])] = float("inf")
        out[s : s + rows] = d.topk(k, dim=1, largest=False).indices.sort(1).values.cpu()
    return out


if __name__ == "__main__":
    main()
