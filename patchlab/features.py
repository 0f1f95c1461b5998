"""Locally aware patch features from a WideResNet-50-2 (PatchCore's, as the paper uses them).

For an input of 224 x 224 pixels:

    layer2: (512, 28, 28)    layer3: (1024, 14, 14)
    locally aware:  f(h, w) <- mean of f over the 3 x 3 neighbourhood of (h, w)   (zero padded)
    layer3 upsampled bilinearly to 28 x 28, concatenated with layer2: (1536, 28, 28)
    adaptive average pooling along channels: 1536 -> 1024

so every 8 x 8-pixel patch gets one 1024-d feature: an image gives a (28, 28, 1024) grid.

Weights: ``"imagenet"`` (torchvision's ``IMAGENET1K_V1``, read from the torch hub cache when
offline), ``"none"`` (random, seeded: reproducible, and what tests and the demo use), or the path
of a saved state dict.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from tqdm.auto import tqdm

from patchlab.cache import atomic_save, cache_key, default_cache_dir
from patchlab.data import ImageSet, preprocess, read_rgb

FEATURE_DIM = 1024
FEATURE_VERSION = 2  # bump whenever the features computed for the same settings change
IMAGENET_FILE = Path(torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url).name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build_backbone(weights: str | Path = "none", seed: int = 0) -> torch.nn.Module:
    """A WideResNet-50-2 in eval mode, with the requested weights.

    Parameters
    ----------
    weights : "imagenet", "none" or a path
        ``"imagenet"``: torchvision's IMAGENET1K_V1 (downloaded once into the torch hub cache).
        ``"none"``: random initialisation from ``seed``. A path: a state dict saved with
        ``torch.save(model.state_dict(), path)`` (a ``{"state_dict": ...}`` wrapper is accepted).
    seed : int
        Seed of the random initialisation (``"none"`` only).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.wide_resnet50_2(weights=None)
    if str(weights) == "imagenet":
        model.load_state_dict(_imagenet_state_dict())
    elif str(weights) != "none":
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(
                f"weights file {path} does not exist; pass --weights imagenet, none or a "
                "state-dict file"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"{path} is not a WideResNet-50-2 state dict ({str(err).splitlines()[0]})"
            ) from err
    return model.eval()


def _imagenet_state_dict() -> dict:
    """torchvision's ImageNet weights, from the hub cache or the network, or a clear error."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE
    weights = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # offline: URLError, socket errors, partial downloads
        raise RuntimeError(
            f"ImageNet weights for WideResNet-50-2 could not be loaded ({err}). Offline, put "
            f"{IMAGENET_FILE} (from {weights.url}) at {cached}, or pass --weights PATH with a "
            "saved state dict, or --weights none for random weights."
        ) from err


def weights_identity(weights: str | Path, seed: int) -> str:
    """A string that changes whenever the backbone's weights would (for cache keys)."""
    if str(weights) == "none":
        return f"random-seed{seed}"
    if str(weights) == "imagenet":
        return "IMAGENET1K_V1"
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights file {weights} does not exist; pass --weights imagenet, none or a "
            "state-dict file"
        )
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    return f"file-{digest}"


