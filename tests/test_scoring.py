"""Methods, maps and image scores against independent computations."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.special import logsumexp
from sklearn.neighbors import NearestNeighbors

from patchlab.bank import MemoryBank
from patchlab.knn import knn
from patchlab.maps import anomaly_maps, image_scores, support_distances
from patchlab.methods import ScoringInputs, patchcluster, patchcore, score_patches


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(3)
    return torch.randn(400, 12, generator=g)


def test_patchcluster_is_eq2_mean_of_k_distances(bank):
    table = knn(bank, 20, exclude="self", progress=False)
    # kneighbors() without X leaves each training point out of its own neighbours
    d, _ = NearestNeighbors(n_neighbors=20).fit(bank.numpy()).kneighbors()
    for k in (1, 5, 20):
        np.testing.assert_allclose(
            patchcluster(ScoringInputs(torch.zeros(1), table), k).numpy(),
            d[:, :k].mean(1),
            rtol=1e-4,
        )
    np.testing.assert_allclose(
        patchcore(ScoringInputs(torch.zeros(1), table)).numpy(), d[:, 0], rtol=1e-4
    )
    inputs = ScoringInputs(torch.zeros(1), table)
    assert torch.equal(patchcluster(inputs, 1), patchcore(inputs))  # K = 1 is PatchCore


def test_k_checks(bank):
    table = knn(bank, 5, progress=False)
    with pytest.raises(ValueError, match="K=6 exceeds the neighbour table's k_max=5"):
        patchcluster(ScoringInputs(torch.zeros(1), table), 6)
    with pytest.raises(ValueError, match="method='spade2' is unknown"):
        score_patches("spade2", ScoringInputs(torch.zeros(1), table), 3)


def test_maps_are_bilinear_then_gaussian():
    g = torch.Generator().manual_seed(0)
    grid = torch.rand(2, 28, 28, generator=g)
    maps = anomaly_maps(grid, 224, sigma=0)
    # independent bilinear (half-pixel centres, edges clamped): output pixel centre y maps to
    # source coordinate (y + 0.5) / 8 - 0.5
    src = np.clip((np.arange(224) + 0.5) / 8 - 0.5, 0, 27)
    yy, xx = np.meshgrid(src, src, indexing="ij")
    ref = np.stack([ndimage.map_coordinates(gr.numpy(), [yy, xx], order=1) for gr in grid])
    np.testing.assert_allclose(maps, ref, atol=1e-5)
    smooth = anomaly_maps(grid, 224, sigma=4)
    np.testing.assert_allclose(smooth[1], ndimage.gaussian_filter(ref[1], 4), atol=1e-5)
    assert smooth.dtype == np.float32 and smooth.shape == (2, 224, 224)


def _support_brute_force(feats, patch, bank_rows, exclude, b):
    """N_b(f*) by a float64 loop: f_i* the top patch, f* its nearest allowed bank feature,
    then the b nearest allowed bank features of f* (f* itself first)."""
    n, h, w, d = feats.shape
    flat = feats.reshape(-1, d).double()
    rows = torch.arange(n * h * w) if bank_rows is None else bank_rows
    out = []
    for i in range(n):
        top = i * h * w + int(patch[i].flatten().argmax())
        allowed = [
            int(r)
            for r in rows
            if exclude == "none"
            or (exclude in ("self", "nearest") and int(r) != top)
            or (exclude == "image" and int(r) // (h * w) != i)
        ]
        to_top = (flat[allowed] - flat[top]).norm(dim=1)
        star = allowed[int(to_top.argmin())]
        order = torch.argsort((flat[allowed] - flat[star]).norm(dim=1), stable=True)[:b]
        members = [allowed[j] for j in order]
        assert members[0] == star
        out.append([float((flat[top] - flat[m]).norm()) for m in members])
    return np.array(out)


@pytest.mark.parametrize("exclude", ["self", "nearest", "image", "none"])
@pytest.mark.parametrize("coreset", [False, True])
def test_support_distances_match_a_brute_force(exclude, coreset):
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 3, 3, 5, generator=g)
    patch = torch.rand(4, 3, 3, generator=g)
    n_all = 36
    bank_rows = torch.sort(torch.randperm(n_all, generator=g)[:20]).values if coreset else None
    groups = torch.arange(4).repeat_interleave(9)
    flat = feats.reshape(-1, 5)
    if coreset:
        table = knn(
            flat,
            3,
            flat[bank_rows],
            exclude=exclude,
            query_ids=torch.arange(n_all),
            bank_ids=bank_rows,
            query_groups=groups,
            bank_groups=groups[bank_rows],
            progress=False,
        )
    else:
        table = knn(flat, 3, exclude=exclude, query_groups=groups, progress=False)
    bank = MemoryBank(feats, bank_rows, blind=True, key="")
    got = support_distances(patch, ScoringInputs(feats, table, bank), b=4)
    want = _support_brute_force(feats, patch, bank_rows, exclude, 4)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_image_score_rules():
    g = torch.Generator().manual_seed(1)
    # large scores (exp() would overflow in float32); image 0 below the support distances
    scores = torch.rand(3, 4, 4, generator=g) * 5 + torch.tensor([30.0, 60.0, 90.0])[:, None, None]
    support = torch.sort(torch.rand(3, 6, generator=g, dtype=torch.float64) * 3 + 40, 1).values
    a = scores.reshape(3, -1).amax(1).double().numpy()
    d = support.numpy()
    # PatchCore's weight: 1 - exp(D_f*) / sum exp(D), overflow-free, always in [0, 1)
    expect = (1 - np.exp(d[:, 0] - logsumexp(d, 1))) * a
    np.testing.assert_allclose(image_scores(scores, "patchcore", support), expect, rtol=1e-9)
    weight = expect / a
    assert ((weight >= 0) & (weight < 1)).all()
    # Eq. 3 as printed: exp(a*) in the numerator; negative once a* > logsumexp(D)
    literal = (1 - np.exp(a - logsumexp(d, 1))) * a
    np.testing.assert_allclose(image_scores(scores, "eq3", support), literal, rtol=1e-9)
    assert (literal < 0).any() and (literal > 0).any()
    np.testing.assert_allclose(image_scores(scores, "max"), a)
    with pytest.raises(ValueError, match="needs support_distances"):
        image_scores(scores, "patchcore")
    with pytest.raises(ValueError, match="mode='mean' is unknown"):
        image_scores(scores, "mean")


def test_patchcore_and_literal_eq3_agree_for_patchcore_scores():
    """For PatchCore a* = dist(f_i*, f*): the printed Eq. 3 is PatchCore's re-weighting."""
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(5, 4, 4, 8, generator=g)
    table = knn(feats.reshape(-1, 8), 9, progress=False)
    patch = table.distances[:, 0].reshape(5, 4, 4)
    support = support_distances(patch, ScoringInputs(feats, table), b=9)
    torch.testing.assert_close(
        support[:, 0], patch.reshape(5, -1).amax(1).double(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        image_scores(patch, "eq3", support), image_scores(patch, "patchcore", support), rtol=1e-5
    )
    with pytest.raises(ValueError, match="b=81 must lie in"):
        support_distances(patch, ScoringInputs(feats, table), b=81)


def test_negative_eq3_weights_warn_and_are_counted(tiny_demo):
    """Eq. 3 as printed, PatchCluster at large K: some weights turn negative; the run says so."""
    from dataclasses import replace

    from patchlab.config import PAPER_SETTINGS, RunConfig
    from patchlab.experiment import rescore, run

    config = RunConfig(
        data=str(tiny_demo), category="brick", setting="test", k=3, k_max=60, **PAPER_SETTINGS
    )
    base = run(config, progress=False)
    literal = replace(config, k=60, image_score="eq3")
    with pytest.warns(UserWarning, match="negative image-score weight under image_score='eq3'"):
        result = rescore(literal, base.images, base.inputs, base.masks)
    negative = result.metrics["negative_weights"]
    assert negative == int((result.image_scores < 0).sum()) > 0
    faithful = rescore(
        replace(literal, image_score="patchcore"), base.images, base.inputs, base.masks
    )
    assert faithful.metrics["negative_weights"] == 0 and (faithful.image_scores >= 0).all()
