"""Bootstrap: the addresses of upstreams named by host name (``tls://dns.quad9.net``),
resolved through plain DNS resolvers given by IP, never through the proxy itself."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import dns.exception
import dns.message
import dns.rdatatype
import trio

from dnsproxy import wire
from dnsproxy.errors import UpstreamError
from dnsproxy.upstream import Request, Upstream, UpstreamSpec


def needs_bootstrap(spec: UpstreamSpec) -> bool:
    """Whether ``spec`` names its host by name without fixed addresses (``bootstrap`` key)."""
    if spec.scheme in ("udp", "tcp") or "bootstrap" in spec.extra:
        return False
    try:
        ipaddress.ip_address(spec.host)
    except ValueError:
        return True
    return False


def _request(host: str, qtype: int) -> Request:
    name = wire_name(host)
    return Request(name + qtype.to_bytes(2, "big") + b"\x00\x01", name.lower(), qtype, 1)


def wire_name(host: str) -> bytes:
    """``host`` as an uncompressed wire-format name."""
    out = b""
    for label in host.rstrip(".").split("."):
        data = label.encode() if label.isascii() else label.encode("idna")
        if not data or len(data) > 63:
            raise UpstreamError(f"{host!r} is not a host name")
        out += bytes([len(data)]) + data
    return out + b"\x00"


async def resolve_host(
    host: str, resolvers: Sequence[Upstream], timeout: float
) -> tuple[list[str], float]:
    """The A and AAAA addresses of ``host`` (A first) and their smallest TTL, from the
    first resolver that answers; UpstreamError when none gives an address."""
    errors = []
    for resolver in resolvers:
        found: list[str] = []
        ttl = float("inf")
        answered = False
        for qtype in (wire.A, wire.AAAA):
            with trio.move_on_after(timeout):
                try:
                    data = await resolver.exchange(_request(host, qtype))
                    msg = dns.message.from_wire(data)
                except (UpstreamError, OSError, dns.exception.DNSException) as exc:
                    errors.append(f"{resolver.name}: {exc}")
                    continue
                answered = True
                for rrset in msg.answer:
                    if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
                        found += [rd.address for rd in rrset]
                        ttl = min(ttl, rrset.ttl)
                if not found and msg.rcode():
                    errors.append(f"{resolver.name}: rcode {msg.rcode()}")
                continue
            errors.append(f"{resolver.name}: timeout")
        if found:
            return found, ttl
        if answered and not errors:
            errors.append(f"{resolver.name}: no address")
    raise UpstreamError(f"{host} not resolved: {'; '.join(errors) or 'no resolver'}")
