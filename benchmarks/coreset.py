"""Greedy coreset: patchlab against the reference sampler, measured in the same run.

    python benchmarks/coreset.py                       # N = 100 000, d = 1024, ratio 0.25
    python benchmarks/coreset.py --n 20000 --ratio 0.1

Both get the same seeded random projection (128-d) and the same starting points; the script
prints both times, their ratio and whether the picked indices are identical. The reference is
patchcore-inspection's ApproximateGreedyCoresetSampler loop in plain numpy
(benchmarks/reference_coreset.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from reference_coreset import reference_greedy

from patchlab.coreset import N_STARTS, _farthest_points, project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((256, args.d), dtype=np.float32) * 3
    bank = centres[rng.integers(0, 256, args.n)] + rng.standard_normal(
        (args.n, args.d), dtype=np.float32
    )
    projected = project(torch.from_numpy(bank), seed=args.seed)
    starts = np.random.default_rng(args.seed).choice(args.n, N_STARTS, replace=False)
    m = int(args.n * args.ratio)
    print(
        f"N={args.n} d={args.d} -> 128, ratio={args.ratio} ({m} picks), "
        f"threads={torch.get_num_threads()}"
    )

    t = time.perf_counter()
    ours = _farthest_points(projected, starts, m, progress=False)
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    ref = reference_greedy(projected.numpy(), starts, m)
    t_ref = time.perf_counter() - t
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
