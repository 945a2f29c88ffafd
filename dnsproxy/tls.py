"""TLS for the encrypted listeners: server contexts from certificate files, reloaded in place.

A listener holds one `ssl.SSLContext` for its life; a reload loads the new certificate
into that same context (`SSLContext.load_cert_chain`), so handshakes from then on use it
while open connections keep the session they have. Files are loaded into a scratch
context first: a bad renewal (a key that does not match, a half-written file) is logged
and the running certificate stays.
"""

from __future__ import annotations

import logging
import ssl
import struct
from collections.abc import Sequence
from pathlib import Path

import trio

from dnsproxy import wire
from dnsproxy.errors import DnsProxyError
from dnsproxy.files import Stamp, stamps
from dnsproxy.wire import Query

log = logging.getLogger("dnsproxy.tls")

ALPN_DOT = ("dot",)  # RFC 7858 / IANA
ALPN_DOH = ("h2", "http/1.1")  # RFC 8484 §5.2: HTTP/2 is the minimum recommended


class TlsError(DnsProxyError):
    """A certificate or key that cannot be used; the text names the option and file."""


def load_context(cert: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server context (TLS 1.2 or later, no compression, no renegotiation) with
    ``cert`` and ``key``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION  # a write never waits on a read
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    ctx.sni_callback = _remember_sni
    _load(ctx, cert, key)
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path) -> None:
    for option, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            path.read_bytes()
        except OSError as exc:
            raise TlsError(f"{option}: {path}: cannot read: {exc.strerror}") from exc
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError(f"tls_key: {key} does not match the certificate {cert}") from exc
        raise TlsError(
            f"tls_cert, tls_key: {cert}, {key}: not a PEM certificate chain and its private"
            f" key ({exc.reason or exc})"
        ) from exc


def _remember_sni(obj: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: object) -> None:
    """Keep the client's server name on its SSL object (the DoT client identifier)."""
    obj.dnsproxy_sni = name  # type: ignore[union-attr]


def server_name(obj: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SNI the client sent in this handshake, if any."""
    return getattr(obj, "dnsproxy_sni", None)


class Certs:
    """The certificate and key of the encrypted listeners and their contexts (one per
    ALPN set), reloaded when asked (SIGHUP) or when the files change on disk."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert, self.key = cert, key
        self.contexts: dict[tuple[str, ...], ssl.SSLContext] = {}
        self.stamp = self._stamp()
        self.reloads = 0

    def context(self, alpn: tuple[str, ...]) -> ssl.SSLContext:
        """The live context for listeners offering ``alpn`` (made on first use)."""
        ctx = self.contexts.get(alpn)
        if ctx is None:
            ctx = self.contexts[alpn] = load_context(self.cert, self.key, alpn)
        return ctx

    def _stamp(self) -> tuple[Stamp, ...]:
        return stamps((self.cert, self.key))

    def reload(self, cert: Path | None = None, key: Path | None = None) -> bool:
        """Load the files (new paths if given) into every live context; on error log it
        and keep serving the current certificate."""
        cert, key = cert or self.cert, key or self.key
        self.stamp = self._stamp()
        try:
            load_context(cert, key, ())  # all or nothing: check before touching live ones
            for ctx in self.contexts.values():
                _load(ctx, cert, key)
        except TlsError as exc:
            log.error("TLS certificate reload failed, keeping the current one: %s", exc)
            return False
        self.cert, self.key = cert, key
        self.stamp = self._stamp()
        self.reloads += 1
        log.info("TLS certificate loaded from %s", cert)
        return True

    async def watch(self, interval: float) -> None:
        """Reload whenever the files' mtime or size changes (a certbot renewal)."""
        while True:
            await trio.sleep(interval)
            if self._stamp() != self.stamp:
                self.reload()


ENCRYPTED = frozenset(("tls", "https"))  # the transports `stream_options` applies to
KEEPALIVE_OPTION = 11  # RFC 7828
PADDING_BLOCK = 468  # RFC 8467 §4.1: responses padded to a multiple of 468 octets


def stream_options(out: bytes, q: Query, idle: float) -> bytes:
    """Add the EDNS options a DoT/DoH response owes the query's options: edns-tcp-keepalive
    with the idle timeout (DoT only; RFC 8484 §5.2 rules it out over HTTP) when asked, then
    padding to a multiple of `PADDING_BLOCK` when the query was padded. The response's OPT
    is its last record (`finalize` puts it there); a response without one is left alone."""
    codes = {code for code, _ in q.edns_options}
    extra = b""
    if KEEPALIVE_OPTION in codes and q.transport == "tls":
        extra = wire.edns_option(KEEPALIVE_OPTION, struct.pack("!H", min(int(idle * 10), 65535)))
    if wire.PADDING_OPTION not in codes and not extra:
        return out
    opt = _last_opt(out)
    if opt is None:
        return out
    if wire.PADDING_OPTION in codes:
        pad = -(len(out) + len(extra) + 4) % PADDING_BLOCK
        extra += wire.edns_option(wire.PADDING_OPTION, bytes(pad))
    rdlen = struct.unpack_from("!H", out, opt + 9)[0] + len(extra)
    if rdlen > 65535 or len(out) + len(extra) > 65535:
        return out
    return out[: opt + 9] + struct.pack("!H", rdlen) + out[opt + 11 :] + extra


def _last_opt(msg: bytes) -> int | None:
    """The offset of the response's OPT record when it is the last record, else None."""
    try:
        _, recs = wire.records(msg)
    except ValueError:
        return None
    last = recs[-1] if recs else None
    if last is None or last.rtype != wire.OPT or last.end != len(msg):
        return None
    return last.name_off
