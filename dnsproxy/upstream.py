"""Upstream transports: the protocol every scheme implements, and what they share.

An `Upstream` takes a `Request` (question, flags, DO) and returns the upstream's response
as wire bytes, already matched to the request: source address and port (a connected
socket per query, RFC 5452 §9.1), a fresh random ID from `secrets` and the question
(case-insensitively). Datagrams that do not match never end the wait. Callers own the
timeout (``trio.move_on_after``), as Trio code should. Plain DNS is in `udpclient` (UDP)
and `streamclient` (TCP, and TLS for ``dot``).

Schemes are registered by plugins through ``dnsproxy_add_upstream_schemes``; the built-in
``forward`` plugin registers ``udp`` (the default for "host:port") and ``tcp``; the ``dot``
and ``doh`` plugins register ``tls`` and ``https``.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
import trio

from dnsproxy import wire
from dnsproxy.errors import UpstreamError

UPSTREAM_UDP_SIZE = 1232
PADDING_OPTION = 12  # RFC 7830


@attrs.frozen
class UpstreamSpec:
    """An upstream as written in the config: a URL string or a table with ``url``."""

    url: str
    scheme: str
    host: str
    port: int | None
    path: str
    extra: Mapping[str, Any] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, value: str | Mapping[str, Any]) -> UpstreamSpec:
        """Parse "192.0.2.1", "192.0.2.1:53", "::1", "[::1]:53", "tcp://h:p", "tls://h", "https://h/p"."""
        extra: dict[str, Any] = {}
        if isinstance(value, Mapping):
            extra = {k: v for k, v in value.items() if k != "url"}
            url = value.get("url")
            if not isinstance(url, str):
                raise ValueError('an upstream table needs url = "..."')
        elif isinstance(value, str):
            url = value
        else:
            raise ValueError(f"an upstream is a string or a table, got {value!r}")
        if "://" not in url and url.count(":") > 1 and not url.startswith("["):
            url = f"[{url}]"  # a bare IPv6 address: "2001:db8::1"
        text = url if "://" in url else "udp://" + url
        parts = urlsplit(text)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{url!r}: bad port") from exc
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        return cls(url, parts.scheme.lower(), parts.hostname, port, parts.path, extra)


@attrs.define  # not frozen: one is built per forwarded query, and a frozen init is slower
class Request:
    """What forward asks an upstream: the client's question with fresh, proxy-owned EDNS.

    Treat it as immutable (``attrs.evolve`` for a variant): transports may share it.
    """

    question: bytes  # qname (wire, client's case) + qtype + qclass
    key: bytes  # lower-cased qname
    qtype: int
    qclass: int
    flags: int = wire.RD  # RD and CD as the client set them
    do: bool = False
    edns: bool = True
    options: bytes = b""  # extra EDNS options, already in wire form (the forward loop marker)

    def to_wire(self, msg_id: int, *, pad_block: int = 0) -> bytes:
        """The query message with ``msg_id``; ``pad_block`` pads it (RFC 7830/8467)."""
        header = wire.HEADER.pack(msg_id, self.flags & (wire.RD | wire.CD), 1, 0, 0, int(self.edns))
        msg = header + self.question
        if not self.edns:
            return msg
        options = self.options
        if pad_block:
            pad = -(len(msg) + 11 + len(options) + 4) % pad_block
            options += wire.edns_option(PADDING_OPTION, b"\x00" * pad)
        return msg + wire.opt_record(UPSTREAM_UDP_SIZE, self.do, options)


def matches(data: bytes, msg_id: int, req: Request) -> bool:
    """Whether ``data`` is a response to ``req`` sent with ``msg_id`` (RFC 5452 §9.1)."""
    if len(data) < 12:
        return False
    rid, flags, qd = struct.unpack_from("!HHH", data)
    if rid != msg_id or not flags & wire.QR or (flags >> 11) & 0xF != 0 or qd != 1:
        return False
    end = 12 + len(req.question)
    if len(data) < end:
        return False
    return data[12 : end - 4].lower() == req.key and data[end - 4 : end] == req.question[-4:]


_ids: list[int] = []


def new_id() -> int:
    """An unpredictable message ID over the full 0-65535 range (RFC 5452 §9.2).

    From the OS CSPRNG (`secrets`), drawn 512 at a time: one getrandom() call per query
    costs more than the rest of the ID handling.
    """
    if not _ids:
        _ids.extend(memoryview(secrets.token_bytes(1024)).cast("H"))
    return _ids.pop()


class Upstream(Protocol):
    """What ``forward`` needs from an upstream transport.

    A transport may also offer ``send(req, deadline, done)``, the same exchange without a
    task (see `dnsproxy.udpclient.UdpUpstream`); ``forward`` uses it when it is there.
    """

    name: str  # shown in logs, metrics and traces, e.g. "udp://127.0.0.1:53"

    async def exchange(self, req: Request) -> bytes:
        """Send ``req`` and return the matching response (wire bytes). Raise UpstreamError."""
        ...

    def close(self) -> None:
        """Release sockets and connections."""
        ...


async def read_frame(stream: trio.abc.ReceiveStream, buf: bytearray) -> bytes | None:
    """Read one length-prefixed DNS message from ``stream`` (RFC 1035 §4.2.2).

    Shared by the listeners and the stream upstreams.

    ``buf`` holds bytes read past the previous frame. Returns None at a clean EOF between
    frames; raises UpstreamError on EOF inside a frame.
    """
    while True:
        if len(buf) >= 2:
            size = (buf[0] << 8) | buf[1]
            if len(buf) >= 2 + size:
                frame = bytes(buf[2 : 2 + size])
                del buf[: 2 + size]
                return frame
        chunk = await stream.receive_some(65536)
        if not chunk:
            if buf:
                raise UpstreamError("connection closed inside a message")
            return None
        buf += chunk
