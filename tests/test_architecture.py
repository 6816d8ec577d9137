"""The architecture says what it is: every module has its place in the layering that
import-linter enforces (``lint-imports`` in the lint session), docs/architecture.md
describes it, and the package's docstrings and comments cite files that exist."""

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
PACKAGE = ROOT / "conndiag"


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


#: a file a docstring or comment may cite: a path with a directory, or a bare file name
_CITED = re.compile(
    r"(?<![\w/.-])((?:docs|tests|scripts|dashboards|demo_site|conndiag|\.ci)/[\w./-]*\w"
    r"|[\w-]+\.(?:py|md|toml|ya?ml|json|cfg|ini))\b"
)
#: file names that are not this repository's (Django's, a project's)
_NOT_OURS = {"manage.py", "settings.py", "urls.py", "wsgi.py", "asgi.py", "conftest.py"}


def _cited(path: Path) -> set[str]:
    found = set()
    for line in path.read_text().splitlines():
        for match in _CITED.finditer(line):
            found.add(match.group(1).rstrip("."))
    return found


def _exists(cited: str, module: Path) -> bool:
    if "/" in cited:
        return (ROOT / cited).exists()
    return any((base / cited).exists() for base in (module.parent, PACKAGE, ROOT, ROOT / "docs"))


def test_docstrings_cite_files_that_exist():
    """Every file a conndiag module cites (``docs/metrics.md``, ``conndiag/contain.py``,
    ``install.py``) exists in the repository."""
    missing = []
    for module in sorted(PACKAGE.rglob("*.py")):
        for cited in _cited(module):
            if cited in _NOT_OURS or cited.startswith("conndiag."):
                continue
            if not _exists(cited, module):
                missing.append(f"{module.relative_to(ROOT)}: {cited}")
    assert missing == []
