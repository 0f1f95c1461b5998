"""The options beyond the paper (issue 19), each against an independent computation: the
image-score rules ``top`` and ``max_median``, MuSc's RsCIN, LNAMD (several neighbourhood
sizes), streamed mutual scoring and the label-free K diagnostic."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from patchlab import methods
from patchlab.cache import feature_key
from patchlab.cli import _config, build_parser
from patchlab.config import RunConfig
from patchlab.diagnostics import choose_k, k_stability
from patchlab.features import aggregate
from patchlab.knn import knn
from patchlab.maps import image_scores, rscin
from patchlab.methods import ScoringInputs, score_patches


def test_top_and_max_median_rules_match_numpy():
    g = torch.Generator().manual_seed(1)
    patch = torch.rand(5, 7, 9, generator=g)
    flat = patch.reshape(5, -1).double().numpy()
    top = int(np.ceil(0.05 * 63))  # 4 of 63 patches
    expect_top = np.sort(flat, 1)[:, -top:].mean(1)
    np.testing.assert_allclose(image_scores(patch, "top", q=0.05), expect_top)
    # q small: one patch, the maximum itself
    np.testing.assert_allclose(image_scores(patch, "top", q=1e-6), flat.max(1))
    # torch's median of an odd count is numpy's
    np.testing.assert_allclose(image_scores(patch, "max_median"), flat.max(1) - np.median(flat, 1))
    with pytest.raises(ValueError, match="top_q"):
        image_scores(patch, "top", q=0)
    even = torch.rand(3, 28, 28, generator=g)  # 784 patches: the median of the middle two
    flat = even.reshape(3, -1).double().numpy()
    np.testing.assert_allclose(image_scores(even, "max_median"), flat.max(1) - np.median(flat, 1))


def rscin_loop(scores, g, windows):
    """MuSc's RsCIN as a plain loop: similarity matrix, k most similar (itself first)."""
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sim = g @ g.T
    out = np.zeros(len(scores))
    for k in windows:
        for i in range(len(scores)):
            order = [i] + [j for j in np.argsort(-sim[i], kind="stable") if j != i][: k - 1]
            w = np.maximum(sim[i, order], 0)
            out[i] += (w * scores[order]).sum() / w.sum()
    return out / len(windows)


def test_rscin_matches_a_loop_and_is_affine_equivariant():
    g = torch.Generator().manual_seed(2)
    glob = torch.rand(12, 6, generator=g)  # non-negative, as pooled ReLU features
    scores = torch.rand(12, generator=g).double().numpy()
    ours = rscin(scores, glob, (2, 3))
    np.testing.assert_allclose(ours, rscin_loop(scores, glob.double().numpy(), (2, 3)))
    # MuSc min-max normalises first: a convex combination commutes with any affine map
    np.testing.assert_allclose(rscin(3 * scores + 1, glob, (2, 3)), 3 * ours + 1)
    np.testing.assert_allclose(rscin(scores, glob, (1,)), scores)  # window 1: unchanged
    np.testing.assert_allclose(rscin(scores, glob, (13,)), rscin(scores, glob, (12,)))  # all
    with pytest.raises(ValueError, match="windows"):
        rscin(scores, glob, (0,))


def test_aggregate_at_other_neighbourhood_sizes():
    g = torch.Generator().manual_seed(3)
    fmap = torch.randn(1, 4, 9, 9, generator=g)
    # r = 1: the map itself; r = 5: the zero-padded 5 x 5 mean, written out
    torch.testing.assert_close(aggregate([fmap], local=1)[0], fmap[0].permute(1, 2, 0))
    padded = F.pad(fmap, (2, 2, 2, 2))[0]
    expect = padded[:, 4 - 2 + 2 : 4 + 3 + 2, 6 - 2 + 2 : 6 + 3 + 2].mean((1, 2))
    torch.testing.assert_close(aggregate([fmap], local=5)[0, 4, 6], expect)


def test_feature_key_records_the_size_only_when_not_the_default(tiny_demo):
    from patchlab.data import load_mvtec

    paths = load_mvtec(tiny_demo, "brick", "test").paths
    kw = dict(backbone="efficientnet_lite0", weights="none", seed=0, resize=256, crop=224)
    keys = {r: feature_key(paths, **kw, local=r) for r in (1, 3, 5)}
    assert len(set(keys.values())) == 3
    assert keys[3] == feature_key(paths, **kw)  # the default's key is unchanged


def test_lnamd_averages_the_scores_of_every_size():
    g = torch.Generator().manual_seed(4)
    sizes = [torch.randn(4, 3, 3, 6, generator=g) for _ in range(3)]
    tables = [knn(x.reshape(-1, 6), 5, exclude="self", progress=False) for x in sizes]
    parts = [ScoringInputs(x, t, local=r) for x, t, r in zip(sizes, tables, (3, 1, 5), strict=True)]
    joint = replace(parts[0], others=tuple(parts[1:]))
    for method, options in (("patchcluster", {}), ("mutual", {"ratio": 0.5})):
        each = [score_patches(method, p, 5, **options).double() for p in parts]
        expect = (sum(each) / 3).float()
        torch.testing.assert_close(score_patches(method, joint, 5, **options), expect)


