"""The ASGI application behind ``[http]``: /metrics, /health, /ready and the JSON API.

Plain ASGI (no framework): a handful of routes, each a small coroutine. Every request
must carry a ``Host`` that names this listener (`host_allowed`), else 421 before routing:
a DNS-rebinding page can make a browser send both Host and Origin of its own DNS name, so
checking Origin against Host alone would let it read and drive the API. Requests that
change state are POST, and a POST carrying a browser ``Origin`` that is not this server
is refused, so a web page cannot toggle blocking or flush caches behind a user's back.
Heavy routes share a bounded number of slots (`App.limited`) and do their work off the
event loop.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from dnsproxy import options
from dnsproxy.errors import DnsProxyError
from dnsproxy.wire import Drop, Reject, parse_query

from .metrics import Collector, Observed

if TYPE_CHECKING:
    from dnsproxy.chain import Step
    from dnsproxy.server import Server

    from . import HttpOptions

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

T = TypeVar("T")

WINDOWS = {"hour": 3600.0, "day": 86400.0}
MAX_DISABLE = 7 * 86400.0  # longest blocking pause the API accepts
STATS_TTL = 1.0  # seconds a computed /api/stats answer is served again
_PORT = re.compile(r"^[0-9]{1,5}$")


class HttpError(DnsProxyError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class SharedResult:
    """One computation that concurrent requests wait for, then reuse until it expires."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.expires = math.inf  # trio clock; set when the result is in
        self.result: dict[str, Any] | None = None  # None after done: the computation failed


