"""Zone data: loading RFC 1035 zone files and inline records, and the authoritative lookup.

A loaded `Zone` is immutable: a reload builds new zones and swaps them in whole, so a
query never sees half a zone. Names are indexed by their lower-cased wire form (the same
keys as `dnsproxy.wire.Query.key`), so finding a query's zone and node is dictionary hits
on suffixes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.zone
import dns.zonefile

from dnsproxy import wire
from dnsproxy.errors import DnsProxyError

NS, SOA, CNAME, MX, SRV, A, AAAA, DS, ANY = 2, 6, 5, 15, 33, 1, 28, 43, 255
MAX_CNAME_CHAIN = 16  # CONFORMANCE.md A8: in-zone CNAME hops per query
WILD = b"\x01*"
SYNTH_SOA = "{apex} hostmaster.{apex} 1 3600 600 86400 60"  # rdata of an inline zone's SOA


class ZoneError(DnsProxyError):
    """A zone cannot be loaded; the message names the file (and line) or the record."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key  # the option at fault: "files", "records" or "origin"


@attrs.frozen
class Lookup:
    """The outcome of a lookup: ``kind`` is "answer", "nodata", "nxdomain", "delegation"
    (the name is at or below a zone cut: not ours to answer) or "out" (the CNAME chain
    leaves the zone, or enters a delegation, at ``target``)."""

    kind: str
    answer: tuple[dns.rrset.RRset, ...] = ()
    authority: tuple[dns.rrset.RRset, ...] = ()
    additional: tuple[dns.rrset.RRset, ...] = ()
    target: dns.name.Name | None = None


@attrs.frozen(eq=False)
class Zone:
    """One zone, indexed for lookups."""

    origin: dns.name.Name
    key: bytes
    source: str  # where it came from, for logs and `dnsproxy check`
    nodes: dict[bytes, dict[int, dns.rrset.RRset]]  # by owner key, then type
    names: frozenset[bytes]  # every name that exists: nodes and empty non-terminals
    cuts: frozenset[bytes]  # delegation points (NS below the apex)
    soa: dns.rrset.RRset
    negative: dns.rrset.RRset  # the SOA with the negative TTL (RFC 2308 §3)
    records: int

    @classmethod
    def build(cls, zone: dns.zone.Zone, source: str) -> Zone:
        origin = zone.origin
        assert origin is not None
        key = origin.to_wire().lower()
        nodes: dict[bytes, dict[int, dns.rrset.RRset]] = {}
        records = 0
        for name, node in zone.nodes.items():
            owner = name if name.is_absolute() else name.derelativize(origin)
            found = nodes.setdefault(owner.to_wire().lower(), {})
            for rdataset in node.rdatasets:
                rrset = dns.rrset.RRset(owner, rdataset.rdclass, rdataset.rdtype, rdataset.covers)
                rrset.update(rdataset)
                found[rdataset.rdtype] = rrset
                records += len(rdataset)
        names = set()
        for owner in nodes:
            for parent in wire.parents(owner):
                names.add(parent)
                if parent == key:
                    break
        cuts = frozenset(k for k, types in nodes.items() if NS in types and k != key)
        soa = nodes[key][SOA]
        negative = dns.rrset.RRset(origin, soa.rdclass, SOA)
        negative.update(soa)
        negative.ttl = min(soa.ttl, soa[0].minimum)
        return cls(origin, key, source, nodes, frozenset(names), cuts, soa, negative, records)

    def lookup(self, qname: dns.name.Name, qkey: bytes, qtype: int) -> Lookup:
        """Answer ``qname``/``qtype`` from this zone (RFC 1034 §4.3.2, RFC 4592 wildcards)."""
        chain: list[dns.rrset.RRset] = []
        name, key = qname, qkey
        seen = {key}
        for _ in range(MAX_CNAME_CHAIN + 1):
            if self._below_cut(key, qtype):
                if not chain:
                    return Lookup("delegation")
                return Lookup("out", tuple(chain), target=name)
            node = self.nodes.get(key)
            if node is None:
                if key in self.names:  # an empty non-terminal: it exists, with no data
                    return self._negative("nodata", chain)
                node = self._wildcard(key)
                if node is None:
                    return self._negative("nxdomain", chain)
            cname = node.get(CNAME)
            if cname is not None and qtype != CNAME:
                chain.append(_owned(cname, name))
                name = cname[0].target
                key = name.to_wire().lower()
                if not _under(key, self.key):
                    return Lookup("out", tuple(chain), target=name)
                if key in seen:  # a loop inside the zone: the chain so far, as nsd does
                    return Lookup("answer", tuple(chain))
                seen.add(key)
                continue
            if qtype == ANY:
                found = list(node.values())
            else:
                rrset = node.get(qtype)
                found = [rrset] if rrset is not None else []
            if not found:
                return self._negative("nodata", chain)
            answer = chain + [_owned(r, name) for r in found]
            return Lookup("answer", tuple(answer), additional=self._additional(answer))
        return Lookup("answer", tuple(chain))

    def _below_cut(self, key: bytes, qtype: int) -> bool:
        """Whether ``key`` is at or below a delegation (DS at the cut is the parent's)."""
        if not self.cuts:
            return False
        for parent in wire.parents(key):
            if parent == self.key:
                return False
            if parent in self.cuts and not (parent == key and qtype == DS):
                return True
        return False

    def _wildcard(self, key: bytes) -> dict[int, dns.rrset.RRset] | None:
        """The wildcard node that covers a name that does not exist (RFC 4592 §3.3.1):
        ``*.`` under its closest encloser, which may be an empty non-terminal."""
        for parent in wire.parents(key):
            if parent in self.names:
                return self.nodes.get(WILD + parent)
        return None

    def _negative(self, kind: str, chain: list[dns.rrset.RRset]) -> Lookup:
        return Lookup(kind, tuple(chain), (self.negative,))

    def _additional(self, answer: Iterable[dns.rrset.RRset]) -> tuple[dns.rrset.RRset, ...]:
        """A/AAAA of the MX, SRV and NS targets in this zone (glue included)."""
        out: dict[tuple[bytes, int], dns.rrset.RRset] = {}
        for rrset in answer:
            if rrset.rdtype == MX:
                targets = [rd.exchange for rd in rrset]
            elif rrset.rdtype in (SRV, NS):
                targets = [rd.target for rd in rrset]
            else:
                continue
            for target in targets:
                node = self.nodes.get(target.to_wire().lower())
                if node is None:
                    continue
                for rdtype in (A, AAAA):
                    found = node.get(rdtype)
                    if found is not None:
                        out.setdefault((target.to_wire().lower(), rdtype), found)
        return tuple(out.values())

    def transfer(self) -> list[dns.rrset.RRset]:
        """The zone as an AXFR answer: SOA, every other RRset, SOA (RFC 5936 §2.2)."""
        rest = [r for types in self.nodes.values() for t, r in types.items() if t != SOA]
        return [self.soa, *rest, self.soa]


