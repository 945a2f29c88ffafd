"""What forward relays of an upstream's answer: the part that answers the question.

`trim` is the one entry: OPT removed (hop-by-hop), records of another class dropped and
top-bit TTLs zeroed (RFC 2181 §8), the answer cut to the CNAME chain from the query name
and, for negative answers, the SOA and NSEC/NSEC3 proof (RFC 2181 §5.4.1), AA cleared and
RA set. Its stages are public so tests can check that the fast paths agree with the
general one. `leaves_zones` finds where a scoped step's CNAME chain leaves its zones.
"""

from __future__ import annotations

import struct

import dns.exception
import dns.message
import dns.name
import dns.rrset

from dnsproxy import wire
from dnsproxy.reply import Reply
from dnsproxy.wire import ANY, CLASS_ANY, CNAME, DNAME, NSEC, NSEC3, RRSIG, SOA, Query

MAX_CNAME_CHAIN = 16  # CONFORMANCE.md A8: resolvers stop at 10-16 hops
DROPPED = 65535  # reserved type (RFC 6895): marks records of another class for removal
NEGATIVE_PROOF = (NSEC, NSEC3)
_HEAD = struct.Struct("!HHHH")  # ID, flags, QDCOUNT, ANCOUNT
_OWNED_RR = struct.Struct("!HHHIH")  # a record's owner as a pointer, type, class, TTL, length
_NOT_AA = ~wire.AA


def trim(data: bytes, q: Query) -> bytes:
    """An upstream's answer to ``q`` (matched, so the question is the client's) as forward
    relays it; an extended rcode (BADVERS and the like: EDNS trouble) becomes FORMERR.

    Raises ValueError on a malformed message.
    """
    body = direct_answer(data, q)
    if body is not None:
        return body
    body, recs, rcode = wire.strip_opt(data)
    body, recs = scrub(body, recs, q)
    body = relayed(minimal(body, recs, q))
    if rcode > 15:
        body = body[:3] + bytes([(body[3] & 0xF0) | wire.FORMERR]) + body[4:]
    return body


def relayed(body: bytes) -> bytes:
    """The header of an answer we relay: AA cleared (a proxy is not the authority for the
    name) and RA set (we offer recursion, as every answer we make ourselves says)."""
    b2, b3 = body[2] & ~(wire.AA >> 8), body[3] | wire.RA
    if b2 == body[2] and b3 == body[3]:
        return body
    return body[:2] + bytes((b2, b3)) + body[4:]


def scrub(body: bytes, recs: list[wire.Record], q: Query) -> tuple[bytes, list[wire.Record]]:
    """Records of another class than the question's dropped (all sections), and TTLs with
    the top bit set made 0 (RFC 2181 §8), before anything reads or caches them."""
    qclass = q.qclass
    high = [r for r in recs if body[r.ttl_off] & 0x80]
    foreign = [] if qclass == CLASS_ANY else [r for r in recs if r.rclass != qclass]
    if not high and not foreign:
        return body, recs
    out = bytearray(body)
    for r in high:
        out[r.ttl_off : r.ttl_off + 4] = bytes(4)
    if not foreign:
        return bytes(out), recs
    for r in foreign:  # parsed as opaque data of a reserved type, then left out
        struct.pack_into("!HH", out, r.ttl_off - 4, DROPPED, qclass)
    try:
        msg = dns.message.from_wire(bytes(out))
    except (dns.exception.DNSException, ValueError, IndexError, struct.error) as exc:
        raise ValueError(str(exc)) from exc
    for section in (msg.answer, msg.authority, msg.additional):
        section[:] = [rrset for rrset in section if rrset.rdtype != DROPPED]
    body = msg.to_wire(want_shuffle=False)
    return body, wire.records(body)[1]


def in_zones(name: dns.name.Name, zones: frozenset[bytes]) -> bool:
    return any(p in zones for p in wire.parents(name.to_wire().lower()))


def leaves_zones(
    reply: Reply, q: Query, zones: frozenset[bytes]
) -> tuple[list[dns.rrset.RRset], dns.name.Name] | None:
    """Where the CNAME chain of a scoped upstream's answer leaves its zones: the records
    it may speak for (the chain up to the exit, with their RRSIGs) and the target outside.
    None when the chain stays inside (the common case, decided without a parse)."""
    if not any(r.section == 1 and r.rtype == CNAME for r in reply.records()):
        return None
    try:
        msg = reply.message()
    except (dns.exception.DNSException, ValueError):
        return None
    chain = [q.name]
    for _ in range(MAX_CNAME_CHAIN):
        rrset = next((r for r in msg.answer if r.rdtype == CNAME and r.name == chain[-1]), None)
        if rrset is None:
            return None
        target = rrset[0].target
        if not in_zones(target, zones):
            names = set(chain)
            kept = [r for r in msg.answer if r.name in names and CNAME in (r.rdtype, r.covers)]
            return kept, target
        if target in chain:
            return None
        chain.append(target)
    return None


