"""The ASGI application behind ``[http]``: /metrics, /health, /ready and the JSON API.

Plain ASGI (no framework): a handful of routes, each a small coroutine. Requests that
change state are POST, and a POST carrying a browser ``Origin`` that is not this server
is refused, so a web page cannot toggle blocking or flush caches behind a user's back.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio
from dnsproxy.plugins.querylog import db_stats, live_counters, live_database
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dnsproxy import options
from dnsproxy.wire import Drop, Reject, parse_query

from .metrics import Collector, Observed

if TYPE_CHECKING:
    from dnsproxy.server import Server

    from . import HttpOptions

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

WINDOWS = {"hour": 3600.0, "day": 86400.0}
MAX_DISABLE = 7 * 86400.0  # longest blocking pause the API accepts


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class App:
    """Routes by (method, path); each handler returns (status, body, content type)."""

    def __init__(self, server: Server, opts: HttpOptions, observed: Observed) -> None:
        self.server = server
        self.opts = opts
        self.observed = observed
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(server, observed))  # type: ignore[arg-type]
        self.blocking_until: float | None = None  # when a timed pause ends (wall clock)
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
        method, path = scope["method"], scope["path"]
        handler = self.routes.get((method, path))
        try:
            if handler is None:
                known = {p for _, p in self.routes}
                raise HttpError(405 if path in known else 404, f"no route {method} {path}")
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
        headers = [(b"content-type", ctype.encode()), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

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
        return 200, generate_latest(self.registry), CONTENT_TYPE_LATEST

    async def health(self, params: dict[str, str]) -> dict[str, Any]:
        return {"status": "up"}

    async def ready(self, params: dict[str, str]) -> tuple[int, dict[str, Any], str]:
        steps = [
            {"step": s.setup.where, "plugin": s.setup.name, "ready": s.ready()}
            for s in self.server.chain.steps
        ]
        ok = all(s["ready"] for s in steps)
        return (200 if ok else 503), {"ready": ok, "steps": steps}, "application/json"

    async def stats(self, params: dict[str, str]) -> dict[str, Any]:
        top = _int(params.get("top", "10"), "top", 1, 1000)
        now = time.time()
        db = live_database(self.server.chain)
        if db is not None and db.exists():
            windows = await trio.to_thread.run_sync(db_stats, db, now, WINDOWS, top)
            out = {"source": "querylog", **windows}
        else:
            out = {"source": "memory", **self.observed.stats(now, WINDOWS, top)}
        counters = live_counters(self.server.chain)
        return out if counters is None else {**out, "querylog": counters}

    async def query(self, params: dict[str, str]) -> dict[str, Any]:
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

    def _blocking_steps(self) -> list[Any]:
        steps = [s for s in self.server.chain.steps if callable(getattr(s, "set_enabled", None))]
        if not steps:
            raise HttpError(409, "no step supports blocking control (no blocklist step?)")
        return steps

    async def blocking_status(self, params: dict[str, str]) -> dict[str, Any]:
        steps = self._blocking_steps()
        until = self.blocking_until
        if until is not None and until <= time.time():
            until = self.blocking_until = None
        states = [getattr(s, "enabled", None) for s in steps]
        return {
            "enabled": all(e is not False for e in states),
            "steps": [
                {"step": s.setup.where, "enabled": e} for s, e in zip(steps, states, strict=True)
            ],
            "disabled_until": until,
        }

    async def blocking_enable(self, params: dict[str, str]) -> dict[str, Any]:
        for step in self._blocking_steps():
            step.set_enabled(True)
        self.blocking_until = None
        return await self.blocking_status(params)

    async def blocking_disable(self, params: dict[str, str]) -> dict[str, Any]:
        steps = self._blocking_steps()
        duration = None
        if params.get("duration"):
            try:
                duration = options.duration(params["duration"])
            except (TypeError, ValueError) as exc:
                raise HttpError(400, f"duration: {exc}") from exc
            if not 0 < duration <= MAX_DISABLE:
                raise HttpError(400, f"duration must be > 0 and at most {MAX_DISABLE:g} s")
        for step in steps:
            step.set_enabled(False, duration)
        self.blocking_until = None if duration is None else time.time() + duration
        return await self.blocking_status(params)

    async def flush(self, params: dict[str, str]) -> dict[str, Any]:
        self.server.flush()
        return {"flushed": True}


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
