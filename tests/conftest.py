"""Shared fixtures: a tiny demo data set and a private feature cache for the whole session."""

from __future__ import annotations

from pathlib import Path

import pytest

from patchlab.demo import make_demo_data

SHARED_TILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "magnetic_tile"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test writes features and neighbour tables into a temporary cache."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("PATCHLAB_CACHE", str(cache))
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory) -> Path:
    """One demo category (brick) with 3 train/good, 3 test/good and 3 defective images."""
    root = tmp_path_factory.mktemp("demo")
    return make_demo_data(root, categories=["brick"], n_train=3, n_test_good=3, n_defective=3)
