"""The plugin manager factory and the registry that plugins fill through hooks.

Built-in plugins are registered exactly like third-party ones: the modules listed in
`dnsproxy.plugins.BUILTIN` are handed to pluggy first, then the ``dnsproxy`` entry-point
group, then Python files named in the config. All contribute through the same hooks.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from dnsproxy import hookspecs
from dnsproxy.errors import ConfigError

if TYPE_CHECKING:
    from dnsproxy.chain import Setup, Step
    from dnsproxy.upstream import Upstream, UpstreamSpec

ENTRY_POINT_GROUP = "dnsproxy"


class Registry:
    """Step types, upstream schemes and services, by name."""

    def __init__(self) -> None:
        self.steps: dict[str, type[Step]] = {}
        self.schemes: dict[str, Callable[[UpstreamSpec, Setup], Upstream]] = {}
        self.services: dict[str, type[Any]] = {}

    def add_step(self, name: str, cls: type[Step]) -> None:
        """Register a step type under the name ``plugin = "name"`` selects."""
        self._add(self.steps, "step", name, cls)

    def add_scheme(self, scheme: str, factory: Callable[[UpstreamSpec, Setup], Upstream]) -> None:
        """Register an upstream URL scheme ("udp", "tcp", "tls", "https", ...)."""
        self._add(self.schemes, "upstream scheme", scheme, factory)

    def add_service(self, table: str, cls: type[Any]) -> None:
        """Register a service configured by a top-level table (``[http]``)."""
        self._add(self.services, "service", table, cls)

    @staticmethod
    def _add(where: dict[str, Any], what: str, name: str, value: object) -> None:
        if name in where and where[name] is not value:
            raise ConfigError(f"two plugins register the {what} {name!r}")
        where[name] = value


def load_file(path: Path) -> Any:
    """Import a plugin from a Python file named in the config.

    The module is named after the file's path and content: an unchanged file is imported
    once (its steps keep their identity across reloads, so `Step.inherit` pairs them), an
    edited one is imported afresh (SIGHUP runs the new code; the old chain keeps the old
    module until it is retired).
    """
    try:
        source = path.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: plugin file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the plugin file: {exc.strerror or exc}") from exc
    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    prefix = f"dnsproxy_local_{path.stem}_{where}_"
    mod_name = prefix + hashlib.sha256(source).hexdigest()[:12]
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot load as a Python plugin")
    module = importlib.util.module_from_spec(spec)
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as exc:
        raise ConfigError(f"{path}: plugin failed to import: {type(exc).__name__}: {exc}") from exc
    for stale in [name for name in sys.modules if name.startswith(prefix)]:
        del sys.modules[stale]  # an older version of this file
    sys.modules[mod_name] = module
    return module


def make_plugin_manager(files: Iterable[Path] = ()) -> pluggy.PluginManager:
    """A fresh plugin manager with built-ins, entry points and the given plugin files."""
    from dnsproxy.plugins import BUILTIN

    pm = pluggy.PluginManager("dnsproxy")
    pm.add_hookspecs(hookspecs)
    for name in BUILTIN:
        pm.register(importlib.import_module(name), name=name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    for path in files:
        module = load_file(path)
        if pm.is_registered(module):
            continue
        pm.register(module, name=str(path))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin hook error: {exc}") from exc
    return pm


def build_registry(pm: pluggy.PluginManager) -> Registry:
    registry = Registry()
    pm.hook.dnsproxy_add_steps(registry=registry)
    pm.hook.dnsproxy_add_upstream_schemes(registry=registry)
    pm.hook.dnsproxy_add_services(registry=registry)
    return registry