def _under(key: bytes, zone_key: bytes) -> bool:
    return key == zone_key or (key.endswith(zone_key) and _at_label(key, len(key) - len(zone_key)))


def _at_label(key: bytes, off: int) -> bool:
    """Whether ``off`` is a label boundary of the wire name ``key``."""
    pos = 0
    while pos < off:
        pos += key[pos] + 1
    return pos == off


def _owned(rrset: dns.rrset.RRset, owner: dns.name.Name) -> dns.rrset.RRset:
    """``rrset`` under ``owner`` (a wildcard's synthesised name), or itself if it is its own."""
    if rrset.name == owner:
        return rrset
    out = dns.rrset.RRset(owner, rrset.rdclass, rrset.rdtype, rrset.covers)
    out.update(rrset)
    return out


@attrs.frozen
class Limits:
    max_size: int
    max_records: int


def load_file(path: Path, origin: dns.name.Name | None, limits: Limits) -> dns.zone.Zone:
    """Parse a zone file; the origin is ``$ORIGIN``, else ``origin``, else the SOA's owner."""
    try:
        size = path.stat().st_size
        if size > limits.max_size:
            raise ZoneError("files", f"{path}: {size} bytes, over max_size = {limits.max_size}")
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise ZoneError("files", f"{path}: {exc.strerror or exc}") from exc
    try:
        if origin is None and "$ORIGIN" not in text.upper():
            origin = _soa_owner(text)
        return dns.zone.from_text(text, origin, relativize=False, filename=str(path))
    except dns.zone.UnknownOrigin as exc:
        raise ZoneError("files", f"{path}: no $ORIGIN or SOA; set 'origin'") from exc
    except dns.exception.SyntaxError as exc:
        raise ZoneError("files", str(exc)) from exc
    except (dns.exception.DNSException, ValueError) as exc:
        raise ZoneError("files", f"{path}: {exc}") from exc


