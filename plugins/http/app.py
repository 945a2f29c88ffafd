"""The ASGI application behind ``[http]``: /metrics, /health, /ready, the JSON API and the
dashboard (`dashboard`), routed by Starlette on Trio (through anyio).

Every request must carry a ``Host`` that names this listener (`host_allowed`), else 421
before routing: a DNS-rebinding page can make a browser send both Host and Origin of its
own DNS name, so checking Origin against Host alone would let it read and drive the API.
Requests that change state are POST, and a POST carrying a browser ``Origin`` that is not
this server is refused. With ``password_hash`` set, everything but /metrics, /health,
/ready, /login and /static needs a session (`auth.Sessions`) or an API token, and a POST
from a session needs its CSRF token; without one (loopback only) the API is open as
before, and the dashboard's own POSTs still need the CSRF token of the session cookie it
hands out. Heavy routes share a bounded number of slots (`App.limited`) and do their work
off the event loop.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, quote, urlsplit

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dnsproxy import options
from dnsproxy.errors import DnsProxyError
from dnsproxy.wire import Drop, Reject, parse_query

from .auth import LoginLimiter, Sessions
from .metrics import Collector, Observed

if TYPE_CHECKING:
    from dnsproxy.chain import Step
    from dnsproxy.server import Server

    from . import HttpOptions

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, str]], Awaitable[Any]]

T = TypeVar("T")

HERE = Path(__file__).parent
WINDOWS = {"hour": 3600.0, "day": 86400.0}
MAX_DISABLE = 7 * 86400.0  # longest blocking pause the API accepts
STATS_TTL = 1.0  # seconds a computed /api/stats answer is served again
MAX_FORM = 16_384  # bytes of a form body (login, buttons)
COOKIE = "dnsproxy_session"
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
_PORT = re.compile(r"^[0-9]{1,5}$")


class HttpError(DnsProxyError):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class LoginRequired(DnsProxyError):
    """A page asked for without a session: the answer is a redirect to /login."""


@attrs.frozen
class Principal:
    """Who sent a request: ``token`` (API token), ``session`` (cookie, with its nonce) or
    ``open`` (no password configured, no session yet)."""

    kind: str
    nonce: str | None = None


class SharedResult:
    """One computation that concurrent requests wait for, then reuse until it expires."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.expires = math.inf  # trio clock; set when the result is in
        self.result: dict[str, Any] | None = None  # None after done: the computation failed


