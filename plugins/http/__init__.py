"""http: the ``[http]`` service — web dashboard, Prometheus ``/metrics``, ``/health``,
``/ready`` and a JSON API in the proxy's own process (README.md beside this file documents
the routes, access rules, options, metrics and examples).

This module holds the options and the service's life (bind before any listener is
announced, then serve with hypercorn's Trio worker); the ASGI app is `app`, the pages
`dashboard`, logins `auth`, the per-query counters and their rendering `metrics`. Per
query the service only bumps counters through its observer; the rest is computed at
request time, off the event loop where it is heavy, so serving HTTP never stalls DNS.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import logging
import re
import socket
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio

from dnsproxy import options
from dnsproxy.config import Address
from dnsproxy.errors import ConfigError
from dnsproxy.hookspecs import Observer, hookimpl
from dnsproxy.registry import Registry
from dnsproxy.wire import hostport

if TYPE_CHECKING:
    from dnsproxy.server import Server

log = logging.getLogger("dnsproxy.plugins.http")
NEEDS = ("hypercorn", "prometheus_client", "starlette", "jinja2")
MIN_TOKEN = 16  # characters of an API token
DAY = 86400.0


def _address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise TypeError('expected "host:port"')
    return Address.parse(value, 9153)


_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def _hosts(value: object) -> tuple[str, ...]:
    """Host names (lower-cased, without a trailing dot); no ports, schemes or wildcards."""
    out = []
    for item in options.string_tuple(value):
        name = item.lower().removesuffix(".")
        if len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
            raise ValueError(f"{item!r} is not a host name (a name such as dns.example.org)")
        out.append(name)
    return tuple(out)


def _password_hash(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a string from `dnsproxy hash-password`")
    if value:
        from .auth import parse_hash

        parse_hash(value)
    return value


def _tokens(value: object) -> tuple[str, ...]:
    out = options.string_tuple(value)
    for token in out:
        if len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
            raise ValueError(
                f"each token needs at least {MIN_TOKEN} printable characters without spaces"
                " (make one with: python3 -c 'import secrets; print(secrets.token_urlsafe())')"
            )
    return out


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen
class HttpOptions:
    listen: Address = attrs.field(default="127.0.0.1:9153", converter=_address)
    query_timeout: float = options.seconds(5.0, 0.1, 60)
    stats_interval: float = options.seconds(600.0, 1, 3600)
    stats_max_keys: int = attrs.field(default=1000, validator=options.in_range(1, 100_000))
    hosts: tuple[str, ...] = attrs.field(default=(), converter=_hosts)
    api_concurrency: int = attrs.field(default=4, validator=options.in_range(1, 256))
    api_queue: int = attrs.field(default=64, validator=options.in_range(0, 100_000))
    password_hash: str = attrs.field(default="", converter=_password_hash)
    api_tokens: tuple[str, ...] = attrs.field(default=(), converter=_tokens)
    session_ttl: float = options.seconds("7d", 60, 365 * 86400)
    login_max_failures: int = attrs.field(default=5, validator=options.in_range(1, 1000))
    login_window: float = options.seconds("5m", 1, 86400)
    log_page_size: int = attrs.field(default=50, validator=options.in_range(10, 1000))

    def __attrs_post_init__(self) -> None:
        missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
        if missing:
            raise ValueError(
                f"needs the http extra (pip install 'dnsproxy[http]'); missing {', '.join(missing)}"
            )
        if not self.password_hash and not _loopback(self.listen.host):
            raise ValueError(
                f"listen: {self.listen} is not a loopback address, and without password_hash"
                " the dashboard would let anyone on the network change the policy: set"
                " password_hash (print one with `dnsproxy hash-password`) or listen on"
                " 127.0.0.1 / [::1]"
            )


class HttpService:
    """The ``[http]`` service: one hypercorn server for the process's life."""

    Options = HttpOptions

    def __init__(self, opts: HttpOptions, server: Server) -> None:
        from .metrics import Collector, Observed

        self.options = opts
        self.server = server
        buckets = int(DAY // opts.stats_interval) + 1
        self.observed = Observed(opts.stats_interval, buckets, opts.stats_max_keys, time.time())
        self.collector = Collector(server, self.observed)
        self.sock: socket.socket | None = None
        self.app: Any = None  # the ASGI app (`app.App`) while serving

    def bind(self, sock: socket.socket | None = None) -> socket.socket:
        """Bind the listening socket; the server calls this before it announces any
        listener, so a busy port stops start-up before anything serves. ``sock``: a
        listening socket opened already for ``listen`` (bound as root before the
        privilege drop, or passed by systemd), adopted as is."""
        if sock is not None:
            self.sock = sock
            return sock
        addr = self.options.listen
        family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(
                f"{self.server.path.name}: http: listen: cannot bind {addr}: {exc.strerror}"
            ) from exc
        self.sock = sock
        return sock

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind (unless `bind` did), report the bound address, serve until cancelled."""
        from hypercorn.config import Config, Sockets
        from hypercorn.trio.run import worker_serve
        from hypercorn.utils import wrap_app

        from .app import App

        sock = self.sock if self.sock is not None else self.bind()
        cfg = Config()
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("dnsproxy.plugins.http.hypercorn")
        cfg.errorlog.setLevel(logging.WARNING)
        cfg.keep_alive_timeout = 5
        cfg.read_timeout = 10
        cfg.graceful_timeout = 1
        app = self.app = App(self.server, self.options, self.observed, self.collector)
        try:
            async with trio.open_nursery() as nursery:
                serve = partial(
                    worker_serve,
                    wrap_app(app, cfg.wsgi_max_body_size, "asgi"),
                    cfg,
                    sockets=Sockets([], [sock], []),
                )
                await nursery.start(serve)
                host, port = sock.getsockname()[:2]
                log.info("listening on http %s", hostport(host, port))
                nursery.start_soon(self._rotate)
                task_status.started([("http", host, port)])
        finally:
            sock.close()

    async def _rotate(self) -> None:
        while True:
            await trio.sleep(self.options.stats_interval)
            self.observed.rotate(time.time())


@hookimpl
def dnsproxy_add_services(registry: Registry) -> None:
    registry.add_service("http", HttpService)


@hookimpl
def dnsproxy_observers(server: Server) -> list[Observer] | None:
    """The counters of the http service ``server`` keeps (hot path: increments only).

    Asked right after each chain swap, before any query reaches the new steps: the moment
    to note where their counters start, so a replaced step's restart is seen even when
    it counts past its predecessor's last value before the next scrape.
    """
    if not any(svc.table == "http" for svc in server.config.services):
        return None
    mine = [svc for svc in server.services if isinstance(svc, HttpService)]
    for svc in mine:
        svc.collector.note_counters()
    return [svc.observed.observe for svc in mine] or None
