"""The one configuration object of a run: every setting that changes a result lives here.

Each field carries its command-line help (and its choices) as metadata, so :mod:`patchlab.cli`
derives its options and defaults from this class: one source of truth. Names are validated by
the registries that own them (backbones, methods, kNN engine, image scores).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field, fields

from patchlab.backbones import BACKBONES, get_backbone
from patchlab.data import SETTINGS
from patchlab.knn import BACKENDS, EXCLUDE_MODES, PRECISIONS, Engine
from patchlab.maps import IMAGE_SCORES, check_image_score
from patchlab.methods import METHODS, get_method


def option(default, help: str, choices=None):
    """A field with its command-line help and choices (read by :mod:`patchlab.cli`)."""
    return field(default=default, metadata={"help": help, "choices": choices})


# the paper's PatchCluster as the paper runs it: 3 x 3 locally aware features, PatchCore's
# image re-weighting (Eq. 3), no image-level re-scoring (what `patchlab demo`, `reproduce`
# and the teaching notebooks 1-5 use; `method="patchcluster"` with them)
PAPER_SETTINGS = dict(method="patchcluster", local_sizes=(3,), image_score="patchcore", rscin=())


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
        Which images form the set (and, blind, the memory bank); see :mod:`patchlab.data`.
    bank_setting : str, optional
        Images whose patches form the memory bank when it is not the set itself: ``"train"``
        is the one-class setting (train/good, as PatchCore; needs ``exclude="none"``).
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
        Seed of the random weights, the coreset, PaDiM's channels and mutual scoring.
    resize, crop : int
        Resize side, then centre-crop side; ``crop=None`` resizes straight to ``resize`` (no
        crop; ``--no-crop`` sets ``resize`` to the crop side, 224, so the input size is kept).
    image_score : {"patchcore", "eq3", "max", "top", "max_median"}
        Image score: the maximum re-weighted as PatchCore does (the function the paper says
        Eq. 3 is), Eq. 3 as printed, the plain maximum, the mean of the top ``top_q`` of the
        patch grid, or the maximum less the image's median; see
        :func:`patchlab.maps.image_scores`.
    top_q : float
        Share of the patch grid that ``image_score="top"`` averages.
    rscin : tuple of int
        Windows of MuSc's RsCIN: each image score smoothed over the image and its k - 1 most
        similar images by global feature, averaged over the windows k
        (:func:`patchlab.maps.rscin`); empty: off.
    local_sizes : tuple of int
        Sides of the locally aware neighbourhood (odd; the paper's 3). Several sizes are
        MuSc's LNAMD: every size is scored on its own and the patch scores averaged; the
        first size's table gives the re-weighted image scores.
    b : int
        Neighbours of f* that re-weight the maximum (N_b(f*), f* included).
    sigma : float
        Gaussian blur of the maps, in pixels.
    backend, precision, pool : str, str, int
        The kNN engine (:class:`patchlab.knn.Engine`); exact either way, results do not
        depend on them beyond float ties.
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    batch_size : int
        Images per backbone forward pass.
    cache_dir : str, optional
        Feature and neighbour cache (default ``$PATCHLAB_CACHE`` or ``~/.cache/patchlab``).
    coreset : float
        Memory bank size as a fraction of all patches, in (0, 1] (greedy coreset when < 1).
    k_img : int
        SPADE: nearest images (by global feature) whose patches form each image's gallery
        (at most n_images - 1 are used; ``metrics.json`` records the value used).
    mutual_ratio : float
        Mutual scoring: the share of other images whose minima are averaged.
    scheduler : str, optional
        A Dask scheduler's address, or ``"local"``: features and the neighbour table are
        computed on that cluster (:mod:`patchlab.distributed`), into the same cache entries:
        the same table from the same features; features equal to float32 rounding.
    """

    data: str
    category: str | None = option(None, "category folder under DATA")
    setting: str = option("test", "images that form the set (blind: and the bank)", SETTINGS)
    bank_setting: str | None = option(
        None,
        "images that form the bank when not the set: train = one-class (default: the set "
        "itself, blind)",
        SETTINGS,
    )
    unlabeled: bool = option(False, "DATA is a plain image folder (no labels, no metrics)")
    # the defaults of method, image_score, rscin and local_sizes were chosen on real data
    # (benchmarks/quality.py, docs/results.md "Beyond the paper"); PAPER_SETTINGS are the paper's
    method: str = option("mutual", "patch scoring method", tuple(sorted(METHODS)))
    k: int = option(25, "neighbours averaged (Eq. 2)")
    k_max: int | None = option(None, "neighbour table width (default: k)")
    exclude: str = option("self", "what counts as the patch itself", EXCLUDE_MODES)
    backbone: str = option("efficientnet_lite0", "feature extractor", tuple(BACKBONES))
    weights: str = option(
        "imagenet", "imagenet, none (seeded random: tests only), or a state-dict path"
    )
    seed: int = option(0, "seed of random weights, coreset, PaDiM channels")
    resize: int = option(256, "resize side, pixels")
    crop: int | None = option(224, "centre-crop side, pixels")
    image_score: str = option(
        "top",
        "patchcore: PatchCore's re-weighting; eq3: as printed; max; top: mean of top_q; "
        "max_median: max less median",
        IMAGE_SCORES,
    )
    top_q: float = option(0.01, "image score 'top': share of the patch grid averaged")
    rscin: tuple[int, ...] = option(
        (2, 3), "RsCIN: smooth image scores over the k most similar images, k in these windows"
    )
    local_sizes: tuple[int, ...] = option(
        (3, 1, 5), "locally aware neighbourhood sides; several = MuSc's LNAMD (1 3 5)"
    )
    b: int = option(9, "neighbours of f* that re-weight the image score")
    sigma: float = option(4.0, "Gaussian blur of the maps, pixels")
    backend: str = option("auto", "kNN backend", BACKENDS)
    precision: str = option("auto", "kNN GEMM precision (reduced ones are re-ranked)", PRECISIONS)
    pool: int | None = option(
        None, "kNN: extra candidates ranked exactly (default 8; 32 with reduced precisions)"
    )
    device: str = option("auto", "auto, cpu or cuda")
    batch_size: int = option(16, "images per backbone forward pass")
    cache_dir: str | None = option(
        None, "cache folder (default $PATCHLAB_CACHE, else ~/.cache/patchlab)"
    )
    coreset: float = option(1.0, "memory bank fraction in (0, 1] (greedy coreset below 1)")
    k_img: int = option(50, "SPADE: nearest images")
    mutual_ratio: float = option(0.3, "mutual scoring: share of images")
    scheduler: str | None = option(
        None,
        "Dask scheduler address, or 'local' for a LocalCluster here (features, neighbours); "
        "default: none, all in this process",
    )

    def __post_init__(self) -> None:
        self._check_numbers()
        if self.setting not in SETTINGS or self.bank_setting not in (None, *SETTINGS):
            raise ValueError(f"setting and bank_setting must be one of {', '.join(SETTINGS)}")
        if self.exclude not in EXCLUDE_MODES:
            raise ValueError(f"exclude={self.exclude!r} is unknown; choose one of {EXCLUDE_MODES}")
        get_backbone(self.backbone)
        get_method(self.method)
        check_image_score(self.image_score)
        self.engine()  # validates backend, precision, pool
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
        self._check_sizes()
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.coreset < 1 and not get_method(self.method).uses_table:
            raise ValueError(
                f"coreset={self.coreset} thins the memory bank of a neighbour table; "
                f"method={self.method!r} reads none: use patchcluster or patchcore"
            )
        if self.bank_setting is not None:
            self._check_one_class()

    def _check_numbers(self) -> None:
        """Every int field an integer (not a bool, float or string), every float field a
        finite number: a clear error naming the field before any other check."""
        for f in fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise ValueError(
                        f"{f.name} must be an integer, got {value!r} ({type(value).__name__})"
                    )
            elif kind.startswith("float"):
                number = isinstance(value, numbers.Real) and not isinstance(value, bool)
                if not number or not math.isfinite(value):
                    raise ValueError(f"{f.name} must be a finite number, got {value!r}")

    def _check_sizes(self) -> None:
        for name in ("rscin", "local_sizes"):
            value = getattr(self, name)
            if isinstance(value, list):  # as JSON gives it back: the same setting
                value = tuple(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tuple) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"{name} must be a tuple of integers, got {value!r}")
        if not self.local_sizes or any(r < 1 or r % 2 == 0 for r in self.local_sizes):
            raise ValueError(f"local_sizes={self.local_sizes} must be odd sides >= 1, e.g. 1 3 5")
        if len(set(self.local_sizes)) != len(self.local_sizes):
            raise ValueError(f"local_sizes={self.local_sizes} repeats a size")
        if any(k < 1 for k in self.rscin):
            raise ValueError(f"rscin windows {self.rscin} must be >= 1")
        if not 0 < self.top_q <= 1:
            raise ValueError(f"top_q={self.top_q} must lie in (0, 1]")

    def _check_one_class(self) -> None:
        if self.exclude != "none":
            raise ValueError(
                f"bank_setting={self.bank_setting!r} (a bank of other images) needs "
                "exclude='none': the queries are not in the bank"
            )
        if not get_method(self.method).uses_table or self.method == "patchcore_lof":
            raise ValueError(
                f"method={self.method!r} scores against the set itself; with bank_setting use "
                "patchcluster or patchcore"
            )

    @property
    def table_k(self) -> int:
        """Width of the neighbour table this run needs."""
        return self.k_max or self.k

    def engine(self) -> Engine:
        """The kNN engine these settings ask for."""
        return Engine(backend=self.backend, precision=self.precision, pool=self.pool)

    def to_dict(self) -> dict:
        return asdict(self)
