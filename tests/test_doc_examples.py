"""The examples in the docstrings of the public entry points run, and print what they say."""

from __future__ import annotations

import doctest

import pytest

import patchlab.experiment
import patchlab.knn

MODULES = [patchlab.knn, patchlab.experiment]  # knn(), run(), rescore()


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no example"
    assert result.failed == 0
