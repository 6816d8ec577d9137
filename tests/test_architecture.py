"""The architecture says what it is: every module has its place in the layering that
import-linter enforces (``lint-imports`` in the lint session), and docs/architecture.md
describes it."""

from __future__ import annotations

import pkgutil
import re
from pathlib import Path

import conndiag

try:
    import tomllib
except ImportError:  # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    assert contract["containers"] == ["conndiag"]
    return [re.split(r"\s*[|:]\s*", layer.strip()) for layer in contract["layers"]]


def test_every_module_has_its_place_in_the_layers():
    """A new module must be put in the layering (pyproject.toml and docs/architecture.md),
    so that its imports are checked: no module is left out, none is listed twice."""
    listed = [name for layer in _layers() for name in layer]
    assert len(listed) == len(set(listed))
    top_level = {m.name for m in pkgutil.iter_modules(conndiag.__path__)}
    assert set(listed) == top_level


def test_docs_architecture_names_every_layer_module():
    """docs/architecture.md describes the layers the contract enforces, module by module."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    for layer in _layers():
        for name in layer:
            assert f"`{name}`" in text, name