def backbone_layers(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs of layer2 and layer3 (the network stops there).

    Parameters
    ----------
    x : torch.Tensor, shape (b, 3, 224, 224)

    Returns
    -------
    layer2 (b, 512, 28, 28) and layer3 (b, 1024, 14, 14)
    """
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    layer2 = model.layer2(model.layer1(x))
    return layer2, model.layer3(layer2)


def aggregate(layer2: torch.Tensor, layer3: torch.Tensor, dim: int = FEATURE_DIM) -> torch.Tensor:
    """Locally aware patch features from the two layers.

    Parameters
    ----------
    layer2 : torch.Tensor, shape (b, c2, h, w)
    layer3 : torch.Tensor, shape (b, c3, h', w')
    dim : int
        Output width (the paper's 1024).

    Returns
    -------
    torch.Tensor, shape (b, h, w, dim)
    """
    # f(h, w) <- (1/9) sum over the 3x3 neighbourhood (zero padded, as PatchCore's unfold)
    local2 = F.avg_pool2d(layer2, 3, stride=1, padding=1)
    local3 = F.avg_pool2d(layer3, 3, stride=1, padding=1)
    local3 = F.interpolate(local3, size=layer2.shape[-2:], mode="bilinear", align_corners=False)
    stacked = torch.cat([local2, local3], 1).permute(0, 2, 3, 1)  # (b, h, w, c2 + c3)
    b, h, w, c = stacked.shape
    pooled = F.adaptive_avg_pool1d(stacked.reshape(b * h * w, 1, c), dim)  # channels c -> dim
    return pooled.reshape(b, h, w, dim)


def extract_features(
    images: ImageSet,
    *,
    kind: str = "patch",
    weights: str | Path = "none",
    seed: int = 0,
    resize: int = 256,
    crop: int | None = 224,
    batch_size: int = 16,
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Features of every image, from the on-disk cache when they were computed before.

    Parameters
    ----------
    images : ImageSet
    kind : {"patch", "global"}
        ``"patch"``: the locally aware patch features (the method's memory bank).
        ``"global"``: the average-pooled output of the last stage (layer4), one vector per
        image, as SPADE uses to find each image's nearest images.
    weights, seed : see :func:`build_backbone`.
    resize, crop : see :func:`patchlab.data.preprocess`.
    batch_size : int
        Images per forward pass.
    device : "auto", "cpu", "cuda", ...
    cache_dir : path, optional
        Folder of the cache (default ``$PATCHLAB_CACHE`` or ``~/.cache/patchlab``).

    Returns
    -------
    torch.Tensor, float32, on the CPU
        ``"patch"``: shape (n_images, 28, 28, 1024); ``"global"``: shape (n_images, 2048).
    """
    if kind not in ("patch", "global"):
        raise ValueError(f"kind={kind!r} is unknown; choose 'patch' or 'global'")
    key = feature_key(images, weights=weights, seed=seed, resize=resize, crop=crop)
    stem = "features" if kind == "patch" else "global"
    path = Path(cache_dir or default_cache_dir()) / f"{stem}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))

    device = resolve_device(device)
    model = build_backbone(weights, seed).to(device)
    batches = [images.paths[i : i + batch_size] for i in range(0, len(images), batch_size)]
    out = []
    bar = tqdm(total=len(images), desc=f"{kind} features", unit="img", disable=not progress)
    # cuDNN convolves in TF32 by default on Ampere and later (features then differ from the
    # CPU's by ~1e-2): float32 throughout, so cached features do not depend on the device
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            for batch in batches:
                x = torch.stack([preprocess(read_rgb(p), resize, crop) for p in batch]).to(device)
                layer2, layer3 = backbone_layers(model, x)
                if kind == "patch":
                    out.append(aggregate(layer2, layer3).float().cpu())
                else:
                    out.append(model.layer4(layer3).mean((2, 3)).float().cpu())
                bar.update(len(batch))
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    bar.close()
    features = torch.cat(out)
    atomic_save(path, features=features.numpy())
    return features


def feature_key(images: ImageSet, **settings) -> str:
    """Hash of everything that changes the features: files (path, size, mtime) and settings."""
    files = [
        (str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in images.paths
    ]
    settings["weights"] = weights_identity(settings["weights"], settings["seed"])
    record = {
        "version": FEATURE_VERSION,
        "backbone": "wide_resnet50_2",
        "layers": [2, 3],
        "dim": FEATURE_DIM,
        "files": files,
        **settings,
    }
    return cache_key(record)


def receptive_field(
    model: torch.nn.Module, x: torch.Tensor, row: int, col: int
) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """What one patch feature "sees": the gradient of its norm with respect to the input pixels.

    The effective receptive field of patch (row, col) is |d ||f(row, col)|| / d x|, summed over
    the colour channels; the pixels where it is non-zero form the theoretical receptive field
    (every pixel the convolutions reach, cut at the image border).

    Parameters
    ----------
    model : the backbone of :func:`build_backbone`
    x : torch.Tensor, shape (3, S, S)
        One preprocessed image.
    row, col : int
        The patch position on the (S / 8, S / 8) feature grid.

    Returns
    -------
    weight : np.ndarray, shape (S, S), float32
        The gradient magnitude, scaled to a maximum of 1.
    box : (top, left, bottom, right)
        The bounding box of the non-zero gradient, in pixels (bottom, right exclusive).
    """
    inp = x[None].clone().requires_grad_(True)
    with torch.enable_grad():
        feature = aggregate(*backbone_layers(model, inp))[0, row, col]
        feature.norm().backward()
    weight = inp.grad[0].abs().sum(0)
    rows = torch.nonzero(weight.sum(1)).flatten()
    cols = torch.nonzero(weight.sum(0)).flatten()
    box = (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)
    weight = (weight / weight.max().clamp_min(1e-30)).float().numpy()
    return weight, box
