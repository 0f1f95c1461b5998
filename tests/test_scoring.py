"""Methods, maps and image scores against independent computations."""

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.special import logsumexp
from sklearn.neighbors import NearestNeighbors

from patchlab.knn import Neighbours, knn
from patchlab.maps import anomaly_maps, image_scores
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


def test_image_score_eq3_and_max():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 4, 4, generator=g) * 50  # large: exp() would overflow in float32
    dist = torch.sort(torch.rand(48, 6, generator=g) * 60 + 20, 1).values
    table = Neighbours(dist, torch.zeros(48, 6, dtype=torch.long), "self")
    got = image_scores(scores, table, "eq3", b=4)
    for i in range(3):
        flat = scores[i].flatten().double().numpy()
        star = int(flat.argmax())
        a = flat[star]
        d = dist[i * 16 + star, :4].double().numpy()
        expect = (1 - np.exp(a - logsumexp(d))) * a  # exp(a) / sum exp(d), overflow-free
        assert got[i] == pytest.approx(float(expect), rel=1e-9)
    np.testing.assert_allclose(image_scores(scores, mode="max"), scores.amax((1, 2)).numpy())
    with pytest.raises(ValueError, match="b=7 must lie in"):
        image_scores(scores, table, "eq3", b=7)
