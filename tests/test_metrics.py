"""Tests of patchlab.metrics against sklearn, hand-computed cases and a brute-force PRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from scipy.integrate import trapezoid
from sklearn.metrics import roc_auc_score

from patchlab.metrics import evaluate, image_auroc, pixel_auroc, pro_curve, pro_score


def brute_force_pro(masks, maps, max_fpr=0.3, structure=None):
    """Independent PRO: one full pass over every image and region per distinct threshold."""
    structure = np.ones((3, 3), dtype=int) if structure is None else structure
    masks = np.asarray(masks) > 0
    maps = np.asarray(maps, dtype=np.float64)
    regions = []  # (image index, boolean region mask)
    for i, mask in enumerate(masks):
        lab, k = ndimage.label(mask, structure=structure)
        regions += [(i, lab == r) for r in range(1, k + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.sum(above & normal) / np.sum(normal))
        pros.append(np.mean([np.mean(above[i][r]) for i, r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= max_fpr
    x, y = fprs[keep], pros[keep]
    if x[-1] < max_fpr:
        j = np.flatnonzero(~keep)[0]
        y_end = np.interp(max_fpr, fprs[j - 1 : j + 1], pros[j - 1 : j + 1])
        x, y = np.append(x, max_fpr), np.append(y, y_end)
    return trapezoid(y, x) / max_fpr


def random_case(seed, n=4, size=12, levels=8):
    """Masks with several regions (some images all-zero) and tied, mask-correlated scores."""
    rng = np.random.default_rng(seed)
    masks = (rng.random((n, size, size)) < 0.15).astype(np.uint8) * 255
    masks[0] = 0  # a defective image whose mask is empty must be accepted
    scores = rng.integers(0, levels, masks.shape) + rng.integers(0, 4, masks.shape) * (masks > 0)
    return masks, scores / 8.0  # multiples of 1/8: exact in float32, many ties


# --------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(5))
def test_image_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(size=60) + labels, 1)  # rounding creates ties
    assert len(np.unique(scores)) < 60
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(bool), scores) == pytest.approx(
        roc_auc_score(labels, scores), abs=1e-12
    )


def test_image_auroc_single_class_is_none():
    assert image_auroc(np.ones(5, dtype=int), np.arange(5.0)) is None
    assert image_auroc(np.zeros(5, dtype=int), np.arange(5.0)) is None


@pytest.mark.parametrize("seed", range(5))
def test_pixel_auroc_matches_sklearn_with_ties(seed):
    masks, maps = random_case(seed)
    expected = roc_auc_score(masks.ravel() > 0, maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_single_class_is_none():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert pixel_auroc(np.zeros((2, 5, 5)), maps) is None
    assert pixel_auroc(np.ones((2, 5, 5)), maps) is None


# --------------------------------------------------------------------------- PRO by hand


def two_regions(size_a=4, size_b=4):
    """One 10x10 image with region A (row 1) and region B (row 8), far apart."""
    mask = np.zeros((1, 10, 10), dtype=np.uint8)
    mask[0, 1, :size_a] = 1
    mask[0, 8, :size_b] = 1
    return mask


def test_pro_perfect_map_is_one():
    masks = two_regions()
    assert pro_score(masks, masks.astype(float)) == pytest.approx(1.0, abs=1e-12)


def test_pro_inverted_map_is_zero():
    masks = two_regions()
    assert pro_score(masks, 1.0 - masks) == pytest.approx(0.0, abs=1e-12)


def test_pro_one_of_two_equal_regions():
    # A scored 1, B and background 0. Points: (0, 0); t = 1: (FPR 0, PRO 0.5); t = 0: (1, 1).
    # On [0, 1] the curve is PRO(f) = 0.5 + 0.5 f (the t = 0 tie group is one linear step), so
    # int_0^0.3 = 0.5 * 0.3 + 0.5 * 0.3**2 / 2 = 0.15 + 0.0225 = 0.1725, / 0.3 = 0.575.
    masks = two_regions()
    maps = np.zeros(masks.shape)
    maps[0, 1, :4] = 1.0
    assert pro_score(masks, maps) == pytest.approx(0.575, abs=1e-12)
    fpr, pro = pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 1.0])


def test_pro_constant_map_is_one_tied_step():
    # every pixel ties: one step from (0, 0) to (1, 1); 0.3 * 0.3 / 2 / 0.3 = 0.15
    masks = two_regions()
    assert pro_score(masks, np.full(masks.shape, 0.7)) == pytest.approx(0.15, abs=1e-12)
    fpr, pro = pro_curve(masks, np.full(masks.shape, 0.7))
    np.testing.assert_allclose(fpr, [0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0])


@pytest.mark.parametrize("found", ["small", "large"])
def test_pro_regions_count_equally(found):
    # A has 1 pixel, B 9; finding either one gives PRO 0.5 at FPR 0 (mean over regions; a
    # pixel-weighted mean would give 0.1 or 0.9), hence 0.575 as in the equal-area case.
    masks = two_regions(size_a=1, size_b=9)
    maps = np.zeros(masks.shape)
    row = 1 if found == "small" else 8
    maps[0, row] = masks[0, row]
    assert pro_score(masks, maps) == pytest.approx(0.575, abs=1e-12)


def test_pro_uses_8_connectivity():
    # p = (2, 2) and q = (3, 3) touch diagonally, r = (6, 6) stands alone; p, r scored 1.
    # 8-connected: regions {p, q} (overlap 1/2) and {r} (1): PRO 0.75 at FPR 0,
    #   area = 0.75 * 0.3 + 0.25 * 0.3**2 / 2 = 0.23625, / 0.3 = 0.7875.
    # 4-connected: {p} 1, {q} 0, {r} 1: PRO 2/3 at FPR 0, (0.2 + 0.015) / 0.3 = 0.71667.
    masks = np.zeros((1, 8, 8), dtype=bool)
    masks[0, 2, 2] = masks[0, 3, 3] = masks[0, 6, 6] = True
    maps = np.zeros(masks.shape)
    maps[0, 2, 2] = maps[0, 6, 6] = 1.0
    assert pro_score(masks, maps) == pytest.approx(0.7875, abs=1e-12)
    four = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]])
    assert brute_force_pro(masks, maps, structure=four) == pytest.approx(0.215 / 0.3)


def test_pro_regions_do_not_connect_across_images():
    # the same pixel in two images is two regions: image 0 found, image 1 not -> 0.575
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[:, 2, 2] = True
    maps = np.zeros(masks.shape)
    maps[0, 2, 2] = 1.0
    assert pro_score(masks, maps) == pytest.approx(0.575, abs=1e-12)


def test_pro_all_zero_mask_image_only_adds_normal_pixels():
    masks = np.concatenate([two_regions(), np.zeros((1, 10, 10), dtype=np.uint8)])
    maps = masks.astype(float)
    assert pro_score(masks, maps) == pytest.approx(1.0, abs=1e-12)
    maps[1] = 1.0  # 100 false positives among 192 normal pixels, at the top threshold
    assert pro_score(masks, maps) == pytest.approx(brute_force_pro(masks, maps), abs=1e-12)
    assert pro_score(masks, maps) < 1.0
    assert evaluate(np.ones(2), np.arange(2.0), masks, maps)["image_auroc"] is None


def test_pro_without_region_is_none():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert pro_score(np.zeros((2, 5, 5)), maps) is None
    with pytest.raises(ValueError, match="no defect region"):
        pro_curve(np.zeros((2, 5, 5)), maps)


# --------------------------------------------------------------------------- PRO, random


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_pro_matches_brute_force(seed, max_fpr):
    masks, maps = random_case(seed)
    expected = brute_force_pro(masks, maps, max_fpr)
    assert pro_score(masks, maps, max_fpr) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_pro_curve_shape(seed):
    masks, maps = random_case(seed)
    fpr, pro = pro_curve(masks, maps)
    assert fpr.shape == pro.shape == (len(np.unique(maps)) + 1,)
    assert (fpr[0], pro[0]) == (0.0, 0.0)
    assert fpr[-1] == pytest.approx(1.0) and pro[-1] == pytest.approx(1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)


@pytest.mark.parametrize("seed", range(20))
def test_pro_in_unit_interval(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 16, 16)) < rng.uniform(0.02, 0.6)
    if seed % 2:  # continuous scores; else few levels and many ties
        maps = rng.random(masks.shape) + rng.uniform(-1, 1) * masks
    else:
        maps = rng.integers(0, 3, masks.shape).astype(np.float32)
    value = pro_score(masks, maps)
    assert value is not None and 0.0 <= value <= 1.0


def test_evaluate_matches_the_functions():
    masks, maps = random_case(3)
    labels = (masks.reshape(len(masks), -1) > 0).any(axis=1).astype(int)
    image_scores = maps.max(axis=(1, 2))
    result = evaluate(labels, image_scores, masks, maps)
    assert result == {
        "image_auroc": image_auroc(labels, image_scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pro": pro_score(masks, maps),
    }


# --------------------------------------------------------------------------- bad input


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"same shape.*\(2, 5, 5\).*\(2, 5, 6\)"):
        pixel_auroc(np.zeros((2, 5, 5)), np.zeros((2, 5, 6)))
    with pytest.raises(ValueError, match=r"same shape.*\(1, 4, 4\).*\(2, 4, 4\)"):
        pro_score(np.zeros((1, 4, 4)), np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="same length"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="3 labels for 2 masks"):
        evaluate(np.array([0, 1, 1]), np.zeros(3), np.zeros((2, 4, 4)), np.zeros((2, 4, 4)))


def test_non_3d_raises():
    with pytest.raises(ValueError, match="3-D"):
        pro_curve(np.zeros((5, 5)), np.zeros((5, 5)))


def test_non_finite_maps_raise():
    maps = np.zeros((2, 4, 4))
    maps[0, 0, :2] = np.nan
    maps[1, 3, 3] = np.inf
    masks = np.zeros((2, 4, 4))
    masks[1, 1, 1] = 1
    for metric in (pixel_auroc, pro_score, pro_curve):
        with pytest.raises(ValueError, match="finite; found 2 NaN and 1 inf"):
            metric(masks, maps)


def test_bad_labels_scores_and_max_fpr_raise():
    with pytest.raises(ValueError, match="0 or 1"):
        image_auroc(np.array([0, 2]), np.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="finite"):
        image_auroc(np.array([0, 1]), np.array([0.1, np.nan]))
    with pytest.raises(ValueError, match="max_fpr"):
        pro_score(two_regions(), np.zeros((1, 10, 10)), max_fpr=0.0)


def test_format_metric_is_three_decimals_or_na():
    from patchlab.metrics import format_metric

    assert format_metric(None) == "n/a"
    assert format_metric(0.98765) == "0.988" and format_metric(1.0) == "1.000"
    assert format_metric(np.float64(0.5)) == "0.500"


def test_evaluate_rules_against_sklearn():
    """A run's metrics: the rule used through evaluate(), every rule's image AUROC."""
    from patchlab.metrics import evaluate_rules

    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 1, 1, 0, 1])
    by_rule = {"max": rng.random(6), "top": rng.random(6)}
    masks = (rng.random((6, 8, 8)) < 0.1) * labels[:, None, None]
    maps = rng.random((6, 8, 8)).astype(np.float32)
    got = evaluate_rules(labels, by_rule, "top", masks, maps)
    assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, by_rule["top"]))
    assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert got["image_auroc_by_score"]["max"] == pytest.approx(
        roc_auc_score(labels, by_rule["max"])
    )
    quick = evaluate_rules(labels, by_rule, "top", masks, maps, pixel_metrics=False)
    assert quick["pixel_auroc"] is None and quick["image_auroc"] == got["image_auroc"]
    assert evaluate_rules(None, by_rule, "top", masks, maps) == {
        "image_auroc": None,
        "pixel_auroc": None,
        "pro": None,
    }
