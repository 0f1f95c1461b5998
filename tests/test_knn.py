"""The blocked kNN against brute force (float64 distance matrices, tiny sizes only)."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from patchlab.knn import knn


def brute(q, b, k, mask=None):
    d = torch.cdist(q.double(), b.double())
    if mask is not None:
        d[mask] = float("inf")
    return d.topk(k, dim=1, largest=False)


def assert_same(nb, ref_d, ref_i, rtol=1e-4):
    """Same distances (relative tolerance) and the same neighbours wherever there is no tie."""
    torch.testing.assert_close(nb.distances.double(), ref_d, rtol=rtol, atol=1e-4)
    gap = (ref_d[:, 1:] - ref_d[:, :-1]).abs()
    clear = torch.cat([gap[:, :1], torch.minimum(gap[:, 1:], gap[:, :-1]), gap[:, -1:]], 1) > 1e-3
    assert (nb.indices[clear] == ref_i[clear]).all()


@pytest.fixture
def clustered():
    """Patches in a few tight clusters (as real features are), so thresholds prune blocks."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(7, 32, generator=g) * 5
    x = centres[torch.randint(0, 7, (900,), generator=g)] + torch.randn(900, 32, generator=g)
    return x + 100.0  # far from the origin: the kNN must not lose precision to large norms


@pytest.mark.parametrize("block", [64, 256, 2048])
def test_self_knn_matches_brute_force(clustered, block):
    nb = knn(clustered, 10, exclude="self", block_size=block, progress=False)
    ref_d, ref_i = brute(clustered, clustered, 10, torch.eye(900, dtype=torch.bool))
    assert_same(nb, ref_d, ref_i)
    assert (nb.indices != torch.arange(900)[:, None]).all()


def test_self_knn_matches_sklearn(clustered):
    nb = knn(clustered, 5, exclude="self", block_size=128, progress=False)
    d, i = NearestNeighbors(n_neighbors=6).fit(clustered.numpy()).kneighbors()
    np.testing.assert_allclose(nb.distances.numpy(), d[:, :5], rtol=1e-4)


def test_nearest_drops_the_first(clustered):
    nb = knn(clustered, 8, exclude="nearest", block_size=100, progress=False)
    ref_d, ref_i = brute(clustered, clustered, 9)
    assert_same(nb, ref_d[:, 1:], ref_i[:, 1:])


def test_image_exclusion(clustered):
    groups = torch.arange(900) // 30  # 30 "images" of 30 patches
    nb = knn(clustered, 6, exclude="image", query_groups=groups, block_size=128, progress=False)
    ref_d, ref_i = brute(clustered, clustered, 6, groups[:, None] == groups[None, :])
    assert_same(nb, ref_d, ref_i)
    assert (groups[nb.indices] != groups[:, None]).all()


def test_separate_bank_with_ids(clustered):
    bank_rows = torch.arange(0, 900, 3)  # a subset of the patches, e.g. a coreset
    nb = knn(
        clustered,
        4,
        clustered[bank_rows],
        exclude="self",
        query_ids=torch.arange(900),
        bank_ids=bank_rows,
        block_size=100,
        progress=False,
    )
    ref_d, ref_i = brute(
        clustered, clustered[bank_rows], 4, torch.arange(900)[:, None] == bank_rows[None, :]
    )
    assert_same(nb, ref_d, ref_i)


def test_no_exclusion_separate_bank():
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(300, 16, generator=g), torch.randn(500, 16, generator=g)
    nb = knn(q, 7, b, exclude="none", block_size=64, progress=False)
    assert_same(nb, *brute(q, b, 7))


def test_bad_arguments(clustered):
    with pytest.raises(ValueError, match="k=900 is larger than the bank"):
        knn(clustered, 900, progress=False)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn(clustered, 0, progress=False)
    with pytest.raises(ValueError, match="exclude='itself' is unknown"):
        knn(clustered, 3, exclude="itself", progress=False)
    with pytest.raises(ValueError, match="needs query_groups"):
        knn(clustered, 3, exclude="image", progress=False)
    with pytest.raises(ValueError, match="needs query_ids and bank_ids"):
        knn(clustered, 3, clustered[:10], exclude="self", progress=False)
    with pytest.raises(ValueError, match="same width"):
        knn(clustered, 3, clustered[:, :5], exclude="none", progress=False)


