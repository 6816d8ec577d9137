"""Package metadata agrees with what the README promises."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent


def test_classifiers_list_every_django_the_readme_supports():
    """Each Django version of the README's "Supported:" line has its trove classifier."""
    readme = (ROOT / "README.md").read_text()
    line = re.search(r"Supported: Django ([^\n]*)", readme)
    assert line is not None
    claimed = set(re.findall(r"\b(\d\.\d)\b", line.group(1).split(" on Python")[0]))
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = {
        c.rsplit(" :: ", 1)[1]
        for c in meta["project"]["classifiers"]
        if c.startswith("Framework :: Django :: ")
    }
    assert claimed, line.group(0)
    assert listed == claimed
