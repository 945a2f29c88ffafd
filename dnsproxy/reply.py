"""Responses: what steps return, and how a response is fitted to the client that asked.

A `Reply` is a DNS message in wire form *without* an OPT record: OPT is hop-by-hop
(RFC 6891 §6.1.1), so the proxy never stores or forwards one. `finalize` turns a Reply
into the bytes for one client: its ID, its question bytes (case echoed byte for byte),
its RD/CD bits, a fresh OPT when it used EDNS (DO echoed, Extended DNS Errors added),
and the size limit of its transport, setting TC when the message does not fit.

Because a cached answer is just such wire bytes, a cache hit is a copy plus a few patches;
dnspython is used to build anything richer and to parse a reply only when a step asks.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import dns.message
import dns.rrset

from dnsproxy import wire
from dnsproxy.wire import AD, CD, HEADER, QR, RA, RD, TC, U16, Query, Reject, edns_option

EDE_TEXT_MAX = 80  # keeps a truncated reply's OPT small whatever a list is called

# EDE codes we use (RFC 8914 and the IANA registry).
EDE_OTHER = 0
EDE_STALE = 3
EDE_CACHED_ERROR = 13
EDE_BLOCKED = 15
EDE_CENSORED = 16
EDE_FILTERED = 17
EDE_PROHIBITED = 18
EDE_STALE_NXDOMAIN = 19
EDE_NO_REACHABLE_AUTHORITY = 22
EDE_NETWORK_ERROR = 23
EDE_SYNTHESIZED = 29
EDE_RATE_LIMITED = 31

Ede = tuple[int, str]

# EDE codes that say the answer is a policy's, not the name's (RFC 8914 §4.16-4.18): a
# reply carrying one counts as blocked unless its step says otherwise (`Reply.blocked`).
BLOCKING_EDE = frozenset((EDE_BLOCKED, EDE_CENSORED, EDE_FILTERED))


def blocking(ede: Sequence[Ede]) -> bool:
    """Whether ``ede`` holds a code of `BLOCKING_EDE`."""
    # A loop, not any() over a generator: a third of its cost for the usual single EDE.
    for code, _ in ede:  # noqa: SIM110
        if code in BLOCKING_EDE:
            return True
    return False


class Reply:
    """A response message without OPT, plus the Extended DNS Errors to attach.

    Treat a Reply as immutable: a step that changes a response returns a new one
    (`evolve`, `from_message`), so no one mutates a message someone else holds.
    ``cacheable = False`` marks an answer about this one query's path, not about the
    name (a forwarding loop), which no cache may keep and serve to others.
    ``blocked`` marks a policy's answer (a blocklist's, a plugin's), which statistics, the
    dashboard and the query log count as blocked; by default it is whether ``ede`` holds
    Blocked, Censored or Filtered (`BLOCKING_EDE`), so a step either attaches one of those
    or passes ``blocked=True``.
    """

    __slots__ = ("_message", "_records", "blocked", "cacheable", "ede", "source", "wire")

    def __init__(
        self,
        wire_: bytes,
        *,
        ede: Sequence[Ede] = (),
        source: str = "",
        cacheable: bool = True,
        blocked: bool | None = None,
    ) -> None:
        self.wire = wire_
        self.ede = tuple(ede)
        self.source = source
        self.cacheable = cacheable
        # One store whichever way (most replies carry no EDE: no call then).
        self.blocked = blocked if blocked is not None else blocking(self.ede) if self.ede else False
        self._message: dns.message.Message | None = None
        self._records: list[wire.Record] | None = None

    @classmethod
    def from_message(
        cls,
        msg: dns.message.Message,
        *,
        ede: Sequence[Ede] = (),
        source: str = "",
        blocked: bool | None = None,
    ) -> Reply:
        """Build from a dnspython message; its OPT, if any, is left out."""
        if msg.edns >= 0 or msg.tsig:
            msg = _without_opt(msg)
        return cls(msg.to_wire(), ede=ede, source=source, blocked=blocked)

    @property
    def rcode(self) -> int:
        return self.wire[3] & 0x0F

    @property
    def flags(self) -> int:
        return U16.unpack_from(self.wire, 2)[0]

    @property
    def ancount(self) -> int:
        return U16.unpack_from(self.wire, 6)[0]

    @property
    def truncated(self) -> bool:
        return bool(self.wire[2] & 0x02)

    def records(self) -> list[wire.Record]:
        """Where each record sits (walked once, then cached). Raises ValueError if malformed."""
        if self._records is None:
            self._records = wire.records(self.wire)[1]
        return self._records

    def message(self) -> dns.message.Message:
        """The reply parsed by dnspython (parsed once, then cached). Do not mutate it."""
        if self._message is None:
            self._message = dns.message.from_wire(self.wire)
        return self._message

    def evolve(
        self,
        *,
        wire_: bytes | None = None,
        ede: Sequence[Ede] | None = None,
        source: str | None = None,
        blocked: bool | None = None,
    ) -> Reply:
        """A copy with some parts replaced. A blocked reply stays blocked unless ``blocked``
        says otherwise; new ``ede`` with a blocking code makes it blocked."""
        if blocked is None:
            blocked = self.blocked or (ede is not None and blocking(ede))
        return Reply(
            self.wire if wire_ is None else wire_,
            ede=self.ede if ede is None else ede,
            source=self.source if source is None else source,
            cacheable=self.cacheable,
            blocked=blocked,
        )

    def __repr__(self) -> str:
        blocked = " blocked" if self.blocked else ""
        return f"<Reply rcode={self.rcode} an={self.ancount} from={self.source or '?'}{blocked}>"


def _without_opt(msg: dns.message.Message) -> dns.message.Message:
    clone = dns.message.Message(id=msg.id)
    clone.flags = msg.flags
    clone.question = list(msg.question)
    clone.answer = list(msg.answer)
    clone.authority = list(msg.authority)
    clone.additional = list(msg.additional)
    clone.set_rcode(msg.rcode() & 0x0F)
    return clone


def rr(rtype: int, ttl: int, rdata: bytes, *, name: bytes = b"\xc0\x0c", rclass: int = 1) -> bytes:
    """One resource record in wire form; by default owned by the question's name."""
    return name + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def respond(
    query: Query,
    rcode: int = wire.NOERROR,
    answers: Iterable[bytes] = (),
    authority: Iterable[bytes] = (),
    *,
    aa: bool = False,
    ede: Sequence[Ede] = (),
    source: str = "",
    cacheable: bool = True,
    blocked: bool | None = None,
) -> Reply:
    """Synthesise a reply to ``query`` from records built with `rr` (no dnspython needed);
    ``blocked`` as in `Reply` (by default, whether ``ede`` holds Blocked/Censored/Filtered)."""
    answers = tuple(answers)
    authority = tuple(authority)
    flags = QR | RA | (query.flags & (RD | CD)) | (wire.AA if aa else 0) | (rcode & 0xF)
    header = HEADER.pack(query.id, flags, 1, len(answers), len(authority), 0)
    body = header + query.question + b"".join(answers) + b"".join(authority)
    return Reply(body, ede=ede, source=source, cacheable=cacheable, blocked=blocked)


