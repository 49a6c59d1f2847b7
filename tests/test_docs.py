"""The documentation runs and stands on its own: every method module's doctests pass, every registry
method's factory has a runnable example, docs/algorithms.md covers every method, and no shipped file
points to documents that only exist on the developers' machines."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import flatjax
import flatjax.methods
from flatjax.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

#: every module under flatjax/methods (each must have examples)
METHOD_MODULES = sorted(f"flatjax.methods.{m.name}" for m in pkgutil.iter_modules(flatjax.methods.__path__))
#: other modules whose docstrings carry examples (must have them) or may (run if present)
OTHER_MODULES = {"flatjax.core.estimator": True, "flatjax.registry": False}

#: references to material users of the package do not have
FORBIDDEN = ("ALGORITHMS.md", "official-code-notes", "/" + "work/", "shared/spec")  # split: no machine path here


def _run_doctests(name: str) -> doctest.TestResults:
    module = importlib.import_module(name)
    return doctest.testmod(module, optionflags=OPTIONS, report=False)


def test_every_registry_method_lives_in_a_documented_module():
    modules = {f"flatjax.methods.{m.factory.rsplit('.', 1)[0]}" for m in METHODS.values()}
    assert modules <= set(METHOD_MODULES)


@pytest.mark.parametrize("name", METHOD_MODULES)
def test_method_module_doctests(name):
    result = _run_doctests(name)
    assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name} (output above)"


@pytest.mark.parametrize("name", sorted(OTHER_MODULES))
def test_core_module_doctests(name):
    result = _run_doctests(name)
    if OTHER_MODULES[name]:
        assert result.attempted > 0, f"{name} has no doctest examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed in {name} (output above)"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_factory_has_a_runnable_example(name):
    estimator_doc = METHODS[name].estimator.__doc__ or ""
    assert ">>>" in estimator_doc, f"flatjax.estimators.{name} has no doctest example (or no docstring)"
    assert "Example" in estimator_doc
    # the Optax form is generated from the estimator factory and carries its docstring
    assert ">>>" in (getattr(flatjax, name).__doc__ or "")


def test_algorithms_doc_covers_every_method():
    text = (ROOT / "docs" / "algorithms.md").read_text(encoding="utf-8")
    missing = [name for name in METHODS if f"`flatjax.{name}`" not in text and f"`{name}`" not in text]
    assert not missing, f"docs/algorithms.md does not mention {missing}"
    assert "## Writing a method" in text


def _shipped_files() -> list[Path]:
    files = [*sorted((ROOT / "flatjax").rglob("*.py")), *sorted((ROOT / "experiments").rglob("*.py")),
             *sorted((ROOT / "docs").glob("*.md"))]
    assert files
    return files


def test_no_pointers_to_unshipped_documents():
    hits = []
    for path in _shipped_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for word in FORBIDDEN:
                if word in line:
                    hits.append(f"{path.relative_to(ROOT)}:{number}: {word!r}: {line.strip()}")
    assert not hits, "references to documents users do not have:\n" + "\n".join(hits)
