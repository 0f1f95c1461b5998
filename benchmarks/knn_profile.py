"""Where a self-kNN's time goes: GEMM, merge (diagonal and both-way blocks), re-rank, the rest.

    python benchmarks/knn_profile.py /tmp/knn_bench_bank_tile224_87808.npy --k 25 100
    python benchmarks/knn_profile.py BANK.npy --k 25 --precision bf16

BANK is an (N, d) float32 .npy (``benchmarks/knn.py`` leaves its banks in /tmp). One cProfile
run per K, after a warm-up that loads the compiled kernels; the parts are cProfile's own times
of the functions doing each job, so they add up to the total less Python's overhead. The
GEMM's rate is printed beside the float32 GEMM of one 2048 x 2048 block in the same run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import numpy as np
import torch

PARTS = {  # part: substrings of the profiled function names doing it
    "GEMM": ("addmm", "bf16_block", "method 'mm'"),
    "merge, diagonal blocks": ("_merge_rows",),
    "merge, both-way blocks": ("_merge_both",),
    "re-rank (float64)": ("_rerank_cpu", "_distances_torch", "argsort", "gather"),
    "heaps -> table": ("_unpack",),
    "exclusion masks": ("mask_excluded", "masked_fill_"),
    "certification": ("uncertain_rows", "_centred_sq_norms", "_mean64"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bank")
    parser.add_argument("--k", type=int, nargs="+", default=[25, 100])
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    from patchlab.knn import Engine, knn

    x = torch.from_numpy(np.load(args.bank))
    n, d = x.shape
    knn(x[:600], 5, engine=Engine(block_size=256), progress=False)  # compile / load kernels
    a, out = torch.randn(2048, d), torch.empty(2048, 2048)
    torch.mm(a, a.T, out=out)
    t = time.perf_counter()
    torch.mm(a, a.T, out=out)
    floor = 2 * 2048 * 2048 * d / (time.perf_counter() - t) / 1e9
    print(f"bank {n} x {d}, float32 GEMM of one block: {floor:.0f} GFLOP/s")
    for k in args.k:
        prof = cProfile.Profile()
        t = time.perf_counter()
        prof.enable()
        knn(x, k, engine=Engine(precision=args.precision), progress=False)
        prof.disable()
        total = time.perf_counter() - t
        stats = pstats.Stats(prof).stats
        own = {part: 0.0 for part in PARTS}
        for (_, _, name), (_, _, tottime, _, _) in stats.items():
            for part, keys in PARTS.items():
                if any(key in name for key in keys):
                    own[part] += tottime
                    break
        print(f"K = {k}: {total:.2f} s")
        for part, seconds in own.items():
            note = ""
            if part == "GEMM" and seconds:
                note = f"  ({n * n * d / seconds / 1e9:.0f} GFLOP/s on the symmetric half)"
            print(f"  {part:24s} {seconds:6.2f} s  {seconds / total:5.1%}{note}")
        rest = total - sum(own.values())
        print(f"  {'the rest':24s} {rest:6.2f} s  {rest / total:5.1%}")


if __name__ == "__main__":
    main()
