"""Loading a configuration: read and validate it, import its plugins, build its chain.

The one place that turns a config file into steps; the server (start and SIGHUP), the
command line (``check``, ``query``) and the test kit all build through it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pluggy

from dnsproxy import config as config_mod
from dnsproxy import options
from dnsproxy.blocking import Blocking
from dnsproxy.chain import Chain, Scope, Setup, Step
from dnsproxy.clients import Clients
from dnsproxy.config import Config
from dnsproxy.errors import ConfigError
from dnsproxy.registry import Registry, build_registry, make_plugin_manager
from dnsproxy.schedule import Schedule, timezone
from dnsproxy.shared import Shared
from dnsproxy.upstream import Upstream, UpstreamSpec

Loaded = tuple[Config, Registry, pluggy.PluginManager]


def load(path: Path) -> Loaded:
    """Read and validate a config, loading the plugins it names. Raises ConfigError."""
    doc = config_mod.read_toml(path)
    pm = make_plugin_manager(config_mod.plugin_files(path, doc))
    registry = build_registry(pm)
    return config_mod.parse(path, doc, registry), registry, pm


def make_upstream(registry: Registry, spec: UpstreamSpec | str, setup: Setup) -> Upstream:
    """An upstream for ``spec`` from the plugin registering its scheme (`Setup.make_upstream`)."""
    if isinstance(spec, str):
        spec = UpstreamSpec.parse(spec)
    factory = registry.schemes.get(spec.scheme)
    if factory is None:
        known = ", ".join(sorted(registry.schemes))
        raise setup.error(
            "upstreams",
            f"{spec.url}: no plugin handles {spec.scheme}:// (known: {known};"
            " is the dot/doh plugin installed?)",
        )
    return factory(spec, setup)


def make_step(registry: Registry, plugin: str, table: Mapping[str, Any], setup: Setup) -> Step:
    """A step of ``plugin`` from its option table, validated as a ``[[chain]]`` entry's
    plugin options would be (`Setup.make_step`). Raises ConfigError naming ``setup.where``."""
    cls = registry.steps.get(plugin)
    if cls is None:
        raise setup.error(None, f"no plugin registers the step {plugin!r}")
    return cls(options.build(cls.Options, table, setup.where), setup)


def make_setup(registry: Registry, **fields: Any) -> Setup:
    """A `Setup` whose ``make_upstream`` and ``make_step`` use ``registry``; ``fields``
    are the rest of Setup's fields."""
    return Setup(
        make_upstream=functools.partial(make_upstream, registry),
        make_step=functools.partial(make_step, registry),
        **fields,
    )


def build_chain(
    cfg: Config,
    registry: Registry,
    blocking: Blocking | None = None,
    shared: Shared | None = None,
    clients: Clients | None = None,
    worker: int | None = None,
) -> Chain:
    """Instantiate every step of ``cfg``; ConfigError if any step rejects its options.

    ``blocking``: the server's pause state, ``shared``: its store of long-lived objects,
    and ``clients``: its client records, handed to every step (new ones if None: steps
    built outside a server; the server applies ``cfg.clients`` to its own once the chain
    is built). ``worker``: `Setup.worker`.
    """
    blocking = blocking or Blocking()
    shared = shared or Shared()
    clients = clients or Clients(cfg.clients)
    tz = timezone(cfg.server.timezone)
    steps = []
    errors = []
    for sc in cfg.chain:
        setup = make_setup(
            registry,
            where=sc.where,
            index=sc.index,
            name=sc.plugin,
            base_dir=cfg.base_dir,
            state_dir=cfg.state_dir,
            server=cfg.server,
            log=logging.getLogger(f"dnsproxy.plugins.{sc.plugin}"),
            blocking=blocking,
            shared=shared,
            clients=clients,
            worker=worker,
            scope=Scope(
                sc.zones,
                sc.clients,
                sc.names,
                Schedule(sc.active, tz) if sc.active else None,
                clients.record if sc.names else None,
            ),
            deadline=sc.deadline,
        )
        try:
            steps.append(registry.steps[sc.plugin](sc.options, setup))
        except ConfigError as exc:
            errors.extend(exc.lines)
    if errors:
        for step in steps:
            step.close()
        raise ConfigError(errors)
    return Chain(steps)