def response_message(query: Query, rcode: int = wire.NOERROR) -> dns.message.Message:
    """A dnspython response skeleton for ``query``: add records, then `Reply.from_message`."""
    msg = dns.message.Message(id=query.id)
    msg.flags = QR | RA | (query.flags & (RD | CD))
    msg.set_rcode(rcode)
    msg.question = [dns.rrset.RRset(query.name, query.qclass, query.qtype)]
    return msg


def _opt_record(size: int, do: bool, ede: Sequence[Ede], ext_rcode: int = 0) -> bytes:
    options = b"".join(
        edns_option(wire.EDE_OPTION, struct.pack("!H", code) + text.encode()[:EDE_TEXT_MAX])
        for code, text in ede
    )
    return wire.opt_record(size, do, options, ext_rcode)


def truncate(reply: Reply, query: Query, ede: Sequence[Ede] | None = None) -> Reply:
    """``reply`` cut to its header and ``query``'s question with TC set, so the client
    asks again over TCP; ``ede`` replaces the reply's Extended DNS Errors when given (and
    then decides whether it counts as blocked: a rate limit's slip is not the block)."""
    header = HEADER.pack(query.id, reply.flags | TC, 1, 0, 0, 0)
    return Reply(
        header + query.question,
        ede=reply.ede if ede is None else ede,
        source=reply.source,
        cacheable=reply.cacheable,
        blocked=reply.blocked if ede is None else None,
    )


