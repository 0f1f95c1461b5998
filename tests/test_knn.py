"""The blocked kNN against brute force (float64 distance matrices, tiny sizes only)."""

import math

import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from patchlab.knn import Engine, knn


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
    nb = knn(clustered, 10, exclude="self", engine=Engine(block_size=block), progress=False)
    ref_d, ref_i = brute(clustered, clustered, 10, torch.eye(900, dtype=torch.bool))
    assert_same(nb, ref_d, ref_i)
    assert (nb.indices != torch.arange(900)[:, None]).all()


def test_self_knn_matches_sklearn(clustered):
    nb = knn(clustered, 5, exclude="self", engine=Engine(block_size=128), progress=False)
    d, i = NearestNeighbors(n_neighbors=6).fit(clustered.numpy()).kneighbors()
    np.testing.assert_allclose(nb.distances.numpy(), d[:, :5], rtol=1e-4)


def test_nearest_drops_the_first(clustered):
    nb = knn(clustered, 8, exclude="nearest", engine=Engine(block_size=100), progress=False)
    ref_d, ref_i = brute(clustered, clustered, 9)
    assert_same(nb, ref_d[:, 1:], ref_i[:, 1:])


def test_image_exclusion(clustered):
    groups = torch.arange(900) // 30  # 30 "images" of 30 patches
    nb = knn(
        clustered,
        6,
        exclude="image",
        query_groups=groups,
        engine=Engine(block_size=128),
        progress=False,
    )
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
        engine=Engine(block_size=100),
        progress=False,
    )
    ref_d, ref_i = brute(
        clustered, clustered[bank_rows], 4, torch.arange(900)[:, None] == bank_rows[None, :]
    )
    assert_same(nb, ref_d, ref_i)


def test_no_exclusion_separate_bank():
    g = torch.Generator().manual_seed(1)
    q, b = torch.randn(300, 16, generator=g), torch.randn(500, 16, generator=g)
    nb = knn(q, 7, b, exclude="none", engine=Engine(block_size=64), progress=False)
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
    nb = knn(x, 3, exclude="self", engine=Engine(block_size=64), progress=False)
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
    a = knn(clustered, 7, engine=Engine(block_size=256), **kw)
    b = knn(clustered, 7, engine=Engine(backend="keops", block_size=400), **kw)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert (a.indices == b.indices).float().mean() > 0.999


def test_keops_with_a_separate_bank(clustered):
    pytest.importorskip("pykeops")
    bank_rows = torch.arange(0, 900, 4)
    kw = dict(exclude="self", query_ids=torch.arange(900), bank_ids=bank_rows, progress=False)
    a = knn(clustered, 5, clustered[bank_rows], **kw)
    b = knn(clustered, 5, clustered[bank_rows], engine=Engine(backend="keops"), **kw)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.indices, b.indices)


def test_auto_engine_resolves_by_device_and_bank(clustered):
    cpu = torch.device("cpu")
    small = Engine().resolve(cpu, 900, symmetric=True, d=32)
    assert (small.backend, small.precision, small.merge) == ("torch", "fp32", "heaps")
    assert small.block_size == 2048 and small.skip is False  # too small to be worth reordering
    assert Engine().resolve(cpu, 50_000, symmetric=True, d=1024).skip is True
    assert Engine().resolve(cpu, 50_000, symmetric=True, d=152).skip is False  # pays at 1024-d
    assert Engine().resolve(cpu, 50_000, symmetric=False, d=32).skip is False  # self-kNN only
    assert Engine(skip=True, precision="bf16").resolve(cpu, 50_000, True, 32).skip is False
    with pytest.raises(ValueError, match="merge='heaps' runs on the CPU only"):
        Engine(merge="heaps").resolve(torch.device("cuda"), 900, True, 32)
    with pytest.raises(ValueError, match="backend='faiss' is unknown"):
        Engine(backend="faiss")
    a = knn(clustered, 5, progress=False)  # every choice auto
    b = knn(clustered, 5, engine=Engine(backend="torch", merge="torch"), progress=False)
    torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "tf32"])
