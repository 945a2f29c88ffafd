"""The DNS-over-HTTPS listener (RFC 8484): ``https://ADDR:PORT/dns-query`` listen entries.

A small ASGI app served by hypercorn's Trio worker over HTTP/2 and HTTP/1.1, separate
from the ``[http]`` dashboard, feeding queries to the same `Server.handle` as every
other listener (transport "https"):

* ``GET <path>?dns=<base64url, no padding>`` and ``POST <path>`` with a body of type
  ``application/dns-message``; the answer is ``200 application/dns-message`` with
  ``Cache-Control: max-age=<smallest TTL in the answer>``.
* Malformed requests get 400 (no or bad ``dns``, not a DNS query), 413 (a message over
  65535 octets), 415 (a POST of another content type), 405 (another method), 404 (another
  path). A query the chain drops (rate limiting) gets 429.
* ``<path>/<id>`` names the client (`Query.client_id`, AdGuard Home's client identifier).
* The client address is the connection's; ``X-Forwarded-For`` / ``Forwarded`` count only
  when the connection comes from ``[server] trusted_proxies``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config, Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app

from dnsproxy import wire
from dnsproxy.chain import client_address

if TYPE_CHECKING:
    from dnsproxy.server import Server

log = logging.getLogger("dnsproxy.doh")

CONTENT_TYPE = b"application/dns-message"
MAX_MESSAGE = 65535
RESTART_PAUSE = 0.1  # seconds before serving again after hypercorn failed
CLIENT_ID = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
FORWARDED_FOR = re.compile(r'for="?\[?([^\]";,]+)', re.IGNORECASE)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _TlsConfig(Config):
    """hypercorn's config with our live `ssl.SSLContext` (reloaded in place by `tls.Certs`)."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        super().__init__()
        self._ctx = ctx

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self._ctx


class DohListener:
    """One ``https://`` listen entry: its bound socket, TLS context and path."""

    def __init__(self, server: Server, sock: socket.socket, ctx: ssl.SSLContext, path: str) -> None:
        self.server = server
        self.sock = sock
        self.ctx = ctx
        self.path = path

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (the server's accept nursery)."""
        sc = self.server.config.server
        cfg = _TlsConfig(self.ctx)
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("dnsproxy.doh.hypercorn")
        cfg.errorlog.setLevel(logging.WARNING)
        cfg.keep_alive_timeout = sc.tcp_idle_timeout
        cfg.read_timeout = sc.tcp_idle_timeout
        cfg.ssl_handshake_timeout = sc.tls_handshake_timeout
        cfg.h2_max_concurrent_streams = sc.max_tcp_pipeline
        cfg.h11_max_incomplete_size = 16 * 1024
        cfg.graceful_timeout = 1
        serve = partial(
            worker_serve,
            wrap_app(self.app, cfg.wsgi_max_body_size, "asgi"),
            cfg,
            sockets=Sockets([self.sock], [], []),
        )
        while True:  # a connection's failure inside hypercorn ends its server: start again
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(serve)
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
            except Exception as exc:
                self.server._internal_error("doh listener", exc)
                await trio.sleep(RESTART_PAUSE)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI application."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rpartition(".")[2]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        status, body, headers = await self._answer(scope, receive)
        headers = [*headers, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        path = scope["path"]
        client_id = None
        if path != self.path:
            head, _, tail = path.rpartition("/")
            if head != self.path or not CLIENT_ID.fullmatch(tail):
                return _error(404, "not found")
            client_id = tail.lower()
        # The whole body is read (what passes MAX_MESSAGE is discarded) before any answer:
        # hypercorn's HTTP/2 fails the connection when DATA arrives for an answered stream.
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if len(body) <= MAX_MESSAGE:
                body += message.get("body", b"")
            more = message.get("more_body", False)
        method = scope["method"]
        if method == "GET":
            data = _get_message(scope.get("query_string", b""))
            if isinstance(data, tuple):
                return data
        elif method == "POST":
            if len(body) > MAX_MESSAGE:
                return _error(413, "a DNS message is at most 65535 octets")
            headers = dict(scope["headers"])
            ctype = headers.get(b"content-type", b"").partition(b";")[0].strip().lower()
            if ctype != CONTENT_TYPE:
                return _error(415, "POST needs Content-Type: application/dns-message")
            data = bytes(body)
        else:
            return _error(405, "GET or POST", [(b"allow", b"GET, POST")])
        if len(data) < 12 or data[2] & 0x80:
            return _error(400, "not a DNS query")
        out = await self._resolve(data, self._client(scope), client_id)
        if out is None:
            return _error(429, "query dropped")
        headers = [(b"content-type", CONTENT_TYPE)]
        ttl = _min_ttl(out)
        if ttl is not None:
            headers.append((b"cache-control", b"max-age=%d" % ttl))
        return 200, out, headers

    async def _resolve(
        self, data: bytes, client: tuple[str, int], client_id: str | None
    ) -> bytes | None:
        done = trio.Event()
        box: list[bytes | None] = []

        def send(out: bytes | None) -> None:
            box.append(out)
            done.set()

        self.server.handle(data, client, "https", send, client_id)
        if not box:  # answered at once (a cache hit): no scheduler round to wait for it
            await done.wait()
        return box[0]

    def _client(self, scope: Scope) -> tuple[str, int]:
        """The client's address: the connection's, or the forwarded one when the
        connection is from a trusted proxy (walking the hops right to left)."""
        host, port = scope.get("client") or ("", 0)
        trusted = self.server.trusted_proxy
        if not trusted(host):
            return host, port
        headers = dict(scope["headers"])
        forwarded = headers.get(b"forwarded")
        if forwarded is not None:
            hops = FORWARDED_FOR.findall(forwarded.decode("latin-1"))
        else:
            xff = headers.get(b"x-forwarded-for", b"").decode("latin-1")
            hops = [h.strip() for h in xff.split(",") if h.strip()]
        for hop in reversed(hops):
            if client_address(hop) is None:
                break  # garbage or an obfuscated identifier: stop at the last good hop
            host, port = hop, 0
            if not trusted(hop):
                break
        return host, port


def _get_message(query_string: bytes) -> bytes | tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """The message of a GET's ``dns`` parameter, or the error response."""
    value = None
    for pair in query_string.split(b"&"):
        key, _, val = pair.partition(b"=")
        if key == b"dns":
            value = val
    if not value:
        return _error(400, "missing dns parameter")
    if len(value) > (MAX_MESSAGE * 4 + 2) // 3:
        return _error(413, "a DNS message is at most 65535 octets")
    try:
        return base64.b64decode(value + b"=" * (-len(value) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return _error(400, "dns is not base64url")


def _min_ttl(out: bytes) -> int | None:
    """The smallest TTL of the response's records, its OPT aside (RFC 8484 §5.1)."""
    try:
        _, recs = wire.records(out)
    except ValueError:
        return None
    ttls = [int.from_bytes(out[r.ttl_off : r.ttl_off + 4]) for r in recs if r.rtype != wire.OPT]
    return min(ttls) if ttls else None


def _error(
    status: int, text: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    return status, text.encode() + b"\n", [(b"content-type", b"text/plain"), *(headers or [])]