def _soa_owner(text: str) -> dns.name.Name | None:
    """The owner of the first SOA line, for a file with absolute names and no ``$ORIGIN``
    (the real parse then checks the whole file)."""
    for line in text.splitlines():
        tokens = line.partition(";")[0].split()
        if "SOA" in (t.upper() for t in tokens[1:4]) and tokens[0].endswith("."):
            try:
                return dns.name.from_text(tokens[0])
            except dns.exception.DNSException:
                return None
    return None


def parse_records(
    lines: Iterable[str], origin: dns.name.Name | None, ttl: int
) -> list[dns.rrset.RRset]:
    """Inline records, one RR in zone-file syntax each (TTL and class optional); names are
    relative to ``origin``, and must be absolute without one."""
    out = []
    for i, line in enumerate(lines):
        where = f"records[{i}] {line!r}"
        owner = line.split(maxsplit=1)[0] if line.strip() else ""
        if origin is None and not owner.endswith("."):
            raise ZoneError("records", f"{where}: relative name; set 'origin'")
        try:
            # Without an origin the owner serves as one (a SOA must be at the origin).
            base = origin or dns.name.from_text(owner)
            found = dns.zonefile.read_rrsets(line, origin=base, relativize=False, default_ttl=ttl)
        except (dns.exception.DNSException, ValueError) as exc:
            detail = str(exc).removeprefix("<input>:1: ")
            raise ZoneError("records", f"{where}: {detail}") from exc
        if not found:  # dnspython leaves out a name outside the origin
            raise ZoneError("records", f"{where}: outside the zone {origin}")
        out.extend(found)
    return out


def inline_apex(rrsets: list[dns.rrset.RRset], origin: dns.name.Name | None) -> dns.name.Name:
    """The apex of inline records: ``origin``, else the owner of a SOA among them, else the
    closest name enclosing the parents of every owner (``api.dev.test.`` alone, or with
    ``_http._tcp.dev.test.``, gives ``dev.test.``)."""
    if origin is not None:
        return origin
    soa = next((r.name for r in rrsets if r.rdtype == SOA), None)
    if soa is not None:
        return soa
    if any(r.name == dns.name.root for r in rrsets):
        raise ZoneError("records", "a record at the root needs 'origin'")
    apex = rrsets[0].name.parent()
    for rrset in rrsets[1:]:
        while not rrset.name.is_subdomain(apex):
            apex = apex.parent()
    if apex == dns.name.root:
        raise ZoneError("records", "the records share no zone but the root; set 'origin'")
    return apex


def add_records(
    zone: dns.zone.Zone | None, apex: dns.name.Name, rrsets: list[dns.rrset.RRset], ttl: int
) -> dns.zone.Zone:
    """Add inline records to the file zone at ``apex``, or to a new zone with a synthesised
    SOA when no file has that origin."""
    if zone is None:
        zone = dns.zone.Zone(apex, relativize=False)
        soa = dns.rrset.from_text(apex, ttl, "IN", "SOA", SYNTH_SOA.format(apex=apex.to_text()))
        rrsets = [soa] + [r for r in rrsets if r.rdtype != SOA or r.name != apex]
    for rrset in rrsets:
        if not rrset.name.is_subdomain(apex):
            raise ZoneError("records", f"{rrset.name} is outside the zone {apex}")
        node = zone.find_node(rrset.name, create=True)
        rdataset = node.find_rdataset(rrset.rdclass, rrset.rdtype, rrset.covers, create=True)
        rdataset.update(rrset)
    return zone


def check_zone(zone: dns.zone.Zone, source: str, limits: Limits, total: int) -> Zone:
    """Check a parsed zone has a SOA at its apex, and index it within ``max_records``."""
    origin = zone.origin
    apex = zone.get_node(origin) if origin is not None else None
    if apex is None or apex.get_rdataset(dns.rdataclass.IN, SOA) is None:
        key = "records" if source == "records" else "files"
        raise ZoneError(key, f"{source}: no SOA at the zone's origin {origin}")
    built = Zone.build(zone, source)
    if total + built.records > limits.max_records:
        raise ZoneError("files", f"more than max_records = {limits.max_records} records")
    return built
