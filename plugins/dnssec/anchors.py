"""Trust anchors: DS or DNSKEY records from zone-file text or RFC 7958 XML files."""

from __future__ import annotations

import datetime
import importlib.resources
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import attrs
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.zonefile
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS

from dnsproxy.errors import DnsProxyError

ROOT_ANCHORS = "root-anchors.xml"  # package data: the IANA root KSKs


@attrs.frozen
class Anchor:
    """What is trusted for one zone: DS digests and/or DNSKEYs, as configured."""

    zone: dns.name.Name
    ds: tuple[DS, ...] = ()
    keys: tuple[DNSKEY, ...] = ()


class AnchorError(DnsProxyError, ValueError):
    """A trust anchor file that cannot be read or holds no DS/DNSKEY record."""


def load(
    paths: Iterable[Path], now: datetime.datetime | None = None
) -> dict[dns.name.Name, Anchor]:
    """The anchors in ``paths`` by zone; the shipped IANA root anchors when none are given."""
    found: dict[dns.name.Name, tuple[list[DS], list[DNSKEY]]] = {}
    paths = list(paths)
    if paths:
        for path in paths:
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise AnchorError(f"{path}: {exc}") from exc
            records = _parse(text, now, str(path))
            if not records:
                raise AnchorError(f"{path}: no DS or DNSKEY record")
            _add(found, records)
    else:
        data = importlib.resources.files(__package__).joinpath(ROOT_ANCHORS).read_text()
        _add(found, _parse(data, now, ROOT_ANCHORS))
    return {zone: Anchor(zone, tuple(ds), tuple(keys)) for zone, (ds, keys) in found.items()}


def _add(
    found: dict[dns.name.Name, tuple[list[DS], list[DNSKEY]]],
    records: list[tuple[dns.name.Name, dns.rdata.Rdata]],
) -> None:
    for name, rd in records:
        ds, keys = found.setdefault(name, ([], []))
        if isinstance(rd, DS):
            ds.append(rd)
        elif isinstance(rd, DNSKEY):
            keys.append(rd)


def _parse(
    text: str, now: datetime.datetime | None, where: str
) -> list[tuple[dns.name.Name, dns.rdata.Rdata]]:
    if text.lstrip().startswith("<"):
        return _parse_xml(text, now or datetime.datetime.now(datetime.UTC), where)
    try:
        rrsets = dns.zonefile.read_rrsets(
            text, rdclass=None, default_ttl=3600, origin=dns.name.root, relativize=False
        )
    except dns.exception.DNSException as exc:
        raise AnchorError(f"{where}: {exc}") from exc
    return [
        (rrset.name, rd)
        for rrset in rrsets
        if rrset.rdtype in (dns.rdatatype.DS, dns.rdatatype.DNSKEY)
        for rd in rrset
    ]


def _parse_xml(
    text: str, now: datetime.datetime, where: str
) -> list[tuple[dns.name.Name, dns.rdata.Rdata]]:
    """RFC 7958: the KeyDigest elements valid at ``now`` become DS records."""
    try:
        root = ET.fromstring(text)
        zone = dns.name.from_text((root.findtext("Zone") or "").strip() or ".")
        out: list[tuple[dns.name.Name, dns.rdata.Rdata]] = []
        for kd in root.iter("KeyDigest"):
            start = _time(kd.get("validFrom"))
            until = _time(kd.get("validUntil"))
            if (start is not None and now < start) or (until is not None and now >= until):
                continue
            fields = [kd.findtext(tag, "").strip() for tag in ("KeyTag", "Algorithm", "DigestType")]
            digest = kd.findtext("Digest", "").strip()
            rd = dns.rdata.from_text("IN", "DS", " ".join([*fields, digest]))
            out.append((zone, rd))
    except (ET.ParseError, ValueError, dns.exception.DNSException) as exc:
        raise AnchorError(f"{where}: {exc}") from exc
    return out


def _time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    t = datetime.datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=datetime.UTC)
