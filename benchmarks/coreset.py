"""Greedy coreset: patchlab against the reference sampler, measured in the same run.

    python benchmarks/coreset.py                       # N = 100 000, d = 1024, ratio 0.25
    python benchmarks/coreset.py --n 20000 --ratio 0.1
    python benchmarks/coreset.py --device cuda --n 1050000 --d 152 --ratio 0.02

Both get the same seeded random projection (128-d) and the same starting points; the script
prints both times, their ratio and whether the picked indices are identical. The reference is
patchcore-inspection's ApproximateGreedyCoresetSampler loop in plain numpy
(benchmarks/reference_coreset.py). With ``--device cuda`` both run on the GPU: the reference
is then the same loop in torch, with its host round trip per pick (``.item()``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from reference_coreset import reference_greedy, reference_greedy_torch

from patchlab.coreset import N_STARTS, _farthest_points, project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((256, args.d), dtype=np.float32) * 3
    bank = centres[rng.integers(0, 256, args.n)] + rng.standard_normal(
        (args.n, args.d), dtype=np.float32
    )
    projected = project(torch.from_numpy(bank).to(args.device), seed=args.seed)
    starts = np.random.default_rng(args.seed).choice(args.n, N_STARTS, replace=False)
    m = int(args.n * args.ratio)
    print(
        f"N={args.n} d={args.d} -> 128, ratio={args.ratio} ({m} picks), "
        f"device={args.device}, threads={torch.get_num_threads()}"
    )

    cuda = projected.is_cuda

    def timed(fn, *a):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(*a)
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    ours, t_ours = timed(_farthest_points, projected, starts, m, False)
    if cuda:
        ref, t_ref = timed(reference_greedy_torch, projected, starts, m)
    else:
        ref, t_ref = timed(reference_greedy, projected.numpy(), starts, m)
    same = np.array_equal(ours, ref)
    first_diff = "none" if same else int(np.argmax(ours != ref))
    print(f"patchlab  {t_ours:8.2f} s")
    print(f"reference {t_ref:8.2f} s")
    print(
        f"speed-up  {t_ref / t_ours:8.2f} x   identical picks: {same} (first difference: "
        f"{first_diff})"
    )


if __name__ == "__main__":
    main()