def test_duplicates_far_from_the_origin_get_exact_distances():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 64, generator=g) * 0.01 + 300.0  # tiny distances, huge norms
    x[100:] = x[:100]  # every point has an exact duplicate
    x[150] += 1e-3
    nb = knn(x, 3, exclude="self", block_size=64, progress=False)
    ref_d, ref_i = brute(x, x, 3, torch.eye(200, dtype=torch.bool))
    exact = torch.ones(100, dtype=torch.bool)
    exact[50] = False  # its twin x[150] was moved by 1e-3
    assert (nb.distances[:100][exact, 0] == 0).all()
    assert float(nb.distances[50, 0]) == pytest.approx(float(ref_d[50, 0]), rel=1e-4)
    torch.testing.assert_close(nb.distances.double(), ref_d, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
def test_keops_agrees_with_torch(clustered, exclude):
    pytest.importorskip("pykeops")
    groups = torch.arange(900) // 30
    kw = dict(exclude=exclude, query_groups=groups, progress=False)
    a = knn(clustered, 7, block_size=256, **kw)
    b = knn(clustered, 7, backend="keops", block_size=400, **kw)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert (a.indices == b.indices).float().mean() > 0.999


def test_keops_with_a_separate_bank(clustered):
    pytest.importorskip("pykeops")
    bank_rows = torch.arange(0, 900, 4)
    kw = dict(exclude="self", query_ids=torch.arange(900), bank_ids=bank_rows, progress=False)
    a = knn(clustered, 5, clustered[bank_rows], **kw)
    b = knn(clustered, 5, clustered[bank_rows], backend="keops", **kw)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.indices, b.indices)


def test_auto_backend_reads_the_table(clustered, monkeypatch):
    from patchlab import knn as knn_module

    monkeypatch.setattr(knn_module, "AUTO_BACKEND", {"cpu": ((64, "keops"), (math.inf, "torch"))})
    assert knn_module.auto_backend(torch.device("cpu"), 32) == "keops"
    assert knn_module.auto_backend(torch.device("cpu"), 1024) == "torch"
    a = knn(clustered, 5, backend="auto", progress=False)  # d = 32: the KeOps route
    b = knn(clustered, 5, backend="torch", progress=False)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_with_a_full_pool_is_exact(clustered, precision):
    """With every bank row in the candidate pool the exact re-ranking must give fp32's answer."""
    exact = knn(clustered, 6, progress=False)
    low = knn(clustered, 6, precision=precision, pool=900, block_size=256, progress=False)
    torch.testing.assert_close(low.distances, exact.distances, rtol=1e-5, atol=1e-5)
    assert (low.indices == exact.indices).float().mean() > 0.999


def test_symmetric_with_explicit_ids(clustered):
    ids = torch.arange(900) // 2  # rows 2i and 2i+1 are "the same patch"
    nb = knn(clustered, 4, exclude="self", query_ids=ids, block_size=128, progress=False)
    ref_d, ref_i = brute(clustered, clustered, 4, ids[:, None] == ids[None, :])
    assert_same(nb, ref_d, ref_i)


def test_non_finite_features_and_integer_k(clustered):
    bad = clustered.clone()
    bad[5, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        knn(bad, 3, progress=False)
    nb = knn(clustered, np.int64(3), progress=False)
    assert nb.k == 3
    with pytest.raises(ValueError, match="pass query_ids / query_groups only"):
        knn(clustered, 3, bank_ids=torch.arange(900), progress=False)


def test_keops_agrees_with_torch_on_real_features(tiny_demo):
    """Backbone features of demo images (heavy-tailed, many near-duplicate neighbours)."""
    pytest.importorskip("pykeops")
    from patchlab.data import load_mvtec
    from patchlab.features import extract_features

    feats = extract_features(load_mvtec(tiny_demo, "brick", "ano"), progress=False)
    bank = feats.reshape(-1, feats.shape[-1])[:1500]
    groups = torch.arange(len(bank)) // 784
    for exclude in ("self", "image"):
        kw = dict(exclude=exclude, query_groups=groups, progress=False)
        a = knn(bank, 9, **kw)
        b = knn(bank, 9, backend="keops", **kw)
        torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-3)
        assert (a.indices == b.indices).float().mean() > 0.99