def limit_for(query: Query, edns_udp_size: int) -> int:
    """The largest reply this client can take over its transport."""
    if query.transport != "udp":
        return 65535
    if not query.edns:
        return 512
    return max(512, min(query.udp_size, edns_udp_size))


H2 = struct.Struct("!HH")
_PLAIN_OPT: dict[int, bytes] = {}  # OPT records without EDE, by 2 * size + DO


def finalize(reply: Reply, query: Query, edns_udp_size: int) -> bytes:
    """Fit ``reply`` to ``query``'s client: ID, question case, flags, OPT, size and TC.

    The common case (the reply fits) is a few slices joined: this runs for every answer,
    cache hits included.
    """
    w = reply.wire
    qflags = query.flags
    flags = (((w[2] << 8) | w[3]) & ~(RD | CD)) | (qflags & (RD | CD))
    if not (query.do or qflags & AD):
        flags &= ~AD
    opt = b""
    if query.edns:
        if reply.ede:
            opt = _opt_record(edns_udp_size, query.do, reply.ede)
        else:
            key = 2 * edns_udp_size + query.do
            opt = _PLAIN_OPT.get(key) or _PLAIN_OPT.setdefault(
                key, _opt_record(edns_udp_size, query.do, ())
            )
    size = len(w) + len(opt)
    if size > 512 and size > limit_for(query, edns_udp_size):  # no limit is below 512
        return _truncated(reply, query, edns_udp_size)
    qname = query.qname
    if not w.startswith(qname, 12):  # another case (0x20, a cached answer): the client's
        qend = 12 + len(qname)
        if w[12:qend].lower() == query.key:
            w = w[:12] + qname + w[qend:]
    if opt:
        ar = ((w[10] << 8) | w[11]) + 1
        return b"".join((H2.pack(query.id, flags), w[4:10], U16.pack(ar), w[12:], opt))
    return H2.pack(query.id, flags) + w[4:]


def _truncated(reply: Reply, query: Query, edns_udp_size: int) -> bytes:
    """`finalize` for a reply that does not fit: header and question only, with TC set,
    so the client retries over TCP."""
    w = reply.wire
    flags = (U16.unpack_from(w, 2)[0] & ~(RD | CD)) | (query.flags & (RD | CD)) | TC
    if not (query.do or query.flags & AD):
        flags &= ~AD
    qend = wire.skip_name(w, 12) + 4 if U16.unpack_from(w, 4)[0] else 12
    question = w[12:qend]
    if question[: len(query.qname)].lower() == query.key:
        question = query.qname + question[len(query.qname) :]
    opt = b""
    if query.edns:
        opt = _opt_record(edns_udp_size, query.do, reply.ede)
        if qend + len(opt) > limit_for(query, edns_udp_size):
            opt = _opt_record(edns_udp_size, query.do, ())
    header = HEADER.pack(query.id, flags, 1 if qend > 12 else 0, 0, 0, 1 if opt else 0)
    return header + question + opt


def error_wire(reject: Reject, edns_udp_size: int) -> bytes:
    """The response to a message the wire view rejected (FORMERR, NOTIMP, BADVERS)."""
    query = reject.query
    flags = QR | RA | (reject.flags & (0x7800 | RD | CD)) | (reject.rcode & 0xF)
    question = query.question if query is not None else b""
    header = HEADER.pack(reject.msg_id, flags, 1 if question else 0, 0, 0, 0)
    if query is None or not query.edns:
        return header + question
    opt = _opt_record(edns_udp_size, query.do, (), reject.rcode >> 4)
    header = HEADER.pack(reject.msg_id, flags, 1, 0, 0, 1)
    return header + question + opt