def test_streamed_mutual_scoring_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(5)
    feats = torch.randn(7, 4, 4, 5, generator=g)
    whole = score_patches("mutual", ScoringInputs(feats), 1, ratio=0.4)
    monkeypatch.setattr(methods, "MUTUAL_BLOCK", 7 * 16 * 2)  # two images a block: 4 blocks
    torch.testing.assert_close(score_patches("mutual", ScoringInputs(feats), 1, ratio=0.4), whole)


def test_k_stability_is_the_spearman_of_eq2_scores():
    g = torch.Generator().manual_seed(6)
    feats = torch.randn(5, 4, 4, 8, generator=g)
    table = knn(feats.reshape(-1, 8), 20, exclude="self", progress=False)
    curve = k_stability(table, 5, (1, 5, 20, 50))  # 50 > k_max: dropped
    assert [(c["k"], c["next_k"]) for c in curve] == [(1, 5), (5, 20)]
    d = table.distances.double().numpy()
    for c in curve:
        a, b = d[:, : c["k"]].mean(1), d[:, : c["next_k"]].mean(1)
        assert c["rho_patch"] == pytest.approx(spearmanr(a, b).statistic)
        ia, ib = a.reshape(5, -1).max(1), b.reshape(5, -1).max(1)
        assert c["rho_image"] == pytest.approx(spearmanr(ia, ib).statistic)


def test_choose_k_takes_the_first_k_stable_from_then_on():
    curve = [
        {"k": 1, "next_k": 5, "rho_image": 0.5},
        {"k": 5, "next_k": 10, "rho_image": 0.995},
        {"k": 10, "next_k": 25, "rho_image": 0.97},
        {"k": 25, "next_k": 50, "rho_image": 0.999},
    ]
    assert choose_k(curve, 0.99) == 25  # 5 is stable once, then moves again
    assert choose_k(curve, 0.9) == 5
    assert choose_k(curve, 0.9999) == 50  # never stable: the largest K
    with pytest.raises(ValueError, match="empty"):
        choose_k([])


def test_config_and_cli_take_the_new_options():
    args = build_parser().parse_args(
        [
            "run",
            "d",
            "--out",
            "o",
            "--local-sizes",
            "3",
            "1",
            "5",
            "--rscin",
            "2",
            "3",
            "--image-score",
            "top",
            "--top-q",
            "0.02",
        ]
    )
    config = _config(args)
    assert config.local_sizes == (3, 1, 5) and config.rscin == (2, 3)
    assert config.image_score == "top" and config.top_q == 0.02
    assert _config(build_parser().parse_args(["run", "d", "--out", "o", "--rscin"])).rscin == ()
    # as JSON gives a config back: lists are the same setting
    assert RunConfig(data="d", local_sizes=[3, 1], rscin=[2]) == RunConfig(
        data="d", local_sizes=(3, 1), rscin=(2,)
    )
    for bad, match in (
        ({"local_sizes": (2,)}, "odd"),
        ({"local_sizes": (3, 3)}, "repeats"),
        ({"local_sizes": (3.0,)}, "tuple of integers"),
        ({"rscin": (0,)}, "rscin"),
        ({"top_q": 1.5}, "top_q"),
        ({"image_score": "median"}, "unknown"),
    ):
        with pytest.raises(ValueError, match=match):
            RunConfig(data="d", **bad)


def test_a_run_with_lnamd_and_rscin(tiny_demo):
    from patchlab.experiment import prepare, rescore

    config = RunConfig(
        data=str(tiny_demo),
        category="brick",
        weights="none",
        k=3,
        method="mutual",
        local_sizes=(3, 1),
        rscin=(2, 3),
        image_score="top",
    )
    images, inputs, masks, seconds = prepare(config, progress=False)
    assert len(inputs.others) == 1 and inputs.global_features is not None
    assert [inputs.local, inputs.others[0].local] == [3, 1]
    assert seconds["features"] > 0 and "neighbours" in seconds
    result = rescore(config, images, inputs, masks)
    assert result.metrics["image_score"] == "top"
    plain = rescore(replace(config, rscin=()), images, inputs, masks)
    expect = rscin(plain.image_scores, inputs.global_features, (2, 3))
    np.testing.assert_allclose(result.image_scores, expect)
    for other in ((3,), (1, 3), (3, 5)):
        with pytest.raises(ValueError, match=r"prepared with sizes \(3, 1\)"):
            rescore(replace(config, local_sizes=other), images, inputs, masks)
    # RsCIN needs the global features that prepare() loads for it
    bare = replace(inputs, global_features=None)
    with pytest.raises(ValueError, match="global features"):
        rescore(config, images, bare, masks)


def test_k_curve_command_prints_the_curve_and_a_k(tiny_demo, capsys):
    from patchlab.cli import main

    args = ["k-curve", str(tiny_demo), "--category", "brick", "--weights", "none", "--quiet"]
    assert main([*args, "--ladder", "1", "5", "20", "--threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "    1     5" in out and "    5    20" in out
    assert "suggested K = 1:" in out  # threshold 0: stable from the first step
    assert main([*args, "--ladder", "1", "5", "20", "--threshold", "1.01"]) == 0
    assert "suggested K = 20:" in capsys.readouterr().out  # never stable: the largest
