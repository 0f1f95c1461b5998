"""Evaluation metrics of the MVTec AD protocol: image AUROC, pixel AUROC and PRO.

Every evaluation metric of patchlab is defined here and nowhere else. Scores follow the
convention "higher = more anomalous". Pixel metrics pool every pixel of every image of the set,
good and defective images alike. Pixel scores are compared as float32: two scores that are equal
in float32 are a tie.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = [
    "evaluate",
    "evaluate_pixels",
    "evaluate_rules",
    "format_metric",
    "image_auroc",
    "pixel_auroc",
    "pixel_roc_curve",
    "pro_curve",
    "pro_score",
    "roc_curve",
]

# 8-connectivity inside each image and none across images, so the (n, H, W) stack of masks is
# labelled in one call and every region gets a set-wide unique id.
_STRUCTURE_8 = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_8[1] = True


def _check_pixels(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate pixel inputs; return ``(masks > 0, maps)`` as bool and float32 ``(n, H, W)``."""
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or maps.ndim != 3:
        raise ValueError(
            f"masks and maps must be 3-D (n, H, W); got masks {masks.shape}, maps {maps.shape}"
        )
    if masks.shape != maps.shape:
        raise ValueError(
            f"masks and maps must have the same shape; got masks {masks.shape}, maps {maps.shape}"
        )
    if masks.size == 0:
        raise ValueError(f"masks and maps hold no pixel; got shape {masks.shape}")
    with np.errstate(over="ignore"):
        maps = np.asarray(maps, dtype=np.float32)  # no copy when already float32
    if not np.isfinite(maps).all():
        n_nan = int(np.count_nonzero(np.isnan(maps)))
        n_inf = int(np.count_nonzero(np.isinf(maps)))
        raise ValueError(
            f"maps must be finite; found {n_nan} NaN and {n_inf} inf values "
            f"(as float32) among {maps.size} pixels"
        )
    return masks > 0, maps


