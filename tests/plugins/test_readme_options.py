"""Every option of every built-in and example plugin is described in its README.md.

An option is a field of an attrs class named ``*Options`` in the plugin's package; the
README must name it as code: in backticks (`` `name` ``, `` `name = 1` ``) or as the key of a
TOML line (``name = ...``), not just as a word of prose (``buffer``, ``timeout`` are
common words). Inherited fields included, e.g. dot's TLS options in doh.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

import attrs
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _packages() -> list[tuple[str, Path]]:
    """(importable package name, its README) for each plugin directory and example."""
    found = [
        (f"plugins.{d.name}", d / "README.md")
        for d in sorted((ROOT / "plugins").iterdir())
        if (d / "__init__.py").exists()
    ]
    for example in sorted((ROOT / "examples").iterdir()):
        for pkg in sorted(example.glob("src/*/__init__.py")):
            found.append((pkg.parent.name, example / "README.md"))
    return found


def undescribed(package: str, readme: str) -> list[str]:
    """``Class.field`` of each option in ``package`` (all its modules) that ``readme`` never names."""
    root = importlib.import_module(package)
    modules = [root] + [
        importlib.import_module(f"{package}.{p.stem}")
        for p in sorted(Path(root.__file__).parent.glob("*.py"))
        if p.stem != "__init__"
    ]
    return [
        f"{cls.__name__}.{field.name}"
        for module in modules
        for cls in vars(module).values()
        if isinstance(cls, type) and attrs.has(cls) and cls.__name__.endswith("Options")
        if cls.__module__ == module.__name__
        for field in attrs.fields(cls)
        if not re.search(
            rf"`{re.escape(field.name)}[` =]|^\s*{re.escape(field.name)} =", readme, re.M
        )
    ]


PACKAGES = _packages()


@pytest.mark.parametrize(("package", "readme"), PACKAGES, ids=[p for p, _ in PACKAGES])
def test_every_option_is_in_the_readme(package: str, readme: Path, monkeypatch):
    monkeypatch.setattr(sys, "path", [str(readme.parent / "src"), *sys.path])
    assert readme.exists()
    assert undescribed(package, readme.read_text()) == []


def test_the_check_finds_an_undescribed_option():
    assert undescribed("plugins.cache", "") != []
    prose = "The cache keeps max_entries answers, min_ttl and max_ttl apart."
    assert {"CacheOptions.max_entries", "CacheOptions.min_ttl"} <= set(
        undescribed("plugins.cache", prose)
    )
    code = "`max_entries` and `min_ttl = 0`;\n```toml\nmax_ttl = 60\n```"
    assert not {"CacheOptions.max_entries", "CacheOptions.min_ttl", "CacheOptions.max_ttl"} & set(
        undescribed("plugins.cache", code)
    )
    text = (ROOT / "plugins" / "cache" / "README.md").read_text()
    assert undescribed("plugins.cache", text) == []
