"""No built-in plugin keeps mutable state at module level (issue 14 item 1): two Servers in
one process would share it. Per-server state belongs to steps, services or `setup.shared`."""

from __future__ import annotations

import ast
import enum
import importlib
import ipaddress
import logging
import re
import struct
import sys
import types
import typing
from pathlib import Path, PurePath
from typing import Any

import attrs
import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def plugin_files() -> list[Path]:
    """The built-in plugins' and the examples' module files: an example's sources only
    (a test that installs one leaves a build/ copy beside them)."""
    return sorted([*(ROOT / "plugins").rglob("*.py"), *ROOT.glob("examples/*/src/**/*.py")])


MUTABLE_CALLS = {
    "list",
    "dict",
    "set",
    "bytearray",
    "defaultdict",
    "OrderedDict",
    "Counter",
    "deque",
    "WeakValueDictionary",
    "WeakKeyDictionary",
    "WeakSet",
}
CACHES = {"lru_cache", "cache"}


def _name(node: ast.expr) -> str:
    """The last dotted part of a called or decorating name (``weakref.WeakSet`` -> WeakSet)."""
    node = node.func if isinstance(node, ast.Call) else node
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def module_state(tree: ast.Module) -> list[str]:
    """Module-level names bound to mutable containers, and module functions with caches.

    An UPPER_CASE name bound to a display (``{...}``, ``[...]``) is a constant table by
    the style guide and is allowed; a container built by a call never is.
    """
    found = []
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for name, value in _bindings(targets, node.value):
                display = isinstance(
                    value, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp
                )
                built = isinstance(value, ast.Call) and _name(value) in MUTABLE_CALLS
                if built or (display and not name.lstrip("_").isupper()):
                    found.append(name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            _name(d) in CACHES for d in node.decorator_list
        ):
            found.append(f"{node.name}()")
    found += [
        f"global {n}" for node in ast.walk(tree) if isinstance(node, ast.Global) for n in node.names
    ]
    return found


def _bindings(targets: list[ast.expr], value: ast.expr) -> list[tuple[str, ast.expr]]:
    """(name, value) pairs of an assignment, unpacking ``a, b = [], {}`` element-wise."""
    pairs = []
    for target in targets:
        if isinstance(target, ast.Name):
            pairs.append((target.id, value))
        elif isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts, strict=False):
                pairs += _bindings([t], v)
    return pairs


IMMUTABLE = (
    int, float, complex, str, bytes, bool, type(None), frozenset, range, type, enum.Enum,
    types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.GenericAlias,
    re.Pattern, struct.Struct, typing.TypeVar, logging.Logger, PurePath,
    ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network, ipaddress.IPv6Network,
)  # fmt: skip


def frozen(value: Any) -> bool:
    """Whether a module-level object cannot change: an immutable type, a tuple of such, a
    typing alias, a frozen attrs instance, or a read-only numpy array."""
    if isinstance(value, tuple):
        return all(frozen(v) for v in value)
    if isinstance(value, IMMUTABLE) or type(value).__module__ == "typing":
        return True
    if isinstance(value, np.ndarray):
        return not value.flags.writeable
    cls = type(value)
    return attrs.has(cls) and cls.__setattr__.__name__ == "_frozen_setattrs"


def live_state(module: types.ModuleType, tree: ast.Module) -> list[str]:
    """Module-level names whose objects (of any kind, not only containers) could change.

    Plain containers are `module_state`'s to judge (an UPPER_CASE display is allowed).
    """
    names = [
        name
        for node in tree.body
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        for name in (
            [target.id] if isinstance(target, ast.Name) else
            [e.id for e in getattr(target, "elts", ()) if isinstance(e, ast.Name)]
        )
    ]  # fmt: skip
    return [
        name
        for name in names
        if hasattr(module, name)
        and not isinstance(value := getattr(module, name), list | dict | set)
        and not frozen(value)
    ]


def _module_name(path: Path) -> str:
    """Importable name of a plugin or example module file."""
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "examples":
        rel = rel.relative_to(*rel.parts[:3])  # examples/<name>/src/
    parts = rel.with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_plugins_keep_no_mutable_module_state():
    found = {
        str(path.relative_to(ROOT)): names
        for path in plugin_files()
        if (names := module_state(ast.parse(path.read_text())))
    }
    assert found == {}


def test_plugins_hold_no_changeable_object_at_module_level(monkeypatch):
    """A module-level object that is not a container (a hash state only ever copied, an
    instance) is state too: every assigned name must hold something that cannot change."""
    monkeypatch.setattr(sys, "path", [*map(str, ROOT.glob("examples/*/src")), *sys.path])
    found = {}
    for path in plugin_files():
        module = importlib.import_module(_module_name(path))
        if names := live_state(module, ast.parse(path.read_text())):
            found[_module_name(path)] = names
    assert found == {}


def test_the_object_check_finds_changeable_objects():
    import hashlib

    source = "A = 1\nKEYED = 2\nPROBE = 3\nARR = 4\nRO = 5\nTABLE = 6\n"
    module = types.ModuleType("m")
    ro = np.zeros(2)
    ro.flags.writeable = False
    module.__dict__.update(
        A=(1, b"x", re.compile("a")), KEYED=hashlib.blake2b(), PROBE=types.SimpleNamespace(),
        ARR=np.zeros(2), RO=ro, TABLE={"a": 1},
    )  # fmt: skip
    assert live_state(module, ast.parse(source)) == ["KEYED", "PROBE", "ARR"]


def test_the_check_finds_what_it_forbids():
    source = (
        "import functools, weakref\n"
        "_live: list[int] = []\n"
        "_PARSED = weakref.WeakValueDictionary()\n"
        "TABLE = {'a': 1}\n"
        "_seen = {x for x in ()}\n"
        "_a, _b = [], 1\n"
        "@functools.lru_cache\n"
        "def parse(x): return x\n"
        "def bump():\n"
        "    global _count\n"
    )
    found = module_state(ast.parse(source))
    assert found == ["_live", "_PARSED", "_seen", "_a", "parse()", "global _count"]
