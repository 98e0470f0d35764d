"""Tests mirror the package: each module ``stream_lstm/a/b.py`` has its test module
``tests/a/test_b.py`` (a top-level ``stream_lstm/b.py``: ``tests/test_b.py``); ``__init__.py``
files are exempt. Other test modules (integration tests, tests named after a concern) may sit
beside them; this only says that no module goes without its own."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE, TESTS = REPO / "stream_lstm", REPO / "tests"


def mirrored(module: Path) -> Path:
    """The test module that ``module`` (a file under ``stream_lstm/``) should have."""
    relative = module.relative_to(PACKAGE)
    return TESTS / relative.parent / f"test_{relative.name}"


def missing_test_modules() -> list[str]:
    return sorted(f"{module.relative_to(REPO)} -> {mirrored(module).relative_to(REPO)}"
                  for module in PACKAGE.rglob("*.py")
                  if module.name != "__init__.py" and not mirrored(module).is_file())


def test_the_rule_maps_modules_to_their_test_modules():
    assert mirrored(PACKAGE / "worker.py") == TESTS / "test_worker.py"
    assert mirrored(PACKAGE / "tools" / "bench" / "cli.py") == TESTS / "tools" / "bench" / "test_cli.py"


def test_every_module_has_its_mirrored_test_module():
    modules = [m for m in PACKAGE.rglob("*.py") if m.name != "__init__.py"]
    assert len(modules) > 50, f"found only {len(modules)} modules under {PACKAGE}"  # walked the right tree
    missing = missing_test_modules()
    assert not missing, ("modules without their test module (tests mirror the package):\n  "
                         + "\n  ".join(missing))
