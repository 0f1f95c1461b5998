"""Every scoring method against an independent computation on tiny feature sets."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from sklearn.neighbors import LocalOutlierFactor

from patchlab.bank import MemoryBank
from patchlab.knn import knn
from patchlab.methods import ScoringInputs, score_patches


@pytest.fixture
def feats():
    """6 'images' of 3 x 3 patches, 8 channels, with a planted outlier patch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 3, 8, generator=g)
    x[2, 1, 1] += 6.0
    return x


def test_lof_matches_sklearn(feats):
    bank = feats.reshape(-1, 8)
    table = knn(bank, 10, exclude="self", progress=False)
    ours = score_patches("patchcore_lof", ScoringInputs(feats, table), 10)
    ref = LocalOutlierFactor(n_neighbors=10, algorithm="brute").fit(bank.numpy())
    np.testing.assert_allclose(ours.numpy(), -ref.negative_outlier_factor_, rtol=1e-4)
    assert int(ours.argmax()) == 2 * 9 + 4  # the planted outlier


def test_lof_with_a_coreset_bank(feats):
    bank = feats.reshape(-1, 8)
    rows = torch.arange(0, 54, 2)
    table = knn(
        bank,
        5,
        bank[rows],
        exclude="self",
        query_ids=torch.arange(54),
        bank_ids=rows,
        progress=False,
    )
    inputs = ScoringInputs(feats, table, MemoryBank(feats, rows, blind=True, key=""))
    ours = score_patches("patchcore_lof", inputs, 5).double().numpy()
    d = cdist(bank.numpy(), bank[rows].numpy())
    d[rows.numpy(), np.arange(len(rows))] = np.inf  # itself excluded
    nn = np.argsort(d, 1)[:, :5]
    nd = np.take_along_axis(d, nn, 1)
    k_dist = nd[rows.numpy(), -1]
    lrd = 1 / np.maximum(nd, k_dist[nn]).mean(1)
    np.testing.assert_allclose(ours, lrd[rows.numpy()][nn].mean(1) / lrd, rtol=1e-4)


def test_padim_matches_a_direct_gaussian(feats):
    ours = score_patches("padim", ScoringInputs(feats), 1, seed=0).numpy().reshape(6, 9)
    x = feats.reshape(6, 9, 8).double().numpy()  # n_dims=550 > 8: every channel is used
    for p in range(9):
        mu = x[:, p].mean(0)
        cov = np.cov(x[:, p], rowvar=False) + 0.01 * np.eye(8)
        inv = np.linalg.inv(cov)
        expect = [np.sqrt((f - mu) @ inv @ (f - mu)) for f in x[:, p]]
        np.testing.assert_allclose(ours[:, p], expect, rtol=1e-4)


def test_padim_on_one_image_is_finite(feats):
    scores = score_patches("padim", ScoringInputs(feats[:1]), 1)
    assert torch.isfinite(scores).all()


def spade_brute(feats, global_feats, k, k_img):
    n = feats.shape[0]
    g = cdist(global_feats, global_feats)
    np.fill_diagonal(g, np.inf)
    out = []
    for i in range(n):
        near = np.argsort(g[i], kind="stable")[:k_img]
        gallery = feats[near].reshape(-1, feats.shape[-1])
        d = np.sort(cdist(feats[i].reshape(-1, feats.shape[-1]), gallery), 1)
        out.append(d[:, :k].mean(1))
    return np.concatenate(out)


@pytest.mark.parametrize("method, k", [("spade", 1), ("spade_cluster", 4)])
def test_spade_matches_a_brute_force_loop(feats, method, k):
    g = torch.Generator().manual_seed(1)
    global_feats = torch.randn(6, 5, generator=g)
    ours = score_patches(method, ScoringInputs(feats, global_features=global_feats), k, k_img=3)
    expect = spade_brute(feats.numpy(), global_feats.numpy(), k, 3)
    np.testing.assert_allclose(ours.numpy(), expect, rtol=1e-4)


def test_mutual_matches_a_brute_force_loop(feats):
    ours = score_patches("mutual", ScoringInputs(feats), 1, ratio=0.5).numpy()
    x = feats.numpy()
    expect = []
    for i in range(6):
        for p in x[i].reshape(-1, 8):
            minima = sorted(cdist(p[None], x[j].reshape(-1, 8)).min() for j in range(6) if j != i)
            expect.append(np.mean(minima[: int(np.ceil(0.5 * 5))]))
    np.testing.assert_allclose(ours, expect, rtol=1e-4)


def test_bad_method_arguments(feats):
    with pytest.raises(ValueError, match="k_img=6 must lie in"):
        score_patches("spade", ScoringInputs(feats, global_features=torch.zeros(6, 2)), 1, k_img=6)
    with pytest.raises(ValueError, match="needs global features"):
        score_patches("spade", ScoringInputs(feats), 1)
    with pytest.raises(ValueError, match="neighbour table"):
        score_patches("patchcluster", ScoringInputs(feats), 3)
    with pytest.raises(ValueError, match="mutual ratio"):
        score_patches("mutual", ScoringInputs(feats), 1, ratio=0)
    with pytest.raises(ValueError, match="method='isolation' is unknown"):
        score_patches("isolation", ScoringInputs(feats), 1)