class App:
    """Routes by (method, path); each handler returns (status, body, content type)."""

    def __init__(
        self, server: Server, opts: HttpOptions, observed: Observed, collector: Collector
    ) -> None:
        self.server = server
        self.opts = opts
        self.observed = observed
        self.collector = collector
        self.limiter = trio.CapacityLimiter(opts.api_concurrency)
        self.hosts = frozenset(opts.hosts)
        self.stats_cache: dict[int, SharedResult] = {}  # by ``top``
        self.routes: dict[tuple[str, str], Callable[[dict[str, str]], Awaitable[Any]]] = {
            ("GET", "/metrics"): self.metrics,
            ("GET", "/health"): self.health,
            ("GET", "/ready"): self.ready,
            ("GET", "/api/stats"): self.stats,
            ("GET", "/api/query"): self.query,
            ("GET", "/api/blocking/status"): self.blocking_status,
            ("POST", "/api/blocking/enable"): self.blocking_enable,
            ("POST", "/api/blocking/disable"): self.blocking_disable,
            ("POST", "/api/cache/flush"): self.flush,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                if event["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif event["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        head = scope["method"] == "HEAD"
        method, path = "GET" if head else scope["method"], scope["path"]
        handler = self.routes.get((method, path))
        try:
            self._check_host(scope)
            if handler is None:
                known = {p for _, p in self.routes}
                raise HttpError(405 if path in known else 404, f"no route {scope['method']} {path}")
            if method == "POST":
                self._check_origin(scope)
            raw = parse_qs(scope.get("query_string", b"").decode("latin-1"), max_num_fields=20)
            params = {k: v[-1] for k, v in raw.items()}
            result = await handler(params)
            if isinstance(result, tuple):
                status, body, ctype = result
            else:
                status, body, ctype = 200, result, "application/json"
        except HttpError as exc:
            status, body, ctype = exc.status, {"error": str(exc)}, "application/json"
        except ValueError as exc:  # bad parameters (parse_qs limits, conversions)
            status, body, ctype = 400, {"error": str(exc)}, "application/json"
        data = body if isinstance(body, bytes) else json.dumps(body, indent=1).encode() + b"\n"
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(data)).encode()),
            (b"cache-control", b"no-store"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if head else data})

    def _check_host(self, scope: Scope) -> None:
        hosts = [v for k, v in scope.get("headers", ()) if k == b"host"]
        if len(hosts) > 1:
            raise HttpError(400, "more than one Host header")
        if hosts and hosts[0] and not host_allowed(hosts[0].decode("latin-1"), self.hosts):
            raise HttpError(
                421,
                "misdirected request: the Host header does not name this listener"
                " (an IP address, localhost or a name in [http] hosts)",
            )

    async def limited(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in one of ``api_concurrency`` slots; 503 when ``api_queue``
        requests already wait for one."""
        if self.limiter.statistics().tasks_waiting >= self.opts.api_queue:
            raise HttpError(503, "busy: too many API requests at once, retry shortly")
        async with self.limiter:
            return await work()

    @staticmethod
    def _check_origin(scope: Scope) -> None:
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        if origin is None:
            return
        host = headers.get(b"host", b"").decode("latin-1")
        if urlsplit(origin.decode("latin-1")).netloc != host:
            raise HttpError(403, "cross-origin request refused")

    # --- endpoints ----------------------------------------------------------------------

    async def metrics(self, params: dict[str, str]) -> tuple[int, bytes, str]:
        async def render() -> bytes:
            snapshot = self.collector.snapshot()
            return await trio.to_thread.run_sync(generate_latest, snapshot)  # type: ignore[arg-type]

        return 200, await self.limited(render), CONTENT_TYPE_LATEST

    async def health(self, params: dict[str, str]) -> dict[str, Any]:
        return {"status": "up"}

    async def ready(self, params: dict[str, str]) -> tuple[int, dict[str, Any], str]:
        steps = []
        for s in self.server.chain.steps:
            entry: dict[str, Any] = {"step": s.setup.where, "plugin": s.setup.name}
            entry["ready"] = ready = s.ready()
            if not ready and (reason := s.not_ready_reason()):
                entry["reason"] = reason
            steps.append(entry)
        ok = all(s["ready"] for s in steps)
        return (200 if ok else 503), {"ready": ok, "steps": steps}, "application/json"

    async def stats(self, params: dict[str, str]) -> dict[str, Any]:
        """Computed at most once per `STATS_TTL` per ``top``: concurrent requests share it."""
        top = _int(params.get("top", "10"), "top", 1, 1000)
        now = trio.current_time()
        shared = self.stats_cache.get(top)
        if shared is not None and (not shared.done.is_set() or shared.expires > now):
            await shared.done.wait()
            if shared.result is None:
                raise HttpError(503, "stats could not be computed, retry")
            return shared.result
        self.stats_cache = {
            k: v for k, v in self.stats_cache.items() if not v.done.is_set() or v.expires > now
        }
        shared = self.stats_cache[top] = SharedResult()
        try:
            shared.result = await self.limited(lambda: self._compute_stats(top))
            shared.expires = trio.current_time() + STATS_TTL
        finally:
            shared.done.set()
            if shared.result is None and self.stats_cache.get(top) is shared:
                del self.stats_cache[top]
        return shared.result

    async def _compute_stats(self, top: int) -> dict[str, Any]:
        now = time.time()
        found = self.server.pm.hook.dnsproxy_query_logs(server=self.server)
        logs = [log for group in found if group for log in group]
        for log in logs:
            windows = await trio.to_thread.run_sync(log.summary, now, WINDOWS, top)
            if windows is not None:
                out = {"source": "querylog", **windows}
                break
        else:
            history = self.observed.copy()  # the loop keeps counting while the thread reads
            windows = await trio.to_thread.run_sync(history.stats, now, WINDOWS, top)
            out = {"source": "memory", **windows}
        if not logs:
            return out
        counters: dict[str, int] = {}
        for log in logs:
            for name, value in log.counters().items():
                counters[name] = counters.get(name, 0) + value
        return {**out, "querylog": counters}

    async def query(self, params: dict[str, str]) -> dict[str, Any]:
        return await self.limited(lambda: self._query(params))

    async def _query(self, params: dict[str, str]) -> dict[str, Any]:
        name = params.get("name")
        if not name:
            raise HttpError(400, "missing name (GET /api/query?name=example.org&type=A)")
        type_text = params.get("type", "A").upper()
        client = params.get("client", "127.0.0.1")
        transport = params.get("transport", "udp")
        if transport not in ("udp", "tcp"):
            raise HttpError(400, "transport must be udp or tcp")
        try:
            ipaddress.ip_address(client)
            rdtype = dns.rdatatype.from_text(type_text)
            msg = dns.message.make_query(name, rdtype, dns.rdataclass.IN, use_edns=0)
            q = parse_query(msg.to_wire(), (client, 0), transport)
        except (ValueError, dns.exception.DNSException, Drop, Reject) as exc:
            raise HttpError(400, f"bad query: {exc or type(exc).__name__}") from exc
        q.trace = []
        start = time.monotonic()
        with trio.move_on_after(self.opts.query_timeout) as cs:
            reply = await self.server.query(q)
        if cs.cancelled_caught:
            raise HttpError(504, f"no answer within {self.opts.query_timeout:g} s")
        doc: dict[str, Any] = {
            "query": {"name": q.text, "type": type_text, "client": client},
            "trace": q.trace,
            "notes": {k: _jsonable(v) for k, v in (q.notes or {}).items()},
            "elapsed_ms": round((time.monotonic() - start) * 1000, 3),
        }
        if reply is None:
            doc["dropped"] = True
            return doc
        rmsg = reply.message()
        doc.update(
            answered_by=reply.source,
            rcode=dns.rcode.to_text(reply.rcode),
            answer=[r.to_text() for r in rmsg.answer],
            authority=[r.to_text() for r in rmsg.authority],
            ede=[{"code": c, "text": t} for c, t in reply.ede],
            response=rmsg.to_text(),
        )
        return doc

    def _blocking_steps(self) -> list[Step]:
        """The steps that honour the server's blocking pause; 409 when there are none."""
        steps = [s for s in self.server.chain.steps if s.pausable]
        if not steps:
            raise HttpError(409, "no step supports blocking control (no blocklist step?)")
        return steps

    async def blocking_status(self, params: dict[str, str]) -> dict[str, Any]:
        steps = self._blocking_steps()
        status = self.server.blocking.status()
        return {
            "enabled": status["enabled"],
            "steps": [{"step": s.setup.where, "enabled": status["enabled"]} for s in steps],
            "disabled_until": status["disabled_until"],
            "seconds_left": status["seconds_left"],
            "disabled_until_iso": status["disabled_until_iso"],
        }

    async def blocking_enable(self, params: dict[str, str]) -> dict[str, Any]:
        self._blocking_steps()
        self.server.blocking.resume()
        return await self.blocking_status(params)

    async def blocking_disable(self, params: dict[str, str]) -> dict[str, Any]:
        self._blocking_steps()
        duration = None
        if params.get("duration"):
            try:
                duration = options.duration(params["duration"])
            except (TypeError, ValueError) as exc:
                raise HttpError(400, f"duration: {exc}") from exc
            if not 0 < duration <= MAX_DISABLE:
                raise HttpError(400, f"duration must be > 0 and at most {MAX_DISABLE:g} s")
        self.server.blocking.pause(duration)
        return await self.blocking_status(params)

    async def flush(self, params: dict[str, str]) -> dict[str, Any]:
        self.server.flush()
        return {"flushed": True}


def host_allowed(value: str, names: Collection[str]) -> bool:
    """Whether a Host header names this listener: an IP literal (a rebinding page needs a
    DNS name, so no literal is a rebinding vector), ``localhost`` or one of ``names``;
    each with or without a port."""
    if value.startswith("["):
        literal, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and _PORT.match(rest[1:]))):
            return False
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return False
        return True
    name, colon, port = value.partition(":")
    if colon and not _PORT.match(port):
        return False
    name = name.lower().removesuffix(".")
    if name == "localhost" or name in names:
        return True
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def _int(text: str, key: str, low: int, high: int) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise HttpError(400, f"{key} must be an integer") from exc
    if not low <= value <= high:
        raise HttpError(400, f"{key} must be between {low} and {high}")
    return value


def _jsonable(value: object) -> object:
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)
