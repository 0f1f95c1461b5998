"""The kNN's precision: the certified bf16 fast pass, float64 in and out, features far outside
float32's range; each against a float64 brute force (torch.cdist in float64)."""

import pytest
import torch

import patchlab.knn as knn_module
from patchlab.knn import Engine, knn
from patchlab.knn._exact import uncertain_rows
from patchlab.knn._gemm import search
from patchlab.knn._precision import bf16_pool, error_coefficients


def bank(n=900, d=32, seed=0, offset=100.0, spread=5.0):
    """Patches in a few tight clusters, far from the origin (large norms cancel in float32)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(7, d, generator=g) * spread
    x = centres[torch.randint(0, 7, (n,), generator=g)] + torch.randn(n, d, generator=g)
    return x + offset


def float64_sets(q, b, k, exclude="self", groups=None):
    """Sorted index sets of the k nearest by a float64 brute force (self-kNN when b is q)."""
    d = torch.cdist(q.double(), b.double())
    if exclude == "self":
        d.fill_diagonal_(float("inf"))
    elif exclude == "image":
        d[groups[:, None] == groups[None, :]] = float("inf")
    kk = k + 1 if exclude == "nearest" else k
    vals, idx = d.topk(kk, dim=1, largest=False)
    if exclude == "nearest":
        vals, idx = vals[:, 1:], idx[:, 1:]
    return idx.sort(1).values, vals


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
@pytest.mark.parametrize("pool", [None, 0, 3])  # None: sized from the bound on a sample
def test_bf16_sets_equal_float64(exclude, pool):
    """Whatever the pool, rows the bf16 bound cannot certify are searched again: exact sets."""
    x = bank()
    groups = torch.arange(len(x)) // 15
    engine = Engine(precision="bf16", pool=pool, block_size=256)
    nb = knn(x, 7, exclude=exclude, query_groups=groups, engine=engine, progress=False)
    ref_sets, ref_d = float64_sets(x, x, 7, exclude, groups)
    assert torch.equal(nb.indices.sort(1).values, ref_sets)
    torch.testing.assert_close(nb.distances.double(), ref_d, rtol=1e-6, atol=0)


def test_bf16_with_a_separate_bank_and_ids():
    x = bank(600, seed=1)
    q, b = x[:200], x[150:]  # 50 queries are also in the bank, under the same ids
    nb = knn(
        q,
        5,
        b,
        exclude="self",
        query_ids=torch.arange(200),
        bank_ids=torch.arange(150, 600),
        engine=Engine(precision="bf16", pool=0, block_size=128),
        progress=False,
    )
    d = torch.cdist(q.double(), b.double())
    d[torch.arange(150, 200), torch.arange(0, 50)] = float("inf")
    assert torch.equal(nb.indices.sort(1).values, d.topk(5, largest=False).indices.sort(1).values)


@pytest.mark.parametrize("d", [16, 152])
def test_bf16_error_bound_holds_for_every_candidate(d):
    """Bound (B) of _precision against the fast pass's own distances and float64 ones."""
    x = bank(700, d=d, seed=2, offset=3.0)
    engine = Engine(precision="bf16", pool=20, block_size=128).resolve(
        torch.device("cpu"), len(x), True, d
    )
    fast, cand = search(x, x, 20, True, (None, None), (None, None), engine, False)
    exact = ((x[cand].double() - x[:, None].double()) ** 2).sum(2)
    mu = x.double().mean(0)
    f = (x.double() - mu).norm(dim=1)[:, None]
    m = (x.double() - mu).norm(dim=1)[cand]
    c_x, c_n = error_coefficients("bf16", d)
    err = c_x * f * m + c_n * (f**2 + m**2)
    gap = (fast.double() - exact).abs()
    assert (gap <= err).all()
    assert gap.max() > 0.01 * err.max()  # the bound is not vacuous: errors of its order occur


