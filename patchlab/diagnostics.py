"""Label-free diagnostics: what a blind user can look at when no image is known to be normal.

The paper's criterion for K: PatchCluster's scores change while K is below the size of the
anomaly clusters (a defect's patches find each other first) and become stable once K exceeds
it. :func:`k_stability` measures that stability from the neighbour table alone, and
:func:`choose_k` turns the curve into a choice.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import spearmanr

from patchlab.knn import Neighbours

K_LADDER = (1, 3, 5, 10, 25, 50, 100, 200)
STABLE = 0.99  # a step is stable when the rankings correlate at least this much


def k_stability(table: Neighbours, n_images: int, ks: tuple[int, ...] = K_LADDER) -> list[dict]:
    """How much the PatchCluster scores change from each K to the next one in ``ks``.

    With s_K(f) = (1/K) sum_{m in N_K(f)} ||f - m|| (Eq. 2) and a_K(i) = max_p s_K(i, p):

        rho_patch(K) = Spearman(s_K, s_K')      over every patch, K' the next K in ``ks``
        rho_image(K) = Spearman(a_K, a_K')      over the images

    A running sum over the table's columns gives every s_K in one pass (O(N) extra memory).

    Parameters
    ----------
    table : Neighbours
        The set's neighbour table, (n_images * h * w, k_max), k_max >= the largest K used.
    n_images : int
        Images of the set: the table's rows are n_images grids of equal size.
    ks : tuple of int, increasing
        The K ladder; values above the table's width are dropped.

    Returns
    -------
    list of dict, one per K but the last kept: ``{"k", "next_k", "rho_patch", "rho_image"}``
    """
    ks = tuple(k for k in ks if 1 <= k <= table.k)
    if len(ks) < 2 or any(a >= b for a, b in zip(ks, ks[1:], strict=False)):
        raise ValueError(f"ks={ks} must hold at least two increasing K <= k_max={table.k}")
    if len(table) % n_images:
        raise ValueError(f"{len(table)} table rows are not {n_images} images of equal size")
    total = torch.zeros(len(table), dtype=torch.float64)  # running sum of the first K columns
    curve, previous, done = [], None, 0
    for k in ks:
        total += table.distances[:, done:k].double().sum(1)
        done = k
        patch = (total / k).numpy()
        image = patch.reshape(n_images, -1).max(1)
        if previous is not None:
            k0, patch0, image0 = previous
            curve.append(
                {
                    "k": k0,
                    "next_k": k,
                    "rho_patch": float(spearmanr(patch0, patch).statistic),
                    "rho_image": float(spearmanr(image0, image).statistic),
                }
            )
        previous = (k, patch, image)
    return curve


def choose_k(curve: list[dict], threshold: float = STABLE, key: str = "rho_image") -> int:
    """The smallest K of the curve from which the scores stay stable.

    K is chosen as the first K whose correlation with every later step is at least
    ``threshold``; when no step is that stable, the largest K of the ladder (the scores are
    still moving: larger K is the paper's safer side).

    Parameters
    ----------
    curve : list of dict
        :func:`k_stability`'s output.
    threshold : float
        Spearman correlation from which a step counts as stable.
    key : {"rho_image", "rho_patch"}
        Whose stability: the image ranking (by the maximum of each patch grid) or every patch.

    Returns
    -------
    int, a K of the ladder
    """
    if not curve:
        raise ValueError("the stability curve is empty; compute it with k_stability()")
    values = np.array([step[key] for step in curve])
    for i, step in enumerate(curve):
        if np.all(values[i:] >= threshold):
            return int(step["k"])
    return int(curve[-1]["next_k"])
