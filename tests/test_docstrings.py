"""Every docstring example in the package runs and prints what it says (River-style docs).

pytest's ``--doctest-modules`` only sees ``testpaths`` (``tests/``), so the package's examples
are collected here, one test per module. And every public class has an example of its own (or
names the test that shows it), checked here too.
"""

import ast
import doctest
import importlib
import pathlib
import pkgutil
import re
import tempfile

import pytest

import stream_lstm

MODULES = sorted(m.name for m in pkgutil.walk_packages(stream_lstm.__path__, "stream_lstm."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    # Examples make scratch files with tempfile (mkdtemp): here they land in pytest's tmp_path,
    # which pytest removes, rather than accumulate in /tmp run after run.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"


# ---- every public class shows its use (issue 17) ---------------------------------------------
PACKAGE = pathlib.Path(stream_lstm.__file__).parent
ROOT = PACKAGE.parent
# A class that needs a live broker or process to be useful names, instead of a doctest, the test
# that shows it, on a line of its own: "Example: see tests/<file>.py::<test>".
SEE_TEST = re.compile(r"^Example: see (tests/[\w/]+\.py)::(\w+)\s*$", re.M)


def public_classes():
    """``(module, class name, docstring)`` of every public top-level class of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                yield module, node.name, ast.get_docstring(node) or ""


def defines_test(path: pathlib.Path, test: str) -> bool:
    """Whether ``path`` exists and defines the test function ``test`` (or a class's method)."""
    if not path.is_file():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == test
               for n in ast.walk(tree))


def test_every_public_class_has_a_runnable_example_or_names_the_test_that_shows_it():
    """River's standard: each public class has a short ``>>>`` example in its own docstring, or,
    when it needs a broker or a process, a line naming a real test that shows it. Exceptions are
    exempt."""
    missing, broken = [], []
    for module, name, doc in public_classes():
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            continue
        refs = SEE_TEST.findall(doc)
        broken += [f"{module}.{name}: {file}::{test}" for file, test in refs
                   if not defines_test(ROOT / file, test)]
        if ">>>" not in doc and not refs:
            missing.append(f"{module}.{name}")
    assert not missing, ("public classes without a '>>>' example or an 'Example: see "
                         f"tests/<file>.py::<test>' line in their own docstring: {missing}")
    assert not broken, f"examples that name a test that does not exist: {broken}"
