"""The plain DNS upstreams forward registers (``udp``, ``tcp``), and where "system" and
our own listeners are, so that an upstream that is this proxy is a config error."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Any

from dnsproxy.chain import Setup
from dnsproxy.streamclient import PipelinedTcpUpstream
from dnsproxy.udpclient import UdpUpstream
from dnsproxy.upstream import Upstream, UpstreamSpec

RESOLV_CONF = Path("/etc/resolv.conf")


def system_nameservers() -> list[str]:
    """The ``nameserver`` lines of resolv.conf (zone ids dropped)."""
    try:
        lines = RESOLV_CONF.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            out.append(parts[1].partition("%")[0])
    return out


def own_listener(host: str, port: int, setup: Setup) -> bool:
    """Whether host:port is one of our listeners (a wildcard listener covers local addresses)."""
    try:
        target = ipaddress.ip_address(host)
    except ValueError:
        return False
    for addr in setup.server.listen:
        if addr.port != port:
            continue
        try:
            mine = ipaddress.ip_address(addr.host)
        except ValueError:
            continue
        if mine == target:
            return True
        if mine.is_unspecified and mine.version == target.version and _is_local(target):
            return True
    return False


def _is_local(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``addr`` belongs to this host: only local addresses can be bound."""
    family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError:
            return False
    return True


def plain(tcp_only: bool) -> Any:
    """The factory of plain DNS upstreams: UDP with TCP for truncated answers, or TCP only.

    TCP is one reused, pipelined connection per upstream (RFC 7766 §6.2.1).
    """

    def factory(spec: UpstreamSpec, setup: Setup) -> Upstream:
        if spec.extra:
            key = next(iter(spec.extra))
            raise setup.error("upstreams", f"{spec.url}: unknown option {key!r}")
        port = spec.port or 53
        if own_listener(spec.host, port, setup):
            raise setup.error(
                "upstreams", f"{spec.url} is this proxy's own listener (a forwarding loop)"
            )
        try:
            ipaddress.ip_address(spec.host)
        except ValueError as exc:
            raise setup.error(
                "upstreams", f"{spec.url}: plain DNS upstreams must be IP addresses"
            ) from exc
        tcp = PipelinedTcpUpstream(spec.host, port)
        return tcp if tcp_only else UdpUpstream(spec.host, port, tcp)

    return factory
