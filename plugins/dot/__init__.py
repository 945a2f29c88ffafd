"""dot — DNS over TLS upstreams (``tls://``) for forward (README.md beside this file).

The scheme's factory (`make_dot`), the TLS options and helpers doh shares (`TlsOptions`,
`targets`, `tls_context`), and the SPKI pin check (`spki_digest`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import ssl
from collections.abc import Sequence
from typing import TypeVar

import attrs
import trio

from dnsproxy import options
from dnsproxy.chain import Setup
from dnsproxy.errors import UpstreamError
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.streamclient import Connector, StreamClient
from dnsproxy.upstream import Addresses, UpstreamSpec
from dnsproxy.wire import hostport

T = TypeVar("T")
PAD_BLOCK = 128  # RFC 8467 §4.1: queries padded to a multiple of 128 octets


def _pins(value: object) -> tuple[bytes, ...]:
    """SPKI pins: base64 SHA-256 digests, optionally prefixed ``sha256/``."""
    if isinstance(value, tuple) and all(isinstance(v, bytes) for v in value):
        return value
    out = []
    for text in options.string_tuple(value):
        try:
            digest = base64.b64decode(text.removeprefix("sha256/"), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"{text!r} is not base64") from exc
        if len(digest) != 32:
            raise ValueError(f"{text!r} is not a SHA-256 digest (32 bytes)")
        out.append(digest)
    return tuple(out)


def _addresses(value: object) -> tuple[str, ...]:
    out = options.string_tuple(value)
    for text in out:
        try:
            ipaddress.ip_address(text)
        except ValueError as exc:
            raise ValueError(f"{text!r} is not an IP address") from exc
    return out


@attrs.frozen
class TlsOptions:
    """Per-upstream keys shared by ``tls://`` and ``https://`` upstreams."""

    server_name: str = ""
    ca_file: str = ""
    bootstrap: tuple[str, ...] = attrs.field(default=(), converter=_addresses)
    idle_timeout: float = options.seconds(10.0, 0.1, 3600)
    max_inflight: int = attrs.field(default=100, validator=options.in_range(1, 4096))


@attrs.frozen
class DotOptions(TlsOptions):
    spki_pin: tuple[bytes, ...] = attrs.field(default=(), converter=_pins)


def build_options(cls: type[T], spec: UpstreamSpec, setup: Setup) -> T:
    """Validate an upstream table's keys besides ``url`` (one error line per problem)."""
    return options.build(cls, spec.extra, f"{setup.where}: upstreams: {spec.url}")


def tls_context(ca_file: str, setup: Setup, url: str) -> ssl.SSLContext:
    """A verifying client context (TLS 1.2+): system CAs plus ``ca_file``."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        path = setup.path(ca_file)
        try:
            ctx.load_verify_locations(cafile=str(path))
        except (OSError, ssl.SSLError) as exc:
            raise setup.error("upstreams", f"{url}: ca_file {str(path)!r}: {exc}") from exc
    return ctx


def targets(spec: UpstreamSpec, opts: TlsOptions, setup: Setup) -> tuple[Addresses, str]:
    """The addresses to connect to (fixed, or kept current by forward's bootstrap) and
    the name the certificate must carry."""
    name = opts.server_name or spec.host
    try:
        ipaddress.ip_address(spec.host)
    except ValueError:
        if opts.bootstrap:
            return Addresses(spec.host, list(opts.bootstrap)), name
        if spec.addresses is None:
            raise setup.error(
                "upstreams",
                f'{spec.url}: a host name needs bootstrap = ["<IP>", ...] '
                "(it is never resolved through the proxy)",
            ) from None
        return spec.addresses, name
    return Addresses(spec.host, [spec.host]), name


def spki_digest(cert_der: bytes) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo (the RFC 7858 §4.2 pin)."""

    def element(off: int) -> tuple[int, int, int]:  # (tag, content start, end)
        tag, length = cert_der[off], cert_der[off + 1]
        off += 2
        if length & 0x80:
            n = length & 0x7F
            length = int.from_bytes(cert_der[off : off + n], "big")
            off += n
        if off + length > len(cert_der):
            raise ValueError("certificate DER overruns")
        return tag, off, off + length

    _, body, _ = element(0)  # Certificate
    _, off, _ = element(body)  # tbsCertificate
    tag, _, end = element(off)
    if tag == 0xA0:  # [0] version
        off = end
    for _ in range(5):  # serial, signature, issuer, validity, subject
        _, _, off = element(off)
    _, _, end = element(off)
    return hashlib.sha256(cert_der[off:end]).digest()


def dot_connector(
    addresses: Addresses, port: int, ctx: ssl.SSLContext, name: str, pins: Sequence[bytes]
) -> Connector:
    """Open TCP to the first reachable address, then TLS with the name and pin checked."""

    async def connect() -> trio.abc.Stream:
        error: OSError | None = None
        if not addresses.current:
            raise UpstreamError(f"{addresses.host} not resolved yet {addresses.error}".strip())
        for host in addresses.current:
            try:
                tcp = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                error = exc
                continue
            stream = trio.SSLStream(tcp, ctx, server_hostname=name)
            try:
                await stream.do_handshake()
                if pins:
                    cert = stream.getpeercert(binary_form=True)
                    if cert is None or spki_digest(cert) not in pins:
                        raise UpstreamError("TLS certificate does not match spki_pin")
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return stream
        assert error is not None
        raise error

    return connect


def make_dot(spec: UpstreamSpec, setup: Setup) -> StreamClient:
    opts = build_options(DotOptions, spec, setup)
    if spec.path not in ("", "/"):
        raise setup.error("upstreams", f"{spec.url}: a tls:// URL has no path")
    addresses, name = targets(spec, opts, setup)
    port = spec.port or 853
    ctx = tls_context(opts.ca_file, setup, spec.url)
    return StreamClient(
        hostport(spec.host, port, "tls"),
        dot_connector(addresses, port, ctx, name, opts.spki_pin),
        pad_block=PAD_BLOCK,
        max_inflight=opts.max_inflight,
        idle_timeout=opts.idle_timeout,
    )


@hookimpl
def dnsproxy_add_upstream_schemes(registry: Registry) -> None:
    registry.add_scheme("tls", make_dot)
