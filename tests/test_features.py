import os

import torch
import torch.nn.functional as F

from patchlab import features as feat
from patchlab.backbones import get_backbone
from patchlab.cache import feature_key
from patchlab.data import load_mvtec
from patchlab.features import aggregate, extract_features


def test_aggregate_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    l2, l3 = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 9, 4, 4, generator=g)
    out = aggregate([l2, l3], dim=10)
    assert out.shape == (2, 8, 8, 10)
    # position (3, 5) of image 1: 3x3 means (zero padded), layer3 upsampled bilinearly
    pad2 = F.pad(l2, (1, 1, 1, 1))
    local2 = pad2[1, :, 3:6, 5:8].mean((1, 2))
    local3 = F.avg_pool2d(l3, 3, 1, 1)
    up3 = F.interpolate(local3, size=(8, 8), mode="bilinear", align_corners=False)[1, :, 3, 5]
    both = torch.cat([local2, up3])  # 15 channels -> 10 by adaptive average pooling
    expect = torch.stack([both[(i * 15) // 10 : -(-(i + 1) * 15 // 10)].mean() for i in range(10)])
    torch.testing.assert_close(out[1, 3, 5], expect)
    # dim=None (or the full width) keeps every channel: the concatenation itself
    torch.testing.assert_close(aggregate([l2, l3])[1, 3, 5], both)
    torch.testing.assert_close(aggregate([l2, l3], 15), aggregate([l2, l3]))


def test_features_shape_seeded_and_cached(tiny_demo, tmp_path, monkeypatch):
    images = load_mvtec(tiny_demo, "brick", "ano")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    first = extract_features(images, cache_dir=tmp_path, batch_size=2, progress=False)
    # TF32 convolutions are off during extraction only (tests/test_cuda.py checks the values)
    assert torch.backends.cudnn.allow_tf32 is True
    # the default: pretrained EfficientNet-Lite0, blocks 4 + 10 -> 40 + 112 = 152 channels
    assert first.shape == (3, 28, 28, 152) and first.dtype == torch.float32
    assert torch.isfinite(first).all() and first.std() > 0
    assert len(list(tmp_path.glob("features-*.npy"))) == 1

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(feat, "build_backbone", no_backbone)
    again = extract_features(images, cache_dir=tmp_path, batch_size=3, progress=False)
    assert torch.equal(first, again)
    monkeypatch.undo()
    random0 = extract_features(images, weights="none", cache_dir=tmp_path, progress=False)
    random1 = extract_features(images, weights="none", seed=1, cache_dir=tmp_path, progress=False)
    assert not torch.allclose(random0, random1) and not torch.allclose(random0, first)
    assert len(list(tmp_path.glob("features-*.npy"))) == 3
    glob = extract_features(images, kind="global", cache_dir=tmp_path, progress=False)
    assert glob.shape == (3, get_backbone("efficientnet_lite0").global_dim)


def test_wide_resnet_features_are_1024_wide(tiny_demo, tmp_path):
    images = load_mvtec(tiny_demo, "brick", "ano").subset([0])
    out = extract_features(
        images, backbone="wide_resnet50_2", weights="none", cache_dir=tmp_path, progress=False
    )
    assert out.shape == (1, 28, 28, 1024)


def test_cache_key_changes_with_files_and_settings(tiny_demo):
    images = load_mvtec(tiny_demo, "brick", "ano")
    base = dict(backbone="efficientnet_lite0", weights="imagenet", seed=0, resize=256, crop=224)
    key = feature_key(images.paths, **base)
    assert feature_key(images.paths, **base) == key
    assert feature_key(images.paths, **(base | {"crop": None, "resize": 224})) != key
    assert feature_key(images.paths, **(base | {"weights": "none"})) != key
    assert feature_key(images.paths, **(base | {"backbone": "wide_resnet50_2"})) != key
    none = base | {"weights": "none"}
    assert feature_key(images.paths, **(none | {"seed": 2})) != feature_key(images.paths, **none)
    assert feature_key(images.subset([0, 1]).paths, **base) != key
    path = images.paths[0]
    stat = os.stat(path)
    original = path.read_bytes()
    try:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, not edited
        assert feature_key(images.paths, **base) == key  # the same bytes: nothing recomputed
        # an edit that keeps the size and the modification time (as cp -p or rsync can)
        edited = bytearray(original)
        edited[-20] ^= 0xFF
        path.write_bytes(bytes(edited))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert os.stat(path).st_size == stat.st_size
        assert os.stat(path).st_mtime_ns == stat.st_mtime_ns
        assert feature_key(images.paths, **base) != key
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
