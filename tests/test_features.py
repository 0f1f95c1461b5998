import os

import pytest
import torch
import torch.nn.functional as F
import torchvision

from patchlab import features as feat
from patchlab.data import load_mvtec
from patchlab.features import IMAGENET_FILE, aggregate, build_backbone, extract_features


def test_aggregate_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    l2, l3 = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 9, 4, 4, generator=g)
    out = aggregate(l2, l3, dim=10)
    assert out.shape == (2, 8, 8, 10)
    # position (3, 5) of image 1: 3x3 means (zero padded), layer3 upsampled bilinearly
    pad2 = F.pad(l2, (1, 1, 1, 1))
    local2 = pad2[1, :, 3:6, 5:8].mean((1, 2))
    local3 = F.avg_pool2d(l3, 3, 1, 1)
    up3 = F.interpolate(local3, size=(8, 8), mode="bilinear", align_corners=False)[1, :, 3, 5]
    both = torch.cat([local2, up3])  # 15 channels -> 10 by adaptive average pooling
    expect = torch.stack([both[(i * 15) // 10 : -(-(i + 1) * 15 // 10)].mean() for i in range(10)])
    torch.testing.assert_close(out[1, 3, 5], expect)


def test_features_shape_seeded_and_cached(tiny_demo, tmp_path, monkeypatch):
    images = load_mvtec(tiny_demo, "brick", "ano")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    first = extract_features(images, cache_dir=tmp_path, batch_size=2, progress=False)
    # TF32 convolutions are off during extraction only (tests/test_cuda.py checks the values)
    assert torch.backends.cudnn.allow_tf32 is True
    assert first.shape == (3, 28, 28, 1024) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and first.std() > 0
    assert len(list(tmp_path.glob("features-*.npy"))) == 1

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(feat, "build_backbone", no_backbone)
    again = extract_features(images, cache_dir=tmp_path, batch_size=3, progress=False)
    assert torch.equal(first, again)
    monkeypatch.undo()
    other_seed = extract_features(images, seed=1, cache_dir=tmp_path, progress=False)
    assert not torch.allclose(first, other_seed)
    assert len(list(tmp_path.glob("features-*.npy"))) == 2


def test_cache_key_changes_with_files_and_settings(tiny_demo):
    images = load_mvtec(tiny_demo, "brick", "ano")
    base = dict(weights="none", seed=0, resize=256, crop=224)
    key = feat.feature_key(images, **base)
    assert feat.feature_key(images, **base) == key
    assert feat.feature_key(images, **(base | {"crop": None, "resize": 224})) != key
    assert feat.feature_key(images, **(base | {"seed": 2})) != key
    assert feat.feature_key(images.subset([0, 1]), **base) != key
    path = images.paths[0]
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was edited
    try:
        assert feat.feature_key(images, **base) != key
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_weights_from_a_state_dict_file(tmp_path):
    model = build_backbone("none", seed=5)
    path = tmp_path / "wrn.pth"
    torch.save(model.state_dict(), path)
    loaded = build_backbone(path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(next(build_backbone("none", 6).parameters()), next(model.parameters()))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "wrapped.pth")
    assert torch.equal(
        next(build_backbone(tmp_path / "wrapped.pth").parameters()), next(model.parameters())
    )
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth is not a WideResNet-50-2 state dict"):
        build_backbone(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth does not exist"):
        build_backbone(tmp_path / "missing.pth")


def test_imagenet_weights_through_torchvision_hub_cache(tmp_path, monkeypatch):
    """The real loading path (torchvision's weights API) with a locally saved state dict."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert torchvision.models.Wide_ResNet50_2_Weights.IMAGENET1K_V1.url.endswith(IMAGENET_FILE)
    model = build_backbone("none", seed=7)
    (tmp_path / "checkpoints").mkdir()
    torch.save(model.state_dict(), tmp_path / "checkpoints" / IMAGENET_FILE)
    loaded = build_backbone("imagenet")
    assert torch.equal(loaded.layer3[0].conv1.weight, model.layer3[0].conv1.weight)


def test_missing_imagenet_weights_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=f"{IMAGENET_FILE}.*--weights PATH"):
        build_backbone("imagenet")