def test_reduced_precision_with_a_full_pool_is_exact(clustered, precision):
    """With every bank row in the candidate pool the exact re-ranking must give fp32's answer."""
    exact = knn(clustered, 6, progress=False)
    engine = Engine(precision=precision, pool=900, block_size=256)
    low = knn(clustered, 6, engine=engine, progress=False)
    torch.testing.assert_close(low.distances, exact.distances, rtol=1e-5, atol=1e-5)
    assert (low.indices == exact.indices).float().mean() > 0.999


def test_symmetric_with_explicit_ids(clustered):
    ids = torch.arange(900) // 2  # rows 2i and 2i+1 are "the same patch"
    nb = knn(
        clustered, 4, exclude="self", query_ids=ids, engine=Engine(block_size=128), progress=False
    )
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
        b = knn(bank, 9, engine=Engine(backend="keops"), **kw)
        torch.testing.assert_close(a.distances, b.distances, rtol=1e-4, atol=1e-3)
        assert (a.indices == b.indices).float().mean() > 0.99


# --- the compiled CPU merge (patchlab.knn._heaps) -------------------------------------------


def reference_merge(blocks, n, k):
    """Top-k of every row by (distance, index), from (d2, r0, c0, add, both) blocks."""
    cand = [[] for _ in range(n)]
    for d2, r0, c0, add, both in blocks:
        v = (d2.double() + add.double()[:, None]).float() if add is not None else d2
        for i in range(v.shape[0]):
            for j in range(v.shape[1]):
                if math.isfinite(v[i, j]):
                    cand[r0 + i].append((float(v[i, j]), c0 + j))
                    if both:
                        cand[c0 + j].append((float(v[i, j]), r0 + i))
    out_d = torch.full((n, k), math.inf)
    out_i = torch.full((n, k), -1, dtype=torch.int64)
    for r, c in enumerate(cand):
        best = sorted(c)[:k]
        out_d[r, : len(best)] = torch.tensor([b[0] for b in best])
        out_i[r, : len(best)] = torch.tensor([b[1] for b in best])
    return out_d, out_i


def run_heaps(blocks, n, k):
    from patchlab.knn._heaps import Heaps

    heaps = Heaps(n, k)
    for d2, r0, c0, add, both in blocks:
        heaps.merge(d2, r0, c0, add, both=both)
    return heaps.result()


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("ties", [False, True])
def test_heap_merge_matches_a_sorted_reference(k, ties):
    """Row and transposed blocks, negative and +inf entries, ties, k wider than a block."""
    g = torch.Generator().manual_seed(k)
    n, blocks = 150, []
    spans = [(0, 37), (37, 100), (100, 150)]  # uneven blocks, some narrower than k
    for bi, (r0, r1) in enumerate(spans):
        for bj, (c0, c1) in enumerate(spans):
            if bj < bi:
                continue
            if ties:  # few distinct values: most comparisons are ties
                d2 = torch.randint(-2, 6, (r1 - r0, c1 - c0), generator=g).float()
            else:
                d2 = torch.randn(r1 - r0, c1 - c0, generator=g) * 10  # negatives included
            d2[torch.rand(d2.shape, generator=g) < 0.1] = math.inf  # excluded pairs
            add = torch.randn(r1 - r0, generator=g) if not ties else torch.zeros(r1 - r0)
            blocks.append((d2, r0, c0, add, bi != bj))
    got_d, got_i = run_heaps(blocks, n, k)
    ref_d, ref_i = reference_merge(blocks, n, k)
    assert torch.equal(got_d, ref_d)
    assert torch.equal(got_i, ref_i)


def test_heap_merge_with_fewer_candidates_than_k():
    d2 = torch.tensor([[3.0, math.inf, 1.0], [math.inf, math.inf, 2.0]])
    got_d, got_i = run_heaps([(d2, 0, 10, None, False)], 2, 4)
    assert got_d.tolist() == [[1.0, 3.0, math.inf, math.inf], [2.0] + [math.inf] * 3]
    assert got_i.tolist() == [[12, 10, -1, -1], [12, -1, -1, -1]]


