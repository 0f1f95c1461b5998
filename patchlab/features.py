"""Locally aware patch features from a pretrained CNN (see :mod:`patchlab.backbones`).

For an input of S x S pixels (S = 224), a backbone gives maps at strides 8 and 16:

    efficientnet_lite0:  block 4: (40, 28, 28)     block 10: (112, 14, 14)
    wide_resnet50_2:     layer2:  (512, 28, 28)    layer3:   (1024, 14, 14)

    locally aware:  f(h, w) <- mean of f over the r x r neighbourhood of (h, w)   (zero padded;
                    r = 3 as the paper, PatchCore; r = 1, 3, 5 together are MuSc's LNAMD)
    every coarser map upsampled bilinearly to the finest grid, all concatenated
    adaptive average pooling along channels down to the backbone's ``dim`` (wide_resnet50_2:
    1536 -> 1024, as PatchCore; efficientnet_lite0 keeps its 152)

so every 8 x 8-pixel patch gets one feature: an image gives a (28, 28, dim) grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from patchlab.backbones import build_backbone, get_backbone
from patchlab.cache import (
    atomic_save,
    cache_folder,
    feature_key,
    feature_stem,
    read_through,
    resolve_device,
)
from patchlab.data import ImageSet
from patchlab.images import preprocess, read_rgb


def aggregate(taps: list[torch.Tensor], dim: int | None = None, local: int = 3) -> torch.Tensor:
    """Locally aware patch features from a backbone's tapped maps.

        f_r(h, w) = (1 / r^2) * sum_{|dh|, |dw| <= (r - 1) / 2} f(h + dh, w + dw)   (zero padded)

    Parameters
    ----------
    taps : list of torch.Tensor, shapes (b, c_j, h_j, w_j), the finest (h, w) first
    dim : int, optional
        Output width: the concatenated sum(c_j) channels are average pooled to ``dim`` (the
        paper's 1536 -> 1024); None keeps them all.
    local : int, odd, >= 1
        Side r of the neighbourhood averaged on each tap's own grid (3: the paper's; 1: none).

    Returns
    -------
    torch.Tensor, shape (b, h, w, dim or sum(c_j))
    """
    if local < 1 or local % 2 == 0:
        raise ValueError(f"local={local} must be an odd neighbourhood side >= 1 (1, 3, 5, ...)")
    size = taps[0].shape[-2:]
    maps = []
    for fmap in taps:
        # f(h, w) <- (1/r^2) sum over the r x r neighbourhood (zero padded, as PatchCore's unfold)
        if local > 1:
            fmap = F.avg_pool2d(fmap, local, stride=1, padding=local // 2)
        if fmap.shape[-2:] != size:
            fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False)
        maps.append(fmap)
    stacked = torch.cat(maps, 1).permute(0, 2, 3, 1)  # (b, h, w, sum c_j)
    b, h, w, c = stacked.shape
    if dim is None or dim == c:
        return stacked.contiguous()
    pooled = F.adaptive_avg_pool1d(stacked.reshape(b * h * w, 1, c), dim)  # channels c -> dim
    return pooled.reshape(b, h, w, dim)


def extract_features(
    images: ImageSet,
    *,
    kind: str = "patch",
    backbone: str = "efficientnet_lite0",
    weights: str | Path = "imagenet",
    seed: int = 0,
    resize: int = 256,
    crop: int | None = 224,
    local: int = 3,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    scheduler: str | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Features of every image, from the on-disk cache when they were computed before.

    Parameters
    ----------
    images : ImageSet
    kind : {"patch", "global"}
        ``"patch"``: the locally aware patch features (the method's memory bank).
        ``"global"``: the backbone's average-pooled last stage, one vector per image, as SPADE
        uses to find each image's nearest images.
    backbone : a key of :data:`patchlab.backbones.BACKBONES`
    weights, seed : see :func:`patchlab.backbones.build_backbone`.
    resize, crop : see :func:`patchlab.images.preprocess`.
    local : int, odd
        Side of the locally aware neighbourhood (:func:`aggregate`; patch features only).
    batch_size : int
        Images per forward pass.
    device : "auto", "cpu", "cuda", ...
    cache_dir : path, optional
        Folder of the cache (default ``$PATCHLAB_CACHE`` or ``~/.cache/patchlab``).
    scheduler : str, optional
        A Dask scheduler's address, or ``"local"``: the batches are computed on that cluster
        (:mod:`patchlab.distributed`); the features, and their cache entry, are the same.

    Returns
    -------
    torch.Tensor, float32, on the CPU
        ``"patch"``: shape (n_images, S/8, S/8, dim), e.g. (n, 28, 28, 152) for
        efficientnet_lite0; ``"global"``: shape (n_images, global_dim).
    """
    if kind not in ("patch", "global"):
        raise ValueError(f"kind={kind!r} is unknown; choose 'patch' or 'global'")
    setting = dict(backbone=backbone, weights=weights, seed=seed, resize=resize, crop=crop)
    key = feature_key(images.paths, **setting, local=local if kind == "patch" else 3)
    spec = get_backbone(backbone)
    width = spec.dim if kind == "patch" else spec.global_dim

    def complete(a: np.ndarray) -> bool:  # a truncated or foreign file fails this
        return a.shape[0] == len(images) and a.shape[-1] == width and bool(np.isfinite(a).all())

    def compute() -> np.ndarray:
        if scheduler is None:
            model = build_backbone(backbone, weights, seed).to(resolve_device(device))
            return forward(
                images.paths, model, kind, resize, crop, batch_size, progress, local
            ).numpy()
        from patchlab.distributed import connect, forward_on_cluster

        return forward_on_cluster(
            connect(scheduler),
            forward,
            list(images.paths),
            kind=kind,
            **setting,
            batch_size=batch_size,
            local=local,
            device=str(device),
            progress=progress,
        ).numpy()

    def save(path: Path, array: np.ndarray) -> None:
        atomic_save(path, features=array)

    folder, stem = cache_folder(cache_dir), feature_stem(kind, key)
    return torch.from_numpy(read_through(folder, stem, np.load, complete, compute, save))