def test_bf16_pool_certifies_most_rows():
    """The sampled pool is what the bound asks for: with it, few rows need the float64 search
    (without any pool, most do). Clusters as loose as real features' (on tight ones, bf16's
    rounding is as large as the neighbour distances and no pool certifies)."""
    x = bank(2000, d=64, seed=3, offset=0.0, spread=1.0)
    k = 10
    pool = bf16_pool(x, x, k)
    assert 8 <= pool <= 8 * k
    counts = {}
    for p in (0, pool):
        engine = Engine(precision="bf16", pool=p, block_size=512).resolve(
            torch.device("cpu"), len(x), True, 64
        )
        fast, cand = search(x, x, k + p, True, (None, None), (None, None), engine, False)
        exact = ((x[cand].double() - x[:, None].double()) ** 2).sum(2).sort(1).values
        counts[p] = int(uncertain_rows(fast, cand, exact[:, k - 1], x, x, "bf16").sum())
    assert counts[pool] <= 0.05 * len(x) < counts[0]


def test_auto_takes_bf16_only_where_it_pays(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr("patchlab.knn._precision.cpu_has_bf16", lambda: False)
    assert Engine().resolve(cpu, 100_000, True, 152).precision == "fp32"
    monkeypatch.setattr("patchlab.knn._precision.cpu_has_bf16", lambda: True)
    monkeypatch.setattr("patchlab.knn._precision.bf16_speedup", lambda d: 1.2)
    assert Engine().resolve(cpu, 100_000, True, 152).precision == "fp32"
    monkeypatch.setattr("patchlab.knn._precision.bf16_speedup", lambda d: 2.8)
    assert Engine().resolve(cpu, 100_000, True, 152).precision == "bf16"
    assert Engine().resolve(cpu, 5_000, True, 152).precision == "fp32"  # small bank
    assert Engine().resolve(torch.device("meta"), 100_000, True, 152).precision == "fp32"


def test_auto_falls_back_to_fp32_when_the_pool_is_too_wide(monkeypatch):
    """auto's bf16 pass is dropped when the bound asks for more than 2 k extra candidates; the
    table is then the float32 path's (and exact either way)."""
    x = bank(800, seed=4)
    monkeypatch.setattr(knn_module, "bf16_pays", lambda device, n, d: True)
    seen = []
    monkeypatch.setattr(knn_module, "bf16_pool", lambda q, b, k: seen.append(k) or 10 * k)
    chosen = []
    real = knn_module.uncertain_rows

    def spy(*args):
        chosen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(knn_module, "uncertain_rows", spy)
    nb = knn(x, 5, engine=Engine(block_size=256), progress=False)
    assert seen == [5] and chosen == ["fp32"]
    assert torch.equal(nb.indices.sort(1).values, float64_sets(x, x, 5)[0])


def test_float64_features_give_float64_distances():
    x = bank(400, seed=5).double()
    nb = knn(x, 6, progress=False)
    assert nb.distances.dtype == torch.float64
    ref_sets, ref_d = float64_sets(x, x, 6)
    assert torch.equal(nb.indices.sort(1).values, ref_sets)
    torch.testing.assert_close(nb.distances, ref_d, rtol=1e-12, atol=0)
    assert knn(x.float(), 6, progress=False).distances.dtype == torch.float32


@pytest.mark.parametrize("scale", [1e39, 1e-39, 1e200, 1e-200])
def test_features_beyond_float32_range(scale):
    """float64 features whose squares overflow float32 (or float64) get finite, exact
    distances, never NaN."""
    x = bank(300, seed=6, offset=0.0).double()
    nb = knn(x * scale, 4, progress=False)
    ref_sets, ref_d = float64_sets(x, x, 4)
    assert torch.isfinite(nb.distances).all()
    assert torch.equal(nb.indices.sort(1).values, ref_sets)
    torch.testing.assert_close(nb.distances / scale, ref_d, rtol=1e-12, atol=0)


def test_float32_features_of_large_magnitude():
    x = bank(300, seed=7, offset=0.0)
    nb = knn(x * 1e30, 4, progress=False)
    assert torch.isfinite(nb.distances).all()
    assert torch.equal(nb.indices.sort(1).values, float64_sets(x, x, 4)[0])