def test_heap_merge_wide_blocks_use_the_vectorised_path():
    """Blocks wider than a chunk (64) with a single thread and with all threads."""
    g = torch.Generator().manual_seed(5)
    blocks = [
        (torch.rand(300, 300, generator=g), 0, 0, None, False),
        (torch.rand(300, 500, generator=g), 0, 300, torch.rand(300, generator=g), True),
        (torch.rand(500, 500, generator=g), 300, 300, None, False),
    ]
    ref = reference_merge(blocks, 800, 20)
    threads = torch.get_num_threads()
    try:
        for t in {1, threads}:
            torch.set_num_threads(t)
            got = run_heaps(blocks, 800, 20)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    finally:
        torch.set_num_threads(threads)


def test_heap_merge_rejects_overlapping_transposes():
    from patchlab.knn._heaps import Heaps

    with pytest.raises(ValueError, match="disjoint"):
        Heaps(10, 2).merge(torch.zeros(4, 4), 0, 2, both=True)


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_cpu_heaps_agree_with_the_torch_merge(clustered, exclude, symmetric):
    """The CPU heap merge and the torch merge (CUDA's) give the same tables, every mode."""
    groups = torch.arange(900) // 30
    kw = dict(exclude=exclude, query_groups=groups, progress=False)
    if not symmetric:  # queries != bank: every query against the bank's other rows
        bank_rows = torch.arange(1, 900, 2)
        kw.update(bank=clustered[bank_rows], query_ids=torch.arange(900), bank_ids=bank_rows)
        kw.update(bank_groups=groups[bank_rows])
    k = 70  # wider than the first block's candidates of some rows once excluded
    heaps = knn(clustered, k, engine=Engine(block_size=64, merge="heaps"), **kw)
    plain = knn(clustered, k, engine=Engine(block_size=64, merge="torch"), **kw)
    torch.testing.assert_close(heaps.distances, plain.distances, rtol=0, atol=0)
    # where the neighbours differ, they are ties: equally far in float64 too
    rows, cols = (heaps.indices != plain.indices).nonzero(as_tuple=True)
    assert rows.numel() < 0.001 * heaps.indices.numel()
    bank = kw.get("bank", clustered).double()
    q = clustered.double()[rows]
    near_a = (q - bank[heaps.indices[rows, cols]]).norm(dim=1)
    near_b = (q - bank[plain.indices[rows, cols]]).norm(dim=1)
    torch.testing.assert_close(near_a, near_b, rtol=1e-5, atol=1e-6)


SMALL_CLUSTERS = Engine(skip=True, cluster_rows=32, block_size=128)  # a 900-row bank reordered


@pytest.fixture
def small_clusters(monkeypatch):
    """Count the block pairs the skipping search tests, and how many it skips."""
    from patchlab.knn import _blocks

    skipped = []
    original = _blocks.ClusterBlocks.skippable

    def counting(self, *args):
        result = original(self, *args)
        skipped.append(result)
        return result

    monkeypatch.setattr(_blocks.ClusterBlocks, "skippable", counting)
    return skipped


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
def test_skipping_block_pairs_stays_exact(clustered, small_clusters, exclude):
    groups = torch.arange(900) // 30
    nb = knn(
        clustered, 10, exclude=exclude, query_groups=groups, engine=SMALL_CLUSTERS, progress=False
    )
    if exclude == "nearest":
        ref_d, ref_i = brute(clustered, clustered, 11)
        ref_d, ref_i = ref_d[:, 1:], ref_i[:, 1:]
    else:
        mask = {
            "self": torch.eye(900, dtype=torch.bool),
            "image": groups[:, None] == groups[None, :],
            "none": None,
        }[exclude]
        ref_d, ref_i = brute(clustered, clustered, 10, mask)
    assert_same(nb, ref_d, ref_i)
    assert any(small_clusters) and not all(small_clusters)  # some pairs skipped, not all


def test_skipping_with_explicit_ids(clustered, small_clusters):
    ids = torch.arange(900) // 2  # rows 2i and 2i+1 are "the same patch"
    nb = knn(clustered, 4, exclude="self", query_ids=ids, engine=SMALL_CLUSTERS, progress=False)
    ref_d, ref_i = brute(clustered, clustered, 4, ids[:, None] == ids[None, :])
    assert_same(nb, ref_d, ref_i)
    assert any(small_clusters)