def direct_answer(data: bytes, q: Query) -> bytes | None:
    """The common answer in one pass: NOERROR, and answer records all owned by the question
    name (a pointer to it) and of the asked type. Returns them alone, cutting authority and
    additional records unread (there is no extended rcode to find: errors have no answers);
    None for anything else, which `minimal` then handles.
    """
    msg_id, flags, _, an = _HEAD.unpack_from(data)
    if not an or flags & 0x0F:
        return None
    off = 16 + len(q.qname)  # `matches` checked the question is exactly the client's
    unpack, qtype, qclass = _OWNED_RR.unpack_from, q.qtype, q.qclass
    try:
        for _ in range(an):
            pointer, rtype, rclass, ttl, rdlen = unpack(data, off)
            if pointer != 0xC00C or rtype != qtype or rclass != qclass or ttl & 0x8000_0000:
                return None  # another owner, type or class, or a TTL to clear: `minimal`, `scrub`
            off += 12 + rdlen
    except struct.error:  # a record's fixed part past the end
        return None
    if off > len(data):
        return None
    return wire.HEADER.pack(msg_id, flags & _NOT_AA | wire.RA, 1, an, 0, 0) + data[12:off]


def _keep(body: bytes, recs: list[wire.Record], q: Query) -> list[int] | None:
    """Indexes of the records `minimal` keeps, found at wire level (None: let dnspython do it)."""
    owners = [wire.read_name(body, r.name_off) for r in recs]
    chain = [q.key]
    for _ in range(MAX_CNAME_CHAIN):
        for r, owner in zip(recs, owners, strict=True):
            if r.section == 1 and r.rtype == CNAME and owner == chain[-1]:
                target = wire.read_name(body, r.rdata_off)
                break
        else:
            break
        if target in chain:
            break
        chain.append(target)
    names = set(chain)
    final = chain[-1]
    keep = []
    answered = False
    for i, (r, owner) in enumerate(zip(recs, owners, strict=True)):
        if r.section != 1:
            continue
        if r.rtype == DNAME:
            return None  # rare: let dnspython sort out DNAME synthesis
        covered = r.rtype
        if r.rtype == RRSIG and r.rdlen >= 2:
            covered = struct.unpack_from("!H", body, r.rdata_off)[0]
        if owner in names and (covered in (q.qtype, CNAME) or q.qtype == ANY):
            keep.append(i)
            answered = answered or (owner == final and r.rtype == q.qtype)
    if not answered:
        parents = set(wire.parents(final))
        for i, (r, owner) in enumerate(zip(recs, owners, strict=True)):
            if r.section != 2:
                continue
            covered = r.rtype
            if r.rtype == RRSIG and r.rdlen >= 2:
                covered = struct.unpack_from("!H", body, r.rdata_off)[0]
            if covered in NEGATIVE_PROOF or (covered == SOA and owner in parents):
                keep.append(i)
    return keep


def minimal(body: bytes, recs: list[wire.Record], q: Query) -> bytes:
    """Keep only what answers the question (RFC 2181 §5.4.1; CONFORMANCE.md C2).

    That is the CNAME/DNAME chain from the query name with the records of the asked type at
    its end (and their RRSIGs), plus, for negative answers, the SOA and the NSEC/NSEC3
    proof. Unsolicited NS, glue and records about other names are dropped, so they can
    neither reach the client nor poison a cache. Answers that are already minimal (every
    answer record owned by the question name and of its type, nothing else) are returned
    without a parse.
    """
    direct = 0  # leading answer records owned by the question name, of the asked type
    for r in recs:
        if r.section != 1 or r.rtype != q.qtype or body[r.name_off : r.name_off + 2] != b"\xc0\x0c":
            break
        direct += 1
    if direct == len(recs):
        return body
    if direct and recs[direct].section != 1:  # a plain answer plus NS/glue: cut the rest
        end = recs[direct - 1].end
        return body[:6] + struct.pack("!HHH", direct, 0, 0) + body[12:end]
    keep = _keep(body, recs, q)
    if keep is not None:
        if len(keep) == len(recs):
            return body
        if keep == list(range(len(keep))):  # a prefix: cut the rest, pointers stay valid
            counts = [0, 0, 0]
            for r in recs[: len(keep)]:
                counts[r.section - 1] += 1
            cut = recs[len(keep) - 1].end if keep else wire.records(body)[0]
            return body[:6] + struct.pack("!HHH", *counts) + body[12:cut]
    try:
        msg = dns.message.from_wire(body)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise ValueError(str(exc)) from exc
    name = q.name
    chain = [name]
    for _ in range(MAX_CNAME_CHAIN):
        target = None
        for rrset in msg.answer:
            if rrset.rdtype == CNAME and rrset.name == chain[-1]:
                target = rrset[0].target
                break
        if target is None or target in chain:
            break
        chain.append(target)
    names = set(chain)
    final = chain[-1]
    answer = []
    for rrset in msg.answer:
        covered = rrset.covers if rrset.rdtype == RRSIG else rrset.rdtype
        if rrset.name in names:
            keep = covered in (q.qtype, CNAME) or q.qtype == ANY
        else:
            keep = covered == DNAME and any(n.is_subdomain(rrset.name) for n in names)
        if keep:
            answer.append(rrset)
    answered = any(r.name == final and r.rdtype == q.qtype for r in answer)
    authority = []
    if not answered:
        for rrset in msg.authority:
            covered = rrset.covers if rrset.rdtype == RRSIG else rrset.rdtype
            soa = covered == SOA and final.is_subdomain(rrset.name)
            if soa or covered in NEGATIVE_PROOF:
                authority.append(rrset)
    unchanged = len(answer) == len(msg.answer) and len(authority) == len(msg.authority)
    if unchanged and not msg.additional:
        return body
    msg.answer = answer
    msg.authority = authority
    msg.additional = []
    return msg.to_wire()
