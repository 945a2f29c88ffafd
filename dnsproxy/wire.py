"""The wire view: a bounds-checked read of a query's header, question and EDNS OPT.

Most queries are one question plus at most one OPT record. For those, this module reads
exactly what the chain needs without building a dnspython message, which is what keeps a
cache hit or a blocked answer cheap (DESIGN.md §3). Anything unusual (compression in the
question, extra records, several questions) falls back to a full dnspython parse, which
either produces the same `Query` or rejects the message with the right rcode.

Names are carried in wire form. ``Query.key`` is the lower-cased wire name: its parent
names are simply its suffixes at label boundaries (see `parents`), so suffix lookups in
hosts tables, blocklists and zone scopes are dictionary hits on byte slices.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dnsproxy.errors import Drop, Reject  # re-exported: parse_query raises them

HEADER = struct.Struct("!HHHHHH")
U16 = struct.Struct("!H")
RR_FIXED = struct.Struct("!HHIH")  # type, class, ttl, rdlength
QTYPE_CLASS = struct.Struct("!HH")

# Header flag bits.
QR = 0x8000
AA = 0x0400
TC = 0x0200
RD = 0x0100
RA = 0x0080
AD = 0x0020
CD = 0x0010

# Rcodes used by the proxy itself.
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16

# Record types as plain ints (an IntEnum member costs more to compare on the hot path).
A = int(dns.rdatatype.A)
NS = int(dns.rdatatype.NS)
CNAME = int(dns.rdatatype.CNAME)
SOA = int(dns.rdatatype.SOA)
PTR = int(dns.rdatatype.PTR)
HINFO = int(dns.rdatatype.HINFO)
AAAA = int(dns.rdatatype.AAAA)
DNAME = int(dns.rdatatype.DNAME)
OPT = int(dns.rdatatype.OPT)
RRSIG = int(dns.rdatatype.RRSIG)
NSEC = int(dns.rdatatype.NSEC)
NSEC3 = int(dns.rdatatype.NSEC3)
ANY = int(dns.rdatatype.ANY)
CLASS_ANY = int(dns.rdataclass.ANY)

EDNS_DO = 0x8000
EDE_OPTION = 15
COOKIE_OPTION = 10
PADDING_OPTION = 12  # RFC 7830
MAX_EDNS_OPTIONS = 64  # bounded parsing of hostile option lists (Unbound CVE-2026-41292)


class Query:
    """One client query as the chain sees it.

    Attributes are read directly on the hot path, hence a plain slotted class. Plugins
    may attach facts for observers with `note`; the trace (``dnsproxy query``) is a list
    that steps append to only when it is not None.
    """

    __slots__ = (
        "_name",
        "cd",
        "client",
        "client_id",
        "data",
        "do",
        "edns",
        "edns_options",
        "flags",
        "id",
        "key",
        "notes",
        "qclass",
        "qend",
        "qname",
        "qtype",
        "received",
        "trace",
        "transport",
        "udp_size",
        "who",
    )

    def __init__(
        self,
        data: bytes,
        msg_id: int,
        flags: int,
        qname: bytes,
        qtype: int,
        qclass: int,
        qend: int,
        client: tuple[str, int],
        transport: str,
    ) -> None:
        self.data = data
        self.id = msg_id
        self.flags = flags
        self.qname = qname
        self.key = qname.lower()
        self.qtype = qtype
        self.qclass = qclass
        self.qend = qend
        self.client = client
        self.client_id: str | None = None  # a DoT/DoH client identifier, set by the listener
        self.transport = transport
        self.cd = bool(flags & CD)
        self.edns = False
        self.udp_size = 512
        self.do = False
        self.edns_options: tuple[tuple[int, bytes], ...] = ()
        self.notes: dict[str, Any] | None = None
        self.trace: list[str] | None = None
        self.received = 0.0
        self._name: dns.name.Name | None = None
        self.who: Any = None  # the client's record (dnsproxy.clients), looked up on first use

    @property
    def question(self) -> bytes:
        """The question section exactly as the client sent it (case included)."""
        return self.qname + QTYPE_CLASS.pack(self.qtype, self.qclass)

    @property
    def name(self) -> dns.name.Name:
        """The query name as a dnspython Name (built on first use; case preserved)."""
        if self._name is None:
            self._name = dns.name.from_wire(self.qname, 0)[0]
        return self._name

    @property
    def text(self) -> str:
        """The lower-cased query name as text with the trailing dot ("example.org.")."""
        return self.name.to_text().lower()

    def derive(
        self, qname: bytes | None = None, qtype: int | None = None, *, own: bool = False
    ) -> Query:
        """This query asked again, for another name (wire form) or type.

        By default the new query is asked on the client's behalf (a step that renames the
        query or follows a CNAME target): same ID, flags, client, transport and EDNS (size,
        DO, options), and it shares the notes and trace, so what later steps record shows
        up for the client's query. ``own=True`` makes a query of the proxy's own (a cache
        refresh, after the client has its answer): ID 0, RD and the client's CD, EDNS
        without the client's options, transport "internal", its own notes and no trace.
        """
        if own:
            name = self.key if qname is None else qname
            msg_id, flags, options, transport = 0, RD | (self.flags & CD), (), "internal"
        else:
            name = self.qname if qname is None else qname
            msg_id, flags, options = self.id, self.flags, self.edns_options
            transport = self.transport
        header = HEADER.pack(msg_id, flags, 1, 0, 0, 1 if self.edns else 0)
        data = header + name + QTYPE_CLASS.pack(self.qtype if qtype is None else qtype, self.qclass)
        if self.edns:
            wanted = b"".join(edns_option(code, value) for code, value in options)
            data += opt_record(self.udp_size, self.do, wanted)
        derived = parse_query(data, self.client, transport)
        if not own:
            if self.notes is None:
                self.notes = {}
            derived.notes = self.notes
            derived.trace = self.trace
            derived.received = self.received
        derived.client_id = self.client_id  # the same client, for scopes by client name
        derived.who = self.who
        return derived

    def note(self, key: str, value: object) -> None:
        """Record a fact about this query for observers (query log, metrics, trace)."""
        if self.notes is None:
            self.notes = {}
        self.notes[key] = value

    def explain(self, line: str) -> None:
        """Add a line to the trace; a no-op unless the query is being traced."""
        if self.trace is not None:
            self.trace.append(line)

    def __repr__(self) -> str:
        qtype = dns.rdatatype.to_text(self.qtype)
        return f"<Query {self.id} {self.text} {qtype} from {self.client[0]}>"


def parse_query(data: bytes, client: tuple[str, int], transport: str) -> Query:
    """Read a client query, or raise `Drop` / `Reject` per the error policy.

    Fast path: QDCOUNT=1, no answer/authority records, at most one additional record
    (which must be the OPT), and an uncompressed question.
    """
    if len(data) < 12:
        raise Drop("short")
    msg_id, flags, qd, an, ns, ar = HEADER.unpack_from(data)
    if flags & QR:
        raise Drop("response")
    if (flags >> 11) & 0xF != 0:
        raise Reject(NOTIMP, msg_id, flags, _readable(data, client, transport))
    if qd != 1 or an or ns > 1:
        raise Reject(FORMERR, msg_id, flags)  # RFC 9619: decided before decoding any name
    if ar > 1 or ns:  # an authority record: only the SOA of an IXFR query (RFC 1995 §3)
        return _parse_slow(data, client, transport, msg_id, flags)
    end = len(data)
    off = 12
    try:  # the labels, up to the root or anything else (an IndexError: past the end)
        length = data[12]
        while 0 < length < 64:
            off += length + 1
            length = data[off]
    except IndexError:
        raise Reject(FORMERR, msg_id, flags) from None
    if length:
        if length & 0xC0 == 0xC0:  # compression in a question: legal, unusual
            if off + 1 >= end or ((length & 0x3F) << 8 | data[off + 1]) < 12:
                raise Reject(FORMERR, msg_id, flags)  # a pointer into the header
            return _parse_slow(data, client, transport, msg_id, flags)
        raise Reject(FORMERR, msg_id, flags)
    off += 1
    if off - 12 > 255 or off + 4 > end:
        raise Reject(FORMERR, msg_id, flags)
    qtype, qclass = QTYPE_CLASS.unpack_from(data, off)
    query = Query(data, msg_id, flags, data[12:off], qtype, qclass, off + 4, client, transport)
    if ar:
        off += 4
        # The usual OPT: root-owned, version 0, no options, last in the message.
        if end == off + 11 and data[off] == 0:
            rtype, size, ttl, rdlen = RR_FIXED.unpack_from(data, off + 1)
            if rtype == OPT and rdlen == 0 and not ttl & 0xFF0000:
                query.edns = True
                query.udp_size = size if size > 512 else 512
                query.do = bool(ttl & EDNS_DO)
                return query
        if not _read_opt(query, off):
            return _parse_slow(data, client, transport, msg_id, flags)
    return query


def _readable(data: bytes, client: tuple[str, int], transport: str) -> Query | None:
    """The question and OPT of a message with another opcode, when they read as a query.

    Lets NOTIMP echo the question and carry an OPT to an EDNS client (RFC 6891 §6.1.1).
    """
    as_query = bytearray(data)
    as_query[2] &= 0x87  # opcode 0
    try:
        return parse_query(bytes(as_query), client, transport)
    except Reject as exc:
        return exc.query
    except Drop:
        return None


def _read_opt(query: Query, off: int) -> bool:
    """Read a root-owned OPT at ``off``; False if the record is something else."""
    data = query.data
    if off + 11 > len(data) or data[off] != 0:
        return False
    rtype, size, ttl, rdlen = RR_FIXED.unpack_from(data, off + 1)
    if rtype != OPT:
        return False
    rdata_off = off + 11
    if rdata_off + rdlen > len(data):
        raise Reject(FORMERR, query.id, query.flags, query)
    _apply_opt(query, size, ttl, data[rdata_off : rdata_off + rdlen])
    return True


def _apply_opt(query: Query, size: int, ttl: int, rdata: bytes) -> None:
    query.edns = True
    query.udp_size = max(512, size)
    query.do = bool(ttl & EDNS_DO)
    options = []
    pos = 0
    while pos < len(rdata):
        if pos + 4 > len(rdata) or len(options) >= MAX_EDNS_OPTIONS:
            raise Reject(FORMERR, query.id, query.flags, query)
        code, olen = struct.unpack_from("!HH", rdata, pos)
        pos += 4
        if pos + olen > len(rdata):
            raise Reject(FORMERR, query.id, query.flags, query)
        if code == COOKIE_OPTION and not _cookie_length_ok(olen):
            raise Reject(FORMERR, query.id, query.flags, query)
        options.append((code, rdata[pos : pos + olen]))
        pos += olen
    query.edns_options = tuple(options)
    if (ttl >> 16) & 0xFF != 0:  # EDNS version > 0
        raise Reject(BADVERS, query.id, query.flags, query)


def _cookie_length_ok(length: int) -> bool:
    """A COOKIE option is a client cookie (8) or client plus server cookie (16-40 octets);
    anything else is FORMERR (RFC 7873 §5.2.2)."""
    return length == 8 or 16 <= length <= 40


def _ixfr_soa(question: dns.rrset.RRset, authority: list[dns.rrset.RRset]) -> bool:
    """Whether ``authority`` is what an IXFR query carries: the client's SOA of the zone
    asked for, one record (RFC 1995 §3)."""
    if question.rdtype != dns.rdatatype.IXFR or len(authority) != 1:
        return False
    soa = authority[0]
    return soa.rdtype == dns.rdatatype.SOA and soa.name == question.name and len(soa) == 1


def _parse_slow(
    data: bytes, client: tuple[str, int], transport: str, msg_id: int, flags: int
) -> Query:
    try:
        msg = dns.message.from_wire(data, ignore_trailing=True)
    except dns.message.BadEDNS as exc:
        raise Reject(FORMERR, msg_id, flags) from exc
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise Reject(FORMERR, msg_id, flags) from exc
    if len(msg.question) != 1 or msg.answer:
        raise Reject(FORMERR, msg_id, flags)
    rrset = msg.question[0]
    if msg.authority and not _ixfr_soa(rrset, msg.authority):
        raise Reject(FORMERR, msg_id, flags)
    qname = rrset.name.to_wire()
    query = Query(data, msg_id, flags, qname, rrset.rdtype, rrset.rdclass, 0, client, transport)
    if msg.edns >= 0:
        query.edns = True
        query.udp_size = max(512, msg.payload)
        query.do = bool(msg.ednsflags & EDNS_DO)
        query.edns_options = tuple((o.otype, o.to_wire() or b"") for o in msg.options)
        if msg.edns > 0:
            raise Reject(BADVERS, msg_id, flags, query)
    return query


# --- helpers over wire names and records -------------------------------------------------


def parents(key: bytes) -> Iterator[bytes]:
    """Yield a wire name and each of its parents, ending with the root (b"\\x00")."""
    off = 0
    while True:
        yield key[off:] if off else key
        length = key[off]
        if length == 0:
            return
        off += length + 1


def name_to_key(name: str | dns.name.Name) -> bytes:
    """Convert a domain name (text or Name) to the lower-cased wire form used as a key."""
    if isinstance(name, str):
        name = dns.name.from_text(name)
    return name.to_wire().lower()


_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-_"


def key_to_text(key: bytes, *, final_dot: bool = False) -> str:
    """The text of a lower-cased wire name key ("." for the root), the inverse of
    `name_to_key`; without the final dot unless ``final_dot``.

    Host-name labels are joined directly (this runs per query for pattern rules and the
    query log); any other byte goes through dnspython, which escapes it as zone files do.
    """
    labels = []
    off = 0
    while n := key[off]:
        label = key[off + 1 : off + 1 + n]
        if label.translate(None, _HOST_BYTES):
            return dns.name.from_wire(key, 0)[0].to_text(omit_final_dot=not final_dot)
        labels.append(label)
        off += n + 1
    if not labels:
        return "."
    text = b".".join(labels).decode("ascii")
    return text + "." if final_dot else text


def edns_option(code: int, data: bytes) -> bytes:
    """One EDNS option in wire form (RFC 6891 §6.1.2)."""
    return QTYPE_CLASS.pack(code, len(data)) + data


def opt_record(size: int, do: bool, options: bytes = b"", ext_rcode: int = 0) -> bytes:
    """A root-owned OPT record: UDP payload ``size``, the DO bit, ``options`` (wire form,
    see `edns_option`) and the upper eight bits of an extended rcode."""
    ttl = (ext_rcode << 24) | (EDNS_DO if do else 0)
    return b"\x00" + RR_FIXED.pack(OPT, size, ttl, len(options)) + options


def hostport(host: str, port: int, scheme: str = "") -> str:
    """An address as text: "host:port", IPv6 in brackets ("[::1]:53"), with ``scheme://``
    in front when one is given."""
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{scheme}://{text}" if scheme else text


def skip_name(wire: bytes, off: int) -> int:
    """Return the offset just past the (possibly compressed) name at ``off``.

    Raises ValueError on a name that runs off the end or uses reserved label types.
    """
    end = len(wire)
    while True:
        if off >= end:
            raise ValueError("name runs past the end")
        length = wire[off]
        if length == 0:
            return off + 1
        if length & 0xC0 == 0xC0:
            if off + 2 > end:
                raise ValueError("truncated pointer")
            return off + 2
        if length > 63:
            raise ValueError("reserved label type")
        off += length + 1


def read_name(wire: bytes, off: int) -> bytes:
    """The lower-cased, uncompressed wire name at ``off``: the one reader of names in
    messages.

    Pointers must point strictly backwards (RFC 9267 §2), so loops cannot occur; a name
    over 255 octets or running off the end raises ValueError. Runs between pointers are
    sliced whole, not label by label.
    """
    parts = []
    start = limit = off
    size = 0
    end = len(wire)
    while True:
        if off >= end:
            raise ValueError("name runs past the end")
        length = wire[off]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            if off + 1 >= end:
                raise ValueError("truncated pointer")
            target = ((length & 0x3F) << 8) | wire[off + 1]
            if target >= limit:
                raise ValueError("forward or looping compression pointer")
            parts.append(wire[start:off])
            off = start = limit = target
            continue
        if length > 63:
            raise ValueError("reserved label type")
        size += length + 1
        if size > 254:
            raise ValueError("name longer than 255 octets")
        off += length + 1
    if parts:
        parts.append(wire[start : off + 1])
        return b"".join(parts).lower()
    return wire[start : off + 1].lower()


class Record:
    """Where one resource record sits in a message (offsets, not copies)."""

    __slots__ = ("end", "name_off", "rclass", "rdata_off", "rdlen", "rtype", "section", "ttl_off")

    def __init__(
        self, section: int, name_off: int, rtype: int, rclass: int, ttl_off: int, rdlen: int
    ) -> None:
        self.section = section
        self.name_off = name_off
        self.rtype = rtype
        self.rclass = rclass
        self.ttl_off = ttl_off
        self.rdata_off = ttl_off + 6
        self.rdlen = rdlen
        self.end = self.rdata_off + rdlen


def records(wire: bytes) -> tuple[int, list[Record]]:
    """Walk a whole message: (offset after the question section, its records in order).

    Sections are numbered 1 (answer), 2 (authority), 3 (additional). Every count and
    length is checked against the data; any overrun raises ValueError.
    """
    if len(wire) < 12:
        raise ValueError("short message")
    _, _, qd, an, ns, ar = HEADER.unpack_from(wire)
    off = 12
    for _ in range(qd):
        off = skip_name(wire, off) + 4
    if off > len(wire):
        raise ValueError("question past the end")
    qend = off
    out = []
    for section, count in ((1, an), (2, ns), (3, ar)):
        for _ in range(count):
            name_off = off
            off = skip_name(wire, off)
            if off + 10 > len(wire):
                raise ValueError("record header past the end")
            rtype, rclass, _ttl, rdlen = RR_FIXED.unpack_from(wire, off)
            rec = Record(section, name_off, rtype, rclass, off + 4, rdlen)
            if rec.end > len(wire):
                raise ValueError("rdata past the end")
            out.append(rec)
            off = rec.end
    return qend, out


def strip_opt(wire: bytes) -> tuple[bytes, list[Record], int]:
    """Remove OPT records from a response (OPT is hop-by-hop, RFC 6891 §6.1.1).

    Returns the message without them, the remaining records (offsets adjusted) and the
    whole rcode: the header's four bits plus the upper eight the OPT carries (BADVERS is
    16, so it would read as NOERROR once the OPT is gone). Bytes after the last counted
    record are dropped too: appending our own OPT behind them would make the reply
    unreadable.
    """
    qend, recs = records(wire)
    end = recs[-1].end if recs else qend
    if len(wire) > end:
        wire = wire[:end]
    opts = [r for r in recs if r.rtype == OPT]
    rcode = wire[3] & 0x0F
    if not opts:
        return wire, recs, rcode
    if any(r.section != 3 for r in opts):
        raise ValueError("OPT outside the additional section")
    rcode |= wire[opts[0].ttl_off] << 4
    if len(opts) == 1 and opts[0] is recs[-1]:  # the usual place: cut it off the end
        out = bytearray(wire[: opts[0].name_off])
        U16.pack_into(out, 10, U16.unpack_from(out, 10)[0] - 1)
        return bytes(out), recs[:-1], rcode
    parts = []
    pos = 0
    for r in opts:
        parts.append(wire[pos : r.name_off])
        pos = r.end
    parts.append(wire[pos:])
    out = bytearray(b"".join(parts))
    ar = U16.unpack_from(out, 10)[0] - len(opts)
    U16.pack_into(out, 10, ar)
    stripped = bytes(out)
    return stripped, records(stripped)[1], rcode