def json_response(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    data = json.dumps(body, indent=1).encode() + b"\n"
    return Response(data, status, {"cache-control": "no-store", **(headers or {})},
                    "application/json")  # fmt: skip


class App:
    """The Starlette routes, the checks before them, and the JSON API's handlers."""

    def __init__(
        self, server: Server, opts: HttpOptions, observed: Observed, collector: Collector
    ) -> None:
        from .dashboard import Dashboard

        self.server = server
        self.opts = opts
        self.observed = observed
        self.collector = collector
        self.limiter = trio.CapacityLimiter(opts.api_concurrency)
        self.hosts = frozenset(opts.hosts)
        self.stats_cache: dict[int, SharedResult] = {}  # by ``top``
        self.sessions = Sessions(opts.session_ttl)
        self.logins = LoginLimiter(opts.login_max_failures, opts.login_window)
        self.tokens = tuple(t.encode() for t in opts.api_tokens)
        api: list[tuple[str, str, Handler]] = [
            ("GET", "/api/stats", self.stats),
            ("GET", "/api/query", self.query),
            ("GET", "/api/blocking/status", self.blocking_status),
            ("POST", "/api/blocking/enable", self.blocking_enable),
            ("POST", "/api/blocking/disable", self.blocking_disable),
            ("POST", "/api/cache/flush", self.flush),
        ]
        self.dashboard = Dashboard(self)
        routes = [
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            *(Route(path, self._api(fn, method), methods=[method]) for method, path, fn in api),
            *self.dashboard.routes(),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        self.starlette = Starlette(
            routes=routes,
            exception_handlers={
                HttpError: self._error,
                HTTPException: self._error,
                LoginRequired: self._to_login,
            },
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self._check_host(scope)
                if scope["method"] == "POST":
                    self._check_origin(scope)
            except HttpError as exc:
                await json_response(exc.status, {"error": str(exc)})(scope, receive, send)
                return
            if scope["method"] == "HEAD":
                send = _without_body(send)
        await self.starlette(scope, receive, send)

    @staticmethod
    async def _error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HttpError):
            return json_response(exc.status, {"error": str(exc)}, exc.headers)
        assert isinstance(exc, HTTPException)
        return json_response(exc.status_code, {"error": exc.detail}, dict(exc.headers or {}))

    @staticmethod
    async def _to_login(request: Request, exc: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", 303)

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

    @staticmethod
    def _check_origin(scope: Scope) -> None:
        headers = dict(scope.get("headers", ()))
        origin = headers.get(b"origin")
        if origin is None:
            return
        host = headers.get(b"host", b"").decode("latin-1")
        if urlsplit(origin.decode("latin-1")).netloc != host:
            raise HttpError(403, "cross-origin request refused")

    # --- access ---------------------------------------------------------------------------

    def principal(self, request: Request) -> Principal | None:
        """Who sent ``request``; None when a password is set and it brings no credential.
        A wrong token is refused outright (401), not treated as no token."""
        auth = request.headers.get("authorization")
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            given = token.strip().encode()
            if scheme.lower() == "bearer" and any(
                hmac.compare_digest(given, t) for t in self.tokens
            ):
                return Principal("token")
            raise HttpError(401, "invalid API token", {"www-authenticate": "Bearer"})
        nonce = self.sessions.check(request.cookies.get(COOKIE))
        if nonce is not None:
            return Principal("session", nonce)
        return None if self.opts.password_hash else Principal("open")

    async def authorize(self, request: Request, write: bool, api: bool) -> dict[str, str]:
        """Check access (and, for a write from a session, its CSRF token); returns the form
        fields of a POST. ``api``: the JSON API, open without a password as it always was."""
        who = self.principal(request)
        if who is None:
            if api:
                raise HttpError(
                    401, "log in at /login or send Authorization: Bearer <token>",
                    {"www-authenticate": "Bearer"},
                )  # fmt: skip
            raise LoginRequired
        form = await read_form(request) if request.method == "POST" else {}
        if write and who.kind != "token" and not (who.kind == "open" and api):
            token = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
            if who.nonce is None or not self.sessions.csrf_ok(who.nonce, token):
                raise HttpError(403, "missing or wrong CSRF token (reload the page)")
        return form

    def _api(self, fn: Handler, method: str) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            await self.authorize(request, write=method == "POST", api=True)
            try:
                raw = parse_qs(request.url.query, max_num_fields=20)
                params = {k: v[-1] for k, v in raw.items()}
                result = await fn(params)
            except ValueError as exc:  # bad parameters (parse_qs limits, conversions)
                raise HttpError(400, str(exc)) from exc
            if isinstance(result, tuple):
                status, body, _ = result
                return json_response(status, body)
            return json_response(200, result)

        return endpoint

    async def limited(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` in one of ``api_concurrency`` slots; 503 when ``api_queue``
        requests already wait for one."""
        if self.limiter.statistics().tasks_waiting >= self.opts.api_queue:
            raise HttpError(503, "busy: too many API requests at once, retry shortly")
        async with self.limiter:
            return await work()

    # --- open endpoints -------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        async def render() -> bytes:
            await self.server.gather_metrics()  # the workers' counters, with workers > 1
            snapshot = self.collector.snapshot()
            return await trio.to_thread.run_sync(generate_latest, snapshot)  # type: ignore[arg-type]

        body = await self.limited(render)
        return Response(body, 200, {"cache-control": "no-store"}, CONTENT_TYPE_LATEST)

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "up"})

    async def ready(self, request: Request) -> Response:
        steps = []
        for s in self.server.chain.steps:
            entry: dict[str, Any] = {"step": s.setup.where, "plugin": s.setup.name}
            entry["ready"] = ready = s.ready()
            if not ready and (reason := s.not_ready_reason()):
                entry["reason"] = reason
            steps.append(entry)
        ok = all(s["ready"] for s in steps)
        return json_response(200 if ok else 503, {"ready": ok, "steps": steps})

    # --- the JSON API ---------------------------------------------------------------------

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
            blocked=reply.blocked,
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
            "groups": self.server.blocking.group_status(),
        }

    def group_param(self, params: dict[str, str]) -> str | None:
        """The ``group`` parameter: a [groups] name (400 otherwise), or None."""
        group = params.get("group")
        if group is None:
            return None
        known = sorted(g.name for g in self.server.config.clients.groups)
        if group not in known:
            raise HttpError(400, f"group: unknown group {group!r} (known: {', '.join(known)})")
        return group

    async def blocking_enable(self, params: dict[str, str]) -> dict[str, Any]:
        self._blocking_steps()
        group = self.group_param(params)
        if group is None:
            self.server.blocking.resume()
        else:
            self.server.blocking.resume_group(group)
        return await self.blocking_status(params)

    async def blocking_disable(self, params: dict[str, str]) -> dict[str, Any]:
        self._blocking_steps()
        group = self.group_param(params)
        duration = None
        if params.get("duration"):
            try:
                duration = options.duration(params["duration"])
            except (TypeError, ValueError) as exc:
                raise HttpError(400, f"duration: {exc}") from exc
            if not 0 < duration <= MAX_DISABLE:
                raise HttpError(400, f"duration must be > 0 and at most {MAX_DISABLE:g} s")
        if group is None:
            self.server.blocking.pause(duration)
        else:
            self.server.blocking.pause_group(group, duration)
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


async def read_form(request: Request) -> dict[str, str]:
    """The url-encoded form of a POST (last value per field), at most `MAX_FORM` bytes."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise HttpError(413, f"form over {MAX_FORM} bytes")
    if not body:
        return {}
    try:
        raw = parse_qs(body.decode("utf-8"), max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, f"bad form: {exc}") from exc
    return {k: v[-1] for k, v in raw.items()}


def _without_body(send: Send) -> Send:
    """HEAD: the GET's headers (content-length included), no body."""

    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            message = {**message, "body": b""}
        await send(message)

    return wrapped
