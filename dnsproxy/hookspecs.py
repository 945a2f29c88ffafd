"""Every hook a dnsproxy plugin can implement.

Built-in plugins (``dnsproxy.plugins.*``), plugins installed under the entry-point group
``dnsproxy`` and Python files named in the config's top-level ``plugins`` list are all
registered through these hooks and nothing else.

The hooks are synchronous and used for registration, lifecycle and observation. Per-query
work happens in `dnsproxy.chain.Step` objects, which the chain calls directly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from dnsproxy.registry import Registry
    from dnsproxy.reply import Reply
    from dnsproxy.server import Server
    from dnsproxy.wire import Query

Observer = Callable[["Query", "Reply | None", float], None]


class QueryLogReader(Protocol):
    """A query log as the HTTP API's ``/api/stats`` reads it (`dnsproxy_query_logs`)."""

    def counters(self) -> dict[str, int]:
        """Its counters by name (records, dropped, ...); read on the event loop."""
        ...

    def summary(self, now: float, windows: Mapping[str, float], top: int) -> dict[str, Any] | None:
        """For each ``windows`` label, over the last that many seconds before ``now``:
        ``queries``, ``blocked``, ``blocked_share``, ``top_blocked`` and ``top_clients``
        (``top`` of each). None when it has nothing to read yet. May block on I/O: the
        caller runs it in a worker thread."""
        ...

    def db(self) -> Path | None:
        """The SQLite file behind it, for the dashboard's paged reads; None without one."""
        ...


hookspec = pluggy.HookspecMarker("dnsproxy")
hookimpl = pluggy.HookimplMarker("dnsproxy")


@hookspec
def dnsproxy_add_steps(registry: Registry) -> None:
    """Contribute step types: call ``registry.add_step("name", StepClass)``.

    The name is what ``plugin = "name"`` selects in a ``[[chain]]`` table. Return nothing.
    """


@hookspec
def dnsproxy_add_upstream_schemes(registry: Registry) -> None:
    """Contribute upstream URL schemes for ``forward``: ``registry.add_scheme("tls", factory)``.

    ``factory(spec, setup)`` receives an `dnsproxy.upstream.UpstreamSpec` and the step's
    `dnsproxy.chain.Setup`, and returns an `dnsproxy.upstream.Upstream`, or raises
    ConfigError (use ``setup.error``). Return nothing.
    """


@hookspec
def dnsproxy_add_services(registry: Registry) -> None:
    """Contribute top-level config tables served by a long-running service.

    ``registry.add_service("http", ServiceClass)``: when the table is present, the server
    builds ``ServiceClass(options, server)`` and runs its ``run()`` for the process's life.
    Return nothing.
    """


@hookspec
def dnsproxy_startup(server: Server) -> None:
    """The listeners are bound and the first chain is live. Return nothing."""


@hookspec
def dnsproxy_reload(server: Server) -> None:
    """A new configuration was validated and its chain swapped in. Return nothing."""


@hookspec
def dnsproxy_shutdown(server: Server) -> None:
    """The server stopped accepting queries and is about to exit. Return nothing."""


@hookspec
def dnsproxy_observers(server: Server) -> list[Observer] | None:
    """Return the observers that should see every finished query under this config.

    Each observer is a bound method of an object ``server`` keeps (a step of
    ``server.chain``, a service in ``server.services``), so two servers in one process
    never see each other's queries: a plugin keeps no module-level state to route them.
    Asked once when the server starts and after each reload, so a plugin that is not
    configured returns None and costs nothing per query. The server then calls each
    observer directly as ``observer(query, reply, elapsed)`` for every query: ``reply`` is
    what was sent (None if dropped), ``elapsed`` is in seconds. Observers run on the hot
    path: they must be cheap and never block (buffer, and write from a background task).
    """


@hookspec
def dnsproxy_query_logs(server: Server) -> list[QueryLogReader] | None:
    """Return the query logs of ``server``'s current chain (objects it keeps), or None.

    The HTTP API's ``/api/stats`` reads the first that has a summary and sums the
    counters of all; without one it answers from its own in-memory counters.
    """
