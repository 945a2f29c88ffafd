"""doh — DNS over HTTPS upstreams (``https://``) for forward (README.md beside this file).

The scheme's factory (`make_doh`) and `DohUpstream`, one httpx HTTP/2 client per upstream.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import struct
from typing import TYPE_CHECKING, Literal

import attrs
import trio
from dnsproxy.plugins.dot import PAD_BLOCK, TlsOptions, build_options, targets, tls_context

from dnsproxy import wire
from dnsproxy.chain import Setup
from dnsproxy.errors import UpstreamError
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.streamclient import describe, tls_error
from dnsproxy.upstream import Addresses, Request, UpstreamSpec, matches

if TYPE_CHECKING:
    import httpx

# httpx logs every request at INFO: far too much for a query path.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONTENT_TYPE = "application/dns-message"
MAX_BODY = 65535
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


@attrs.frozen
class DohOptions(TlsOptions):
    method: Literal["post", "get"] = "post"


def cap_ttls(data: bytes, limit: int) -> bytes:
    """``data`` with every TTL above ``limit`` lowered to it (OPT records untouched)."""
    _, recs = wire.records(data)
    out: bytearray | None = None
    for rec in recs:
        if rec.rtype == wire.OPT:
            continue
        (ttl,) = struct.unpack_from("!I", data, rec.ttl_off)
        if ttl > limit:
            out = out if out is not None else bytearray(data)
            struct.pack_into("!I", out, rec.ttl_off, limit)
    return data if out is None else bytes(out)


def freshness(headers: httpx.Headers) -> int | None:
    """Seconds the response may still be used: Cache-Control max-age minus Age."""
    m = _MAX_AGE.search(headers.get("cache-control", ""))
    if m is None:
        return None
    age = headers.get("age", "0")
    return max(0, int(m.group(1)) - (int(age) if age.isdigit() else 0))


class DohUpstream:
    """An `Upstream` speaking RFC 8484 through one httpx client."""

    def __init__(
        self,
        name: str,
        client: httpx.AsyncClient,
        addresses: Addresses,
        base: tuple[int, str],
        headers: dict[str, str],
        extensions: dict[str, str],
        method: str,
        max_inflight: int,
    ) -> None:
        self.name = name
        self.client = client
        self.addresses = addresses  # tried in order from the last good one
        self.port, self.path = base
        self.headers = headers
        self.extensions = extensions
        self.method = method
        self._slots = trio.Semaphore(max_inflight)
        self._current = 0
        self.used = False

    @property
    def urls(self) -> list[str]:
        """One URL per current address of the host."""
        return [wire.hostport(a, self.port, "https") + self.path for a in self.addresses.current]

    async def exchange(self, req: Request) -> bytes:
        import httpx

        self.used = True
        data = req.to_wire(0, pad_block=PAD_BLOCK)
        urls = self.urls
        if not urls:
            where = self.addresses
            raise UpstreamError(f"{where.host} not resolved yet {where.error}".strip())
        async with self._slots:
            for attempt in range(len(urls)):
                index = (self._current + attempt) % len(urls)
                try:
                    try:
                        reply = await self._request(urls[index], data, req)
                    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
                        # The server ended a reused connection (GOAWAY after its request
                        # limit, idle close): one more try on a fresh connection.
                        reply = await self._request(urls[index], data, req)
                except httpx.ConnectError as exc:
                    if tls_error(exc) is not None or attempt + 1 == len(urls):
                        raise UpstreamError(describe(exc)) from exc
                    continue
                except httpx.HTTPError as exc:
                    raise UpstreamError(describe(exc)) from exc
                self._current = index
                return reply
        raise AssertionError("unreachable: urls is never empty")

    async def _request(self, url: str, data: bytes, req: Request) -> bytes:
        if self.method == "get":
            query = base64.urlsafe_b64encode(data).rstrip(b"=").decode()
            request = self.client.build_request(
                "GET", url, params={"dns": query}, headers=self.headers, extensions=self.extensions
            )
        else:
            request = self.client.build_request(
                "POST",
                url,
                content=data,
                headers={**self.headers, "content-type": CONTENT_TYPE},
                extensions=self.extensions,
            )
        resp = await self.client.send(request, stream=True)
        try:
            if resp.status_code != 200:
                raise UpstreamError(f"HTTP status {resp.status_code}")
            ctype = resp.headers.get("content-type", "").partition(";")[0].strip().lower()
            if ctype != CONTENT_TYPE:
                raise UpstreamError(f"content type {ctype or 'missing'!r}")
            length = resp.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY:
                raise UpstreamError(f"body of {length} bytes")
            body = bytearray()
            async for chunk in resp.aiter_bytes():
                body += chunk
                if len(body) > MAX_BODY:
                    raise UpstreamError(f"body over {MAX_BODY} bytes")
        finally:
            await resp.aclose()
        reply = bytes(body)
        if not matches(reply, 0, req):
            raise UpstreamError("the reply does not answer the question")
        fresh = freshness(resp.headers)
        if fresh is not None:
            try:
                reply = cap_ttls(reply, fresh)
            except ValueError as exc:
                raise UpstreamError(f"malformed reply ({exc})") from exc
        return reply

    def close(self) -> None:
        """Close the connection pool (in a system task: closing is async)."""
        if not self.used:
            return
        with contextlib.suppress(RuntimeError):  # outside Trio: its connections are gone
            trio.lowlevel.spawn_system_task(self._aclose, name=f"close {self.name}")

    async def _aclose(self) -> None:
        with trio.move_on_after(1):
            await self.client.aclose()


def make_doh(spec: UpstreamSpec, setup: Setup) -> DohUpstream:
    try:
        import h2  # noqa: F401  (httpx needs it for HTTP/2)
        import httpx
    except ImportError as exc:
        raise setup.error(
            "upstreams",
            f"{spec.url}: DoH needs httpx with HTTP/2 ({exc.name} is missing): "
            "pip install dnsproxy[doh]",
        ) from exc
    opts = build_options(DohOptions, spec, setup)
    addresses, name = targets(spec, opts, setup)
    port = spec.port or 443
    path = spec.path or "/dns-query"
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    headers = {"accept": CONTENT_TYPE, "host": host if port == 443 else f"{host}:{port}"}
    client = httpx.AsyncClient(
        http2=True,
        verify=tls_context(opts.ca_file, setup, spec.url),
        trust_env=False,
        follow_redirects=False,
        timeout=httpx.Timeout(30.0),
        limits=httpx.Limits(
            max_connections=len(addresses.current) or 2,  # 2: a name, old and new address
            max_keepalive_connections=len(addresses.current) or 2,
            keepalive_expiry=opts.idle_timeout,
        ),
    )
    return DohUpstream(
        f"https://{host}:{port}{path}",
        client,
        addresses,
        (port, path),
        headers,
        {"sni_hostname": name},
        opts.method,
        opts.max_inflight,
    )


@hookimpl
def dnsproxy_add_upstream_schemes(registry: Registry) -> None:
    registry.add_scheme("https", make_doh)
