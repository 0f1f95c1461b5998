"""The one configuration object of a run: every setting that changes a result lives here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from patchlab.backbones import BACKBONES
from patchlab.data import SETTINGS
from patchlab.knn import BACKENDS, EXCLUDE_MODES
from patchlab.maps import IMAGE_SCORES
from patchlab.methods import METHODS


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run, from images to metrics.

    Attributes
    ----------
    data : str
        MVTec AD layout folder (holding categories, or one category), or an image folder.
    category : str, optional
        Category folder name under ``data``.
    setting : {"mix", "test", "ano", "train"}
        Which images form the set (and the memory bank); see :mod:`patchlab.data`.
    unlabeled : bool
        ``data`` is a plain folder of images: rank them, no metrics.
    method : str
        A key of :data:`patchlab.methods.METHODS`.
    k : int
        Neighbours averaged by PatchCluster (Eq. 2).
    k_max : int, optional
        Width of the neighbour table (default ``k``); any K <= k_max re-scores from it.
    exclude : {"self", "nearest", "image", "none"}
        What counts as the patch itself; see :mod:`patchlab.knn`.
    backbone : str
        A key of :data:`patchlab.backbones.BACKBONES`: ``"efficientnet_lite0"`` (ImageNet
        weights installed with patchlab, offline) or ``"wide_resnet50_2"`` (the paper's).
    weights : str
        ``"imagenet"``, ``"none"`` (seeded random: for tests, never for shown results) or a
        state-dict path.
    seed : int
        Seed of the random weights.
    resize, crop : int
        Resize side, then centre-crop side; ``crop=None`` resizes straight to 224 (no crop).
    image_score : {"patchcore", "eq3", "max"}
        Image score: the maximum re-weighted as PatchCore does (the function the paper says
        Eq. 3 is), Eq. 3 as printed, or the plain maximum; see :func:`patchlab.maps.image_scores`.
    b : int
        Neighbours of f* that re-weight the maximum (N_b(f*), f* included).
    sigma : float
        Gaussian blur of the maps, in pixels.
    backend : {"auto", "torch", "keops"}
        kNN backend (exact either way; results do not depend on it).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Images per backbone forward pass.
    cache_dir : str, optional
        Feature and neighbour cache (default ``$PATCHLAB_CACHE`` or ``~/.cache/patchlab``).
    coreset : float
        Memory bank size as a fraction of all patches, in (0, 1] (greedy coreset when < 1).
    k_img : int
        SPADE: nearest images (by global feature) whose patches form each image's gallery.
    mutual_ratio : float
        Mutual scoring: the share of other images whose minima are averaged.
    """

    data: str
    category: str | None = None
    setting: str = "test"
    unlabeled: bool = False
    method: str = "patchcluster"
    k: int = 25
    k_max: int | None = None
    exclude: str = "self"
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    seed: int = 0
    resize: int = 256
    crop: int | None = 224
    image_score: str = IMAGE_SCORES[0]
    b: int = 9
    sigma: float = 4.0
    backend: str = "auto"
    device: str = "auto"
    batch_size: int = 16
    cache_dir: str | None = None
    coreset: float = 1.0
    k_img: int = 50
    mutual_ratio: float = 0.3

    def __post_init__(self) -> None:
        choices = {
            "setting": SETTINGS,
            "method": tuple(METHODS),
            "exclude": EXCLUDE_MODES,
            "image_score": IMAGE_SCORES,
            "backend": BACKENDS,
            "backbone": tuple(BACKBONES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is unknown; choose one of {', '.join(allowed)}"
                )
        for name in ("k", "b", "resize", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_score == "patchcore" and self.b < 2:
            raise ValueError("image_score='patchcore' needs b >= 2 (with b = 1 its weight is 0)")
        if self.k_max is not None and self.k_max < self.k:
            raise ValueError(f"k_max={self.k_max} must be >= k={self.k}")
        if self.crop is not None and not 1 <= self.crop <= self.resize:
            raise ValueError(f"crop={self.crop} must lie in [1, resize={self.resize}]")
        if not 0 < self.coreset <= 1:
            raise ValueError(f"coreset ratio must lie in (0, 1], got {self.coreset}")
        if self.k_img < 1 or not 0 < self.mutual_ratio <= 1:
            raise ValueError("k_img must be >= 1 and mutual_ratio in (0, 1]")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")

    @property
    def table_k(self) -> int:
        """Width of the neighbour table this run needs."""
        return self.k_max or self.k

    def to_dict(self) -> dict:
        return asdict(self)