def forward(
    paths,
    model,
    kind: str,
    resize: int,
    crop: int | None,
    batch_size: int,
    progress: bool,
    local: int = 3,
) -> torch.Tensor:
    """Patch (or global) features of the images at ``paths``, a batch at a time, on the
    model's device (no cache: :func:`extract_features` is the cached entry point)."""
    spec = get_backbone(model.name)
    device = next(model.parameters()).device
    out = []
    bar = tqdm(total=len(paths), desc=f"{kind} features", unit="img", disable=not progress)
    # cuDNN convolves in TF32 by default on Ampere and later (features then differ from the
    # CPU's by ~1e-2): float32 throughout, so cached features do not depend on the device
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for i in range(0, len(paths), batch_size):
                batch = paths[i : i + batch_size]
                x = torch.stack(
                    [preprocess(read_rgb(p), resize, crop, spec.mean, spec.std) for p in batch]
                ).to(device)
                taps = model.taps(x)
                if kind == "patch":
                    out.append(aggregate(taps, spec.dim, local).float().cpu())
                else:
                    out.append(model.pooled(taps).float().cpu())
                bar.update(len(batch))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        bar.close()
    return torch.cat(out)


def receptive_field(
    model: torch.nn.Module, x: torch.Tensor, row: int, col: int, dim: int | None = None
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """What one patch feature "sees": the gradient of its norm with respect to the input pixels.

    The effective receptive field of patch (row, col) is |d ||f(row, col)|| / d x|, summed over
    the colour channels; the pixels where it is non-zero form the theoretical receptive field
    (every pixel the convolutions reach, cut at the image border).

    Parameters
    ----------
    model : a network of :func:`patchlab.backbones.build_backbone`
    x : torch.Tensor, shape (3, S, S)
        One preprocessed image.
    row, col : int
        The patch position on the (S / 8, S / 8) feature grid.
    dim : int, optional
        The backbone's feature width (:func:`aggregate`).

    Returns
    -------
    weight : np.ndarray, shape (S, S), float32
        The gradient magnitude, scaled to a maximum of 1.
    box : (top, left, bottom, right)
        The bounding box of the non-zero gradient, in pixels (bottom, right exclusive).
    """
    inp = x[None].clone().requires_grad_(True)
    with torch.enable_grad():
        feature = aggregate(model.taps(inp), dim)[0, row, col]
        feature.norm().backward()
    weight = inp.grad[0].abs().sum(0)
    rows = torch.nonzero(weight.sum(1)).flatten()
    cols = torch.nonzero(weight.sum(0)).flatten()
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    weight = (weight / weight.max().clamp_min(1e-30)).float().numpy()
    return weight, box
