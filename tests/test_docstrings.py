"""Every docstring example in the package runs and prints what it says (River-style docs).

pytest's ``--doctest-modules`` only sees ``testpaths`` (``tests/``), so the package's examples
are collected here, one test per module.
"""

import doctest
import importlib
import pkgutil

import pytest

import stream_lstm

MODULES = sorted(m.name for m in pkgutil.walk_packages(stream_lstm.__path__, "stream_lstm."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
