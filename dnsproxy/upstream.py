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

import base64
import binascii
import ipaddress
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
# An OPT record up to its options (root, type, size, TTL, RDLENGTH): `wire.opt_record`
# packed in `Request.to_wire` itself, one call less per forwarded query.
_OPT_FIXED = struct.Struct("!xHHIH")


@attrs.define(eq=False)
class Addresses:
    """The addresses of an upstream named by host name, kept current by forward's
    bootstrap (`current` is replaced, never mutated: a connector reads it per connect)."""

    host: str
    current: list[str] = attrs.field(factory=list)
    error: str = ""  # why the last resolution failed ("" after a success)


@attrs.frozen
class UpstreamSpec:
    """An upstream as written in the config: a URL string or a table with ``url``."""

    url: str
    scheme: str
    host: str
    port: int | None
    path: str
    extra: Mapping[str, Any] = attrs.field(factory=dict)
    # Set by forward for a host name without fixed addresses: resolved in the background.
    addresses: Addresses | None = None

    @classmethod
    def parse(cls, value: str | Mapping[str, Any]) -> UpstreamSpec:
        """Parse "192.0.2.1", "192.0.2.1:53", "::1", "[::1]:53", "tcp://h:p", "tls://h",
        "https://h/p", and DNS stamps ("sdns://...", `parse_stamp`)."""
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
        if url.startswith("sdns://"):
            url, stamped = parse_stamp(url)
            extra = {**stamped, **extra}
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


STAMP_SCHEMES = {0x00: "udp", 0x02: "https", 0x03: "tls"}


def parse_stamp(stamp: str) -> tuple[str, dict[str, Any]]:
    """A DNS stamp (https://dnscrypt.info/stamps-specifications) as a URL and table keys.

    Plain DNS (0x00), DoH (0x02) and DoT (0x03). The stamp's address, if any, becomes the
    fixed ``bootstrap`` address of the host name; its certificate hashes are checked for
    form only (they hash a certificate anywhere in the chain, which the TLS stack here
    does not expose), so the certificate is verified against the host name as usual.
    Raises ValueError saying what is wrong.
    """
    text = stamp.removeprefix("sdns://")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{stamp[:40]!r}: a DNS stamp is base64url ({exc})") from None
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"{stamp[:40]!r}: DNS stamp truncated")
        pos += n
        return data[pos - n : pos]

    def lp() -> str:
        raw = take(take(1)[0])
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"{stamp[:40]!r}: DNS stamp has a non-ASCII field") from None

    def vlp() -> list[bytes]:
        out = []
        while True:
            size = take(1)[0]
            item = take(size & 0x7F)
            if item:
                out.append(item)
            if not size & 0x80:
                return out

    proto = take(1)[0]
    scheme = STAMP_SCHEMES.get(proto)
    if scheme is None:
        raise ValueError(
            f"{stamp[:40]!r}: DNS stamp protocol 0x{proto:02x} is not supported"
            " (plain DNS 0x00, DoH 0x02, DoT 0x03)"
        )
    take(8)  # properties: DNSSEC, no-log, no-filter (informational)
    addr = lp()
    if scheme == "udp":
        if not addr:
            raise ValueError(f"{stamp[:40]!r}: plain DNS stamp without an address")
        url, extra = f"udp://{addr}", {}
    else:
        for digest in vlp():
            if len(digest) != 32:
                raise ValueError(f"{stamp[:40]!r}: DNS stamp hash is not SHA-256 (32 bytes)")
        host = lp()
        if not host:
            raise ValueError(f"{stamp[:40]!r}: DNS stamp without a host name")
        path = lp() if scheme == "https" else ""
        if scheme == "https" and not path.startswith("/"):
            raise ValueError(f"{stamp[:40]!r}: DoH stamp path {path!r} must start with /")
        extra = {}
        ip = urlsplit(f"//{addr}").hostname if addr else None
        if ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise ValueError(f"{stamp[:40]!r}: DNS stamp address {addr!r}") from None
            port = urlsplit(f"//{addr}").port
            if ":" not in host.rpartition("]")[2] and port is not None:
                host = f"{host}:{port}"
            extra["bootstrap"] = [ip]
        url = f"{scheme}://{host}{path}"
    if pos != len(data) and scheme == "udp":
        raise ValueError(f"{stamp[:40]!r}: DNS stamp has trailing bytes")
    return url, extra


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
        flags = self.flags & (wire.RD | wire.CD)
        if not self.edns:
            return wire.HEADER.pack(msg_id, flags, 1, 0, 0, 0) + self.question
        options = self.options
        if pad_block:
            pad = -(12 + len(self.question) + 11 + len(options) + 4) % pad_block
            options += wire.edns_option(wire.PADDING_OPTION, b"\x00" * pad)
        opt = _OPT_FIXED.pack(
            wire.OPT, UPSTREAM_UDP_SIZE, wire.EDNS_DO if self.do else 0, len(options)
        )
        return b"".join((wire.HEADER.pack(msg_id, flags, 1, 0, 0, 1), self.question, opt, options))


_ID_FLAGS_QD = struct.Struct("!HHH")
_QR_OPCODE = 0xF800  # the QR bit and the opcode


def matches(data: bytes, msg_id: int, req: Request) -> bool:
    """Whether ``data`` is a response to ``req`` sent with ``msg_id`` (RFC 5452 §9.1)."""
    if len(data) < 12:
        return False
    rid, flags, qd = _ID_FLAGS_QD.unpack_from(data)
    if rid != msg_id or flags & _QR_OPCODE != wire.QR or qd != 1:  # a response, opcode 0
        return False
    end = 12 + len(req.question)  # slices of a shorter message compare unequal
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