def _descending(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort 1-D ``scores`` descending; return ``(order, ends)``.

    ``ends[k]`` (int64) is the last sorted position holding the k-th largest distinct score t_k,
    so a cumulative sum over ``scores[order]`` read at ``ends`` is the total over {s >= t_k}:
    pixels with equal scores switch together (ties form one step).
    """
    # reversing an ascending sort is enough: only the ends of tie groups are ever read, so the
    # order inside a tie group does not matter (and a GPU sort, when there is one, will do)
    if scores.size > 1_000_000 and torch.cuda.is_available():
        order = torch.from_numpy(scores).cuda().sort().indices.cpu().numpy()[::-1]
    else:
        order = np.argsort(scores, kind="stable")[::-1]
    s = scores[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), s.size - 1)
    return order, ends


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    # integral of the piecewise-linear y(x): sum_i (x_{i+1} - x_i) * (y_{i+1} + y_i) / 2
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)


def _roc_points(tp: np.ndarray, fp: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """ROC curve (fpr, tpr) from the counts TP(t), FP(t) above each distinct t, highest first."""
    if tp[-1] == 0 or fp[-1] == 0:  # a single class: ROC undefined
        return None
    tpr = np.concatenate(([0.0], tp / tp[-1]))  # ROC curve from (0, 0) to (1, 1)
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    return fpr, tpr


def _roc_area(tp: np.ndarray, fp: np.ndarray) -> float | None:
    """ROC AUC from the counts TP(t), FP(t) above each distinct threshold t, highest t first."""
    points = _roc_points(tp, fp)
    return None if points is None else _trapezoid(*points)


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Image-level AUROC.

    Parameters
    ----------
    labels : ndarray of shape (n,), int or bool in {0, 1}
        1 = defective, 0 = good.
    scores : ndarray of shape (n,), float
        Image anomaly scores, higher = more anomalous; must be finite.

    Returns
    -------
    float or None
        Area under the ROC curve (ties handled as in ``sklearn.metrics.roc_auc_score``), or None
        when only one class is present (e.g. the 'ano' setting, where every image is defective).
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must be 1-D of the same length; "
            f"got labels {labels.shape}, scores {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1; got values {np.unique(labels)[:10]}")
    if not np.isfinite(scores).all():
        n_bad = int(np.count_nonzero(~np.isfinite(scores)))
        raise ValueError(f"scores must be finite; found {n_bad} NaN/inf values")
    order, ends = _descending(scores)
    tp = np.cumsum(labels[order] == 1)[ends]  # TP(t) = #{defective, score >= t}
    return _roc_area(tp, ends + 1 - tp)  # FP(t) = #{score >= t} - TP(t)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image-level ROC curve: the points whose trapezoid area is :func:`image_auroc`.

    Parameters
    ----------
    labels, scores : ndarray of shape (n,)
        As in :func:`image_auroc`.

    Returns
    -------
    fpr, tpr : ndarray of shape (m + 1,), float64
        From (0, 0), one point per distinct score (m of them) from the highest down, to (1, 1).

    Raises
    ------
    ValueError
        On bad input, or when only one class is present.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    image_auroc(labels, scores)  # validates
    order, ends = _descending(scores)
    tp = np.cumsum(labels[order] == 1)[ends]
    points = _roc_points(tp, ends + 1 - tp)
    if points is None:
        raise ValueError("ROC is undefined: the labels hold a single class")
    return points


def pixel_roc_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level ROC curve: the points whose trapezoid area is :func:`pixel_auroc`.

    Parameters
    ----------
    masks, maps : ndarray of shape (n, H, W)
        As in :func:`pixel_auroc`.

    Returns
    -------
    fpr, tpr : ndarray of shape (m + 1,), float64
        From (0, 0), one point per distinct pixel score (m of them), to (1, 1).

    Raises
    ------
    ValueError
        On bad input, or when the set has no defective or no normal pixel.
    """
    fp, tp, _ = _sweep(*_check_pixels(masks, maps), with_pro=False)
    points = _roc_points(tp, fp)
    if points is None:
        raise ValueError("pixel ROC is undefined: no defective or no normal pixel")
    return points


def _sweep(
    masks: np.ndarray, maps: np.ndarray, with_pro: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One descending sweep over every pixel of validated bool masks and float32 maps.

    Returns ``(fp, tp, pro)``, one entry per distinct score t from the highest down: int64
    counts of normal and defective pixels with score >= t, and PRO(t) as float64 (None when
    the masks hold no region or ``with_pro`` is False).
    """
    regions, n_regions = ndimage.label(masks, structure=_STRUCTURE_8)  # (n, H, W), 0 = normal
    order, ends = _descending(maps.ravel())
    ids = regions.ravel()[order]  # region id of each pixel, by descending score
    del order
    fp = np.cumsum(ids == 0)[ends]  # FP(t) = #{normal, s >= t}
    tp = ends + 1 - fp  # TP(t) = #{s >= t} - FP(t)
    if not with_pro or n_regions == 0:
        return fp, tp, None
    # A pixel of region r weighs w_r = 1 / (|r| * R), R = number of regions, normal pixels 0, so
    # sum_{s >= t} w = (1/R) * sum_r |r ∩ {s >= t}| / |r| = PRO(t), the mean overlap per region.
    weight = 1.0 / (np.bincount(regions.ravel(), minlength=n_regions + 1) * float(n_regions))
    weight[0] = 0.0
    w = weight[ids]
    pro = np.cumsum(w, out=w)[ends]
    np.minimum(pro, 1.0, out=pro)  # float rounding of the cumulative sum may reach 1 + 1e-15
    return fp, tp, pro


def _pro_points(fp: np.ndarray, pro: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    # FPR(t) = FP(t) / #{normal pixels of the whole set}; the curve starts at (0, 0)
    if pro is None or fp[-1] == 0:
        return None
    return np.concatenate(([0.0], fp / fp[-1])), np.concatenate(([0.0], pro))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """Pixel-level AUROC over every pixel of every image.

    Parameters
    ----------
    masks : ndarray of shape (n, H, W), any dtype
        Ground truth, binarised as ``mask > 0`` (defective pixel).
    maps : ndarray of shape (n, H, W), float
        Pixel anomaly scores, finite; compared as float32.

    Returns
    -------
    float or None
        ROC AUC, or None when the set has no defective or no normal pixel.
    """
    fp, tp, _ = _sweep(*_check_pixels(masks, maps), with_pro=False)
    return _roc_area(tp, fp)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region overlap (PRO) against the false positive rate, at every distinct score.

    Regions are the 8-connected components of each image's mask. At threshold t,
    FPR(t) = #{normal pixels with score >= t} / #{normal pixels of the set} and
    PRO(t) = mean over all regions of the set of the fraction of the region with score >= t.

    Parameters
    ----------
    masks, maps : ndarray of shape (n, H, W)
        As in :func:`pixel_auroc`; an all-zero mask only adds normal pixels.

    Returns
    -------
    fpr, pro : ndarray of shape (m + 1,), float64
        Starting at (0, 0), then one point per distinct score (m of them) from the highest
        down, so fpr is ascending and ends at (1, 1).

    Raises
    ------
    ValueError
        On bad input, or when the set has no defect region or no normal pixel.
    """
    fp, _, pro = _sweep(*_check_pixels(masks, maps))
    points = _pro_points(fp, pro)
    if points is None:
        raise ValueError("PRO is undefined: the masks have no defect region or no normal pixel")
    return points


def _area_to(fpr: np.ndarray, pro: np.ndarray, max_fpr: float) -> float:
    # (1 / max_fpr) * integral_0^max_fpr PRO(f) df over the piecewise-linear curve
    k = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:k] <= max_fpr; fpr[0] = 0
    area = _trapezoid(fpr[:k], pro[:k])
    if k < fpr.size:  # close with the point linearly interpolated at exactly max_fpr
        x0, x1, y0, y1 = fpr[k - 1], fpr[k], pro[k - 1], pro[k]
        y = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)  # x1 > max_fpr >= x0
        area += (max_fpr - x0) * (y0 + y) / 2.0
    return float(area / max_fpr)  # divided by max_fpr, never by the last FPR reached


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float | None:
    """Area under PRO(FPR) from 0 to ``max_fpr``, divided by ``max_fpr`` (MVTec AD AUPRO).

    Trapezoid rule over the points of :func:`pro_curve`, interpolated at exactly ``max_fpr``.

    Parameters
    ----------
    masks, maps : ndarray of shape (n, H, W)
        As in :func:`pro_curve`.
    max_fpr : float in (0, 1]
        Integration limit on the false positive rate.

    Returns
    -------
    float or None
        None when the set has no defect region or no normal pixel.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}")
    fp, _, pro = _sweep(*_check_pixels(masks, maps))
    points = _pro_points(fp, pro)
    return None if points is None else _area_to(*points, max_fpr)


def evaluate(
    labels: np.ndarray, image_scores: np.ndarray, masks: np.ndarray, maps: np.ndarray
) -> dict[str, float | None]:
    """All metrics of a set: ``{"image_auroc", "pixel_auroc", "pro"}`` (PRO up to FPR 0.3).

    Shapes as in :func:`image_auroc` (labels, image_scores: (n,)) and :func:`pro_curve`
    (masks, maps: (n, H, W)); a metric undefined on the set is None.
    """
    image = image_auroc(labels, image_scores)  # validates labels and scores first
    if len(labels) != len(masks):
        raise ValueError(f"got {len(labels)} labels for {len(masks)} masks and maps")
    return {"image_auroc": image, **evaluate_pixels(masks, maps)}


def evaluate_pixels(masks: np.ndarray, maps: np.ndarray) -> dict[str, float | None]:
    """``{"pixel_auroc", "pro"}`` (PRO up to FPR 0.3) from one sort of every pixel: what
    :func:`pixel_auroc` and :func:`pro_score` give, for half the time of both."""
    fp, tp, pro = _sweep(*_check_pixels(masks, maps))
    points = _pro_points(fp, pro)
    return {
        "pixel_auroc": _roc_area(tp, fp),
        "pro": None if points is None else _area_to(*points, 0.3),
    }


def evaluate_rules(
    labels: np.ndarray | None,
    by_rule: dict[str, np.ndarray],
    rule: str,
    masks: np.ndarray,
    maps: np.ndarray,
    pixel_metrics: bool = True,
) -> dict:
    """A run's metrics: :func:`evaluate` with the image scores of ``rule`` (``by_rule[rule]``)
    and, where several rules were scored, ``"image_auroc_by_score"``: the image AUROC of each.

    ``labels`` None (an unlabelled set) gives None everywhere; ``pixel_metrics=False`` leaves
    pixel AUROC and PRO None (they sort every pixel of the set) and keeps the image AUROC.
    """
    metrics: dict = {"image_auroc": None, "pixel_auroc": None, "pro": None}
    if labels is None:
        return metrics
    if pixel_metrics:
        metrics = evaluate(labels, by_rule[rule], masks, maps)
    else:
        metrics["image_auroc"] = image_auroc(labels, by_rule[rule])
    if len(by_rule) > 1:
        metrics["image_auroc_by_score"] = {
            name: image_auroc(labels, s) for name, s in by_rule.items()
        }
    return metrics


def format_metric(value: float | None) -> str:
    """A metric as every table, report and widget shows it: three decimals, or ``"n/a"``
    where it is undefined (None: no labels, no masks, or one class only)."""
    return "n/a" if value is None else f"{value:.3f}"