def test_block_bound_is_below_every_distance(clustered):
    """||f - mu_B|| - rho_B <= min_{m in B} ||f - m|| for every row f and block B."""
    from patchlab.knn import _blocks

    blocks = _blocks.ClusterBlocks(clustered, 128, cluster_rows=64)
    x = clustered[blocks.order]
    blocks.measure(x)
    assert sorted(blocks.order.tolist()) == list(range(900))
    assert blocks.ranges[0][0] == 0 and blocks.ranges[-1][1] == 900
    assert all(e - s <= 128 for s, e in blocks.ranges)
    d = torch.cdist(x.double(), x.double())
    for b, (s, e) in enumerate(blocks.ranges):
        nearest = d[:, s:e].min(1).values.numpy()
        assert (blocks.to_centre[:, b] - blocks.radii[b] <= nearest + 1e-4).all()


# --- exact neighbour sets (float64) -----------------------------------------------------------


def float64_sets(bank, k, exclude, groups):
    """Sorted index sets of the k nearest by a float64 brute force, as knn defines them."""
    d = torch.cdist(bank.double(), bank.double())
    n = len(bank)
    if exclude == "self":
        d.fill_diagonal_(float("inf"))
    elif exclude == "image":
        d[groups[:, None] == groups[None, :]] = float("inf")
    kk = k + 1 if exclude == "nearest" else k
    idx = d.topk(kk, dim=1, largest=False).indices
    if exclude == "nearest":
        idx = idx[:, 1:]
    assert idx.shape == (n, k)
    return idx.sort(1).values, d.gather(1, idx)


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("shift", ["constant", "two far copies"])
@pytest.mark.parametrize("copy_mb", [256, 0])  # 0: the bank is centred block by block
def test_sets_equal_float64_on_large_norm_banks(clustered, exclude, skip, shift, copy_mb):
    """Norms far larger than the neighbour distances: float32's GEMM form cancels; the table
    must still equal a float64 brute force (the uncertain rows are searched again)."""
    base = clustered[:600] - 100.0
    if shift == "constant":
        bank = base + 3e3  # removed by centring
    else:  # two copies far apart: centring cannot help, every row is uncertain in float32
        bank = torch.cat([base[:300], base[300:] + 1e4])
    groups = torch.arange(600) // 20
    engine = Engine(skip=skip, cluster_rows=32, block_size=128, copy_mb=copy_mb)
    nb = knn(bank, 8, exclude=exclude, query_groups=groups, engine=engine, progress=False)
    ref_sets, ref_d = float64_sets(bank, 8, exclude, groups)
    assert torch.equal(nb.indices.sort(1).values, ref_sets)
    torch.testing.assert_close(nb.distances.double(), ref_d.sort(1).values, rtol=1e-6, atol=0)


def test_exact_rerank_breaks_ties_by_index():
    from patchlab.knn._exact import rerank

    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [5.0, 5.0]])
    query = torch.zeros(1, 2)
    d2, idx = rerank(query, bank, torch.tensor([[3, 2, -1, 0, 1]]), 3)
    assert idx.tolist() == [[0, 1, 2]] and d2.tolist() == [[1.0, 1.0, 1.0]]
    d2, idx = rerank(query, bank, torch.tensor([[3, -1]]), 2)  # fewer candidates than k
    assert idx.tolist() == [[3, -1]] and d2[0, 1] == float("inf")


def test_backends_come_from_the_registry(monkeypatch):
    """A backend is one entry of SEARCHES (a module with a ``search``): knn dispatches by it."""
    import sys
    import types

    import patchlab.knn as knn_module
    from patchlab.knn import _gemm

    assert knn_module.BACKENDS == ("auto", *knn_module.SEARCHES)
    calls = []

    def search(*args):
        calls.append(args[2])  # k asked of the fast pass
        return _gemm.search(*args)

    monkeypatch.setitem(sys.modules, "fake_backend", types.SimpleNamespace(search=search))
    monkeypatch.setitem(knn_module.SEARCHES, "torch", "fake_backend")
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    table = knn(x, 4, progress=False)
    assert calls and calls[0] >= 4
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(float("inf"))
    assert torch.equal(table.indices, d.topk(4, largest=False).indices)
