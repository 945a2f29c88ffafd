"""No built-in plugin keeps mutable state at module level (issue 14 item 1): two Servers in
one process would share it. Per-server state belongs to steps, services or `setup.shared`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_DIRS = (ROOT / "plugins", ROOT / "examples")  # built-in and example plugins
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
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            value = node.value
            display = isinstance(value, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp)
            built = isinstance(value, ast.Call) and _name(value) in MUTABLE_CALLS
            for name in names:
                if built or (display and not name.lstrip("_").isupper()):
                    found.append(name)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and any(
            _name(d) in CACHES for d in node.decorator_list
        ):
            found.append(f"{node.name}()")
    return found


def test_plugins_keep_no_mutable_module_state():
    found = {
        str(path.relative_to(ROOT)): names
        for root in PLUGIN_DIRS
        for path in sorted(root.rglob("*.py"))
        if (names := module_state(ast.parse(path.read_text())))
    }
    assert found == {}


def test_the_check_finds_what_it_forbids():
    source = (
        "import functools, weakref\n"
        "_live: list[int] = []\n"
        "_PARSED = weakref.WeakValueDictionary()\n"
        "TABLE = {'a': 1}\n"
        "@functools.lru_cache\n"
        "def parse(x): return x\n"
    )
    assert module_state(ast.parse(source)) == ["_live", "_PARSED", "parse()"]
