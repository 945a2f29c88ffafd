"""Discovery of Designated Resolvers (RFC 9462): the ``_dns.resolver.arpa`` SVCB answer.

When encrypted listeners are configured (and ``[server] ddr`` is on), the server answers
``_dns.resolver.arpa`` itself, before the chain: one SVCB record per encrypted endpoint,
so Windows 11 and iOS upgrade from plain DNS to DoT/DoH. The records are built once the
listeners are bound (port 0 resolves to the real port).
"""

from __future__ import annotations

import ipaddress

import dns.rdata

from dnsproxy import wire
from dnsproxy.reply import Reply, respond, rr
from dnsproxy.wire import Query

KEY = wire.name_to_key("_dns.resolver.arpa")
SVCB = 64
TTL = 300
ALPN = {"tls": "dot", "https": "h2,http/1.1"}


class Answer:
    """The SVCB records for the bound encrypted listeners (``(scheme, host, port, path)``),
    targeting ``target`` ("." when no ``tls_server_name`` is set: the owner name)."""

    def __init__(self, endpoints: list[tuple[str, str, int, str]], target: str) -> None:
        target = target.rstrip(".") + "." if target else "."
        records = []
        for priority, (scheme, host, port, path) in enumerate(endpoints, 1):
            params = [f"alpn={ALPN[scheme]}", f"port={port}"]
            ip = ipaddress.ip_address(host)
            if not ip.is_unspecified:
                params.append(f"ipv{ip.version}hint={ip}")
            if scheme == "https":
                params.append(f"dohpath={path}{{?dns}}")
            text = f"{priority} {target} {' '.join(params)}"
            rdata = dns.rdata.from_text("IN", "SVCB", text).to_wire()
            records.append(rr(SVCB, TTL, rdata))
        self.records = tuple(records)

    def reply(self, q: Query) -> Reply:
        """The records for an SVCB query, NODATA for any other type."""
        answers = self.records if q.qtype == SVCB else ()
        return respond(q, wire.NOERROR, answers, aa=True, source="ddr")
