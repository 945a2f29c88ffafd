"""http — the web dashboard, Prometheus metrics, health and readiness, a JSON API.

Description
    An optional ``[http]`` table starts one HTTP server (hypercorn's Trio worker) inside
    the proxy process. Off when the table is absent; loopback by default when present.
    Needs the ``http`` extra: ``pip install 'dnsproxy[http]'``.

    ``GET /metrics``
        Prometheus text format (prometheus-client).
    ``GET /health``
        200 ``{"status": "up"}`` while the process serves.
    ``GET /ready``
        200 when every step is ready (lists loaded, an upstream healthy), else 503; the
        body lists each step, with a ``reason`` for one that is not ready (a missing list).
    ``GET /api/stats[?top=10]``
        For the last hour and day: queries, blocked and blocked share, top blocked names,
        top clients. From the querylog's SQLite database when a querylog step writes
        one, otherwise from bounded in-memory counters (``stats_interval`` buckets,
        ``stats_max_keys`` names/clients per bucket; ``untracked`` counts what arrived
        after a bucket was full, so a top list that leaves much out says so).
    ``GET /api/query?name=example.org&type=A[&client=192.0.2.7][&transport=tcp]``
        Runs the query through the chain (as ``dnsproxy query`` does) and returns the
        trace: which step answered, the notes (list/rule/upstream/cache), the response.
    ``GET /api/blocking/status``, ``POST /api/blocking/enable``,
    ``POST /api/blocking/disable[?duration=5m][&group=kids]``
        Blocky-style switch for every step that supports it (blocklist). The pause is
        the server's and survives reloads until it ends or is lifted; the status gives
        ``enabled``, ``disabled_until`` (Unix time), ``seconds_left`` and
        ``disabled_until_iso`` (UTC, ``...Z``), all null for a pause without end, and
        ``groups``: the paused [groups] (``disabled_until``, ``seconds_left``). With
        ``group`` (a [groups] name; 400 otherwise) enable/disable act on that group only.
    ``POST /api/cache/flush``
        Flushes every step (as SIGUSR1 does).

    Every request must name this listener in its ``Host`` header: an IP literal (any
    address, bracketed for IPv6, with or without a port), ``localhost``, or a name listed
    in ``hosts``. Anything else gets 421 Misdirected Request before routing, on every route
    (``/metrics`` and ``/health`` included): a DNS-rebinding page reaches the listener only
    under a DNS name of its own, so this keeps web pages from reading or driving the API.
    A request without ``Host`` (HTTP/1.0) is served: browsers always send one.
    State-changing requests are POST only, and refused (403) when a browser sends an
    ``Origin`` other than this server. HEAD is answered like GET, without a body.

    Per query the service only bumps counters; everything else is computed at scrape or
    request time. ``/metrics``, ``/api/stats`` and ``/api/query`` share ``api_concurrency``
    slots; up to ``api_queue`` more requests wait for one, beyond that the answer is 503.
    ``/metrics`` is rendered in a worker thread from a snapshot, ``/api/stats`` is computed
    in a worker thread and kept for one second (concurrent requests share one computation),
    so neither stalls DNS.

Syntax
    ::

        [http]
        listen = "127.0.0.1:9153"
        query_timeout = 5.0       # seconds, for GET /api/query
        stats_interval = "10m"    # in-memory stats bucket length
        stats_max_keys = 1000     # distinct clients / blocked names kept per bucket
        hosts = []                # Host names served besides IP literals and localhost
        api_concurrency = 4       # /metrics, /api/stats, /api/query computed at once
        api_queue = 64            # requests waiting for a slot; beyond: 503
        password_hash = ""        # `dnsproxy hash-password`; required off loopback
        api_tokens = []           # Authorization: Bearer <token>, 16+ characters each
        session_ttl = "7d"        # login lifetime (the signing key is per process)
        login_max_failures = 5    # failed logins per client address per login_window,
        login_window = "5m"       # beyond: 429
        log_page_size = 50        # rows per query-log page

Dashboard
    ``GET /`` and the pages linked from it (README.md, "Dashboard"; `dashboard`). With
    ``password_hash`` every route but /metrics, /health, /ready, /login and /static needs
    a session or a token, and a POST from a session its CSRF token. Without it the
    listener must be loopback; /api/* then stays open as before, and the dashboard's
    buttons need the CSRF token of the session cookie the pages hand out.

Metrics
    ``dnsproxy_requests_total{transport, qtype, rcode}`` (rcode ``DROPPED`` when no
    response was sent), ``dnsproxy_request_duration_seconds`` (histogram),
    ``dnsproxy_queries_total``, ``dnsproxy_dropped_total``, ``dnsproxy_formerr_total``,
    ``dnsproxy_refused_acl_total``, ``dnsproxy_servfail_overload_total``,
    ``dnsproxy_step_errors_total``, ``dnsproxy_tcp_rejected_total``,
    ``dnsproxy_tcp_evicted_total`` (idle connections closed to make room),
    ``dnsproxy_tcp_connections``, ``dnsproxy_ready``; and for every step's ``metrics()``
    sample ``dnsproxy_<plugin>_<name>`` (``_total`` for counters) with a ``step`` label
    (its index in the chain) plus the sample's own labels.

    Label values come from bounded sets: ``qtype`` is a type dnspython knows by name, else
    ``other``; ``rcode`` a known rcode (or ``DROPPED``), else ``other``. Step counters never
    go backwards: when a reload replaces a step and its counter restarts lower, the
    service adds the last value it exported for that series (plugin, chain index, name,
    labels) as an offset. Increments a replaced step made after the last scrape before the
    reload are not seen.

Examples
    Scrape with Prometheus and check a name::

        [http]
        listen = "127.0.0.1:9153"

    ``curl 127.0.0.1:9153/metrics``,
    ``curl '127.0.0.1:9153/api/query?name=ads.example.org&type=AAAA'``,
    ``curl -X POST '127.0.0.1:9153/api/blocking/disable?duration=5m'``.
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

    def bind(self) -> socket.socket:
        """Bind the listening socket; the server calls this before it announces any
        listener, so a busy port stops start-up before anything serves."""
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
