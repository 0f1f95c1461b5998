import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from patchlab.coreset import N_STARTS, _farthest_points_torch, greedy_coreset, project


def _benchmark(name: str):
    """A module of benchmarks/ loaded by its path (benchmarks/ stays off sys.path, where a
    script named like a package would shadow it: a benchmarks/distributed.py once hid Dask)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference = _benchmark("reference_coreset")
reference_greedy = reference.reference_greedy


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(20, 256, generator=g) * 4
    return centres[torch.randint(0, 20, (3000,), generator=g)] + torch.randn(3000, 256, generator=g)


def test_same_picks_as_the_reference_sampler(bank):
    picked = greedy_coreset(bank, 0.1, seed=3, progress=False)
    projected = project(bank, seed=3).numpy()
    starts = np.random.default_rng(3).choice(3000, N_STARTS, replace=False)
    assert torch.equal(picked, torch.from_numpy(reference_greedy(projected, starts, 300)))


def test_the_gpu_loop_picks_as_the_reference_torch_loop(bank):
    """The loop CUDA runs (no host round trip per pick), here on CPU tensors: the same picks
    as the reference sampler's torch loop (one ``.item()`` per pick) while no float32 near-tie
    decides, and a coreset as good. tests/test_cuda.py runs it on a GPU."""
    projected = project(bank, seed=3)
    starts = np.random.default_rng(3).choice(3000, N_STARTS, replace=False)
    ours = _farthest_points_torch(projected, starts, 300, progress=False)
    ref = reference.reference_greedy_torch(projected, starts, 300)
    assert len(np.unique(ours)) == 300
    assert np.array_equal(ours[:100], ref[:100])

    def radius(rows):
        return float(torch.cdist(projected, projected[torch.from_numpy(rows)]).min(1).values.max())

    assert radius(ours) == pytest.approx(radius(ref), rel=0.02)


def test_coreset_covers_the_bank(bank):
    """Greedy k-centre: the covering radius shrinks as the coreset grows, and the coreset
    spreads over every cluster (a random subset of the same size covers worse)."""
    radii = []
    for ratio in (0.01, 0.05, 0.2):
        rows = greedy_coreset(bank, ratio, progress=False)
        assert len(rows) == int(3000 * ratio) and len(set(rows.tolist())) == len(rows)
        radii.append(torch.cdist(bank, bank[rows]).min(1).values.max())
    assert radii[0] > radii[1] > radii[2]
    random_rows = torch.randperm(3000, generator=torch.Generator().manual_seed(0))[:150]
    assert torch.cdist(bank, bank[random_rows]).min(1).values.max() > radii[1]


def test_ratio_checks(bank):
    assert torch.equal(greedy_coreset(bank, 1.0, progress=False), torch.arange(3000))
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="coreset ratio must lie in"):
            greedy_coreset(bank, bad, progress=False)


def test_smaller_ratio_is_a_prefix(bank):
    """The cache cuts a longer greedy sequence for a smaller ratio: that must equal a fresh run."""
    long = greedy_coreset(bank, 0.2, seed=1, progress=False)
    short = greedy_coreset(bank, 0.05, seed=1, progress=False)
    assert torch.equal(long[: len(short)], short)
