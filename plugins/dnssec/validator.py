"""The validation logic of a validating stub (RFC 4033-4035, RFC 5155).

`Validator.validate` classifies one response as secure, insecure or bogus. It asks for the
DNSKEY and DS RRsets it needs through ``fetch`` (the dnssec step runs them through the rest
of its chain) and keeps those it validated in a bounded store, for their TTLs.

The chain of trust is followed bottom-up from the signer of an answer (DS of the signer,
signed by the parent, up to an anchor), and top-down from the anchor when an answer is
unsigned: every name between the anchor and the owner is asked for its DS until a proven
unsigned delegation (insecure) or the owner (bogus: the zone is signed) is reached.
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence

import attrs
import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.RRSIG import RRSIG
from dnsproxy.plugins.dnssec.anchors import Anchor

from dnsproxy.errors import DnsProxyError

SECURE, INSECURE, BOGUS = "secure", "insecure", "bogus"
NOT_A_ZONE = "not a zone"  # a DS query's outcome for a name that is no zone cut

# Extended DNS Errors (RFC 8914) of bogus answers.
EDE_BOGUS = 6
EDE_EXPIRED = 7
EDE_NOT_YET_VALID = 8
EDE_DNSKEY_MISSING = 9
EDE_RRSIGS_MISSING = 10
EDE_NSEC_MISSING = 12
EDE_NO_REACHABLE_AUTHORITY = 22

ALGORITHMS = frozenset({8, 10, 13, 14, 15})  # RSASHA256/512, ECDSA P-256/P-384, Ed25519
ED448 = 16
DIGESTS = frozenset({1, 2, 4})  # SHA-1, SHA-256, SHA-384
RRSIG_T, NSEC_T, NSEC3_T = dns.rdatatype.RRSIG, dns.rdatatype.NSEC, dns.rdatatype.NSEC3
DS_T, DNSKEY_T, SOA_T, CNAME_T, NS_T = (
    dns.rdatatype.DS,
    dns.rdatatype.DNSKEY,
    dns.rdatatype.SOA,
    dns.rdatatype.CNAME,
    dns.rdatatype.NS,
)
WILDCARD = b"*"

Fetch = Callable[[dns.name.Name, int], Awaitable[dns.message.Message | None]]


@attrs.frozen
class Verdict:
    """How a response (or a zone's keys) validated, the EDE if bogus, and why."""

    status: str
    ede: int = 0
    why: str = ""
    keys: dns.rrset.RRset | None = None  # a zone's validated DNSKEY set (SECURE keys only)
    ttl: int = 0


def supported_algorithms() -> frozenset[int]:
    """The DNSKEY algorithms this installation can verify (Ed448 where OpenSSL has it)."""
    try:
        from cryptography.hazmat.primitives.asymmetric import ed448

        ed448.Ed448PrivateKey.generate()
    except Exception:  # cryptography without Ed448 (UnsupportedAlgorithm) or no backend
        return ALGORITHMS
    return ALGORITHMS | {ED448}


class TooManyFetches(DnsProxyError):
    """A validation needed more DS/DNSKEY queries than ``max_fetches`` allows."""


@attrs.define
class Budget:
    """The fetches one validation may still make, and its explanation lines."""

    left: int
    lines: list[str] = attrs.field(factory=list)
    # Outcomes of this validation, whatever their TTL (a zero TTL is not kept in the store).
    seen: dict[tuple[dns.name.Name, int], Verdict] = attrs.field(factory=dict)


class Validator:
    """Classifies responses; owns the store of validated DNSKEY/DS RRsets."""

    def __init__(
        self,
        anchors: dict[dns.name.Name, Anchor],
        insecure: Sequence[dns.name.Name],
        *,
        max_keys: int,
        max_iterations: int,
        algorithms: frozenset[int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.anchors = anchors
        self.insecure = tuple(insecure)
        self.max_keys = max_keys
        self.max_iterations = max_iterations
        self.algorithms = algorithms
        self.clock = clock
        self.store: OrderedDict[tuple[dns.name.Name, int], tuple[float, Verdict]] = OrderedDict()
        self.fetches = 0

    # -- the store of validated DNSKEY/DS outcomes ------------------------------------

    def _cached(self, key: tuple[dns.name.Name, int], budget: Budget) -> Verdict | None:
        seen = budget.seen.get(key)
        if seen is not None:
            return seen
        hit = self.store.get(key)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            del self.store[key]
            return None
        self.store.move_to_end(key)
        return hit[1]

    def _keep(self, key: tuple[dns.name.Name, int], verdict: Verdict, budget: Budget) -> Verdict:
        budget.seen[key] = verdict
        if verdict.status != BOGUS and verdict.ttl > 0:
            self.store[key] = (self.clock() + verdict.ttl, verdict)
            self.store.move_to_end(key)
            while len(self.store) > self.max_keys:
                self.store.popitem(last=False)
        return verdict

    def flush(self) -> None:
        self.store.clear()

    # -- where a name stands ----------------------------------------------------------

    def anchor_for(self, name: dns.name.Name) -> Anchor | None:
        """The deepest anchor at or above ``name``; None when no anchor covers it."""
        best = None
        for zone, anchor in self.anchors.items():
            if name.is_subdomain(zone) and (best is None or zone.is_subdomain(best.zone)):
                best = anchor
        return best

    def negative_anchor(self, name: dns.name.Name) -> dns.name.Name | None:
        for zone in self.insecure:
            if name.is_subdomain(zone):
                return zone
        return None

    async def validate(
        self,
        qname: dns.name.Name,
        qtype: int,
        msg: dns.message.Message,
        fetch: Fetch,
        budget: Budget,
    ) -> Verdict:
        """Classify the response ``msg`` to (``qname``, ``qtype``)."""
        nta = self.negative_anchor(qname)
        if nta is not None:
            return Verdict(INSECURE, why=f"{qname} is under the negative trust anchor {nta}")
        if self.anchor_for(qname) is None:
            return Verdict(INSECURE, why=f"no trust anchor covers {qname}")
        try:
            return await self._validate(qname, qtype, msg, fetch, budget)
        except TooManyFetches:
            return Verdict(BOGUS, EDE_DNSKEY_MISSING, "too many DS/DNSKEY queries to validate")

    async def _validate(
        self,
        qname: dns.name.Name,
        qtype: int,
        msg: dns.message.Message,
        fetch: Fetch,
        budget: Budget,
    ) -> Verdict:
        sname = qname
        verdicts: list[Verdict] = []
        answered = False
        for rrset in msg.answer:
            if rrset.rdtype == RRSIG_T:
                continue
            sigs = _sigs(msg.answer, rrset.name, rrset.rdtype)
            v = await self.rrset(rrset, sigs, fetch, budget)
            if v.status == BOGUS:
                return v
            if v.status == SECURE:
                wild = _wildcard_labels(rrset.name, sigs)
                if wild is not None:
                    w = await self._wildcard(rrset.name, wild, msg, fetch, budget)
                    if w.status != SECURE:
                        return w
            verdicts.append(v)
            if rrset.name == sname and rrset.rdtype == CNAME_T and qtype != CNAME_T:
                sname = rrset[0].target
            elif rrset.name == sname and (rrset.rdtype == qtype or qtype == dns.rdatatype.ANY):
                answered = True
        if not answered:
            v = await self.denial(sname, qtype, msg, fetch, budget)
            if v.status == BOGUS:
                return v
            verdicts.append(v)
        insecure = [v for v in verdicts if v.status == INSECURE]
        if insecure:
            return insecure[0]
        return Verdict(SECURE, why="; ".join(v.why for v in verdicts if v.why))

    async def rrset(
        self, rrset: dns.rrset.RRset, sigs: list[RRSIG], fetch: Fetch, budget: Budget
    ) -> Verdict:
        """Validate one RRset with its RRSIGs (no RRSIG: secure only if the zone is unsigned)."""
        what = f"{rrset.name}/{dns.rdatatype.to_text(rrset.rdtype)}"
        signers = {s.signer for s in sigs if rrset.name.is_subdomain(s.signer)}
        if not signers:
            zone = await self.zone_of(rrset.name, fetch, budget)
            if zone.status != SECURE:
                return zone
            why = f"{what} has no RRSIG though {zone.why} is signed"
            return Verdict(BOGUS, EDE_RRSIGS_MISSING, why)
        signer = max(signers, key=lambda n: len(n))
        keys = await self.keys(signer, fetch, budget)
        if keys.status != SECURE:
            return keys
        assert keys.keys is not None
        v = self.verify(rrset, [s for s in sigs if s.signer == signer], keys.keys)
        if v.status == SECURE:
            budget.lines.append(v.why)
        return v

    def verify(
        self, rrset: dns.rrset.RRset, sigs: Iterable[RRSIG], keys: dns.rrset.RRset
    ) -> Verdict:
        """Check ``rrset`` against the RRSIGs made by one of ``keys`` (a validated DNSKEY set)."""
        what = f"{rrset.name}/{dns.rdatatype.to_text(rrset.rdtype)}"
        now = self.clock()
        reasons: list[int] = []
        for sig in sigs:
            if sig.algorithm not in self.algorithms or sig.signer != keys.name:
                continue
            matching = [k for k in keys if _tag(k) == sig.key_tag and k.algorithm == sig.algorithm]
            if not matching:
                reasons.append(EDE_DNSKEY_MISSING)
                continue
            if now > sig.expiration:
                reasons.append(EDE_EXPIRED)
                continue
            if now < sig.inception:
                reasons.append(EDE_NOT_YET_VALID)
                continue
            try:
                dns.dnssec.validate_rrsig(rrset, sig, {keys.name: keys}, now=now)
            except dns.dnssec.ValidationFailure:
                reasons.append(EDE_BOGUS)
                continue
            ttl = min(rrset.ttl, sig.original_ttl, int(sig.expiration - now))
            why = f"{what} signed by {keys.name} key {sig.key_tag} (algorithm {sig.algorithm})"
            return Verdict(SECURE, why=why, ttl=max(ttl, 0))
        if not reasons:
            return Verdict(BOGUS, EDE_RRSIGS_MISSING, f"{what}: no RRSIG of a usable algorithm")
        for ede, text in (
            (EDE_BOGUS, "signature does not verify"),
            (EDE_EXPIRED, "signature expired"),
            (EDE_NOT_YET_VALID, "signature not yet valid"),
        ):
            if ede in reasons:
                return Verdict(BOGUS, ede, f"{what}: {text} (signer {keys.name})")
        return Verdict(
            BOGUS, EDE_DNSKEY_MISSING, f"{what}: no DNSKEY of {keys.name} made the RRSIG"
        )

    # -- the chain of trust -----------------------------------------------------------

    async def _fetch(
        self, name: dns.name.Name, rdtype: int, fetch: Fetch, budget: Budget
    ) -> dns.message.Message | None:
        if budget.left <= 0:
            raise TooManyFetches
        budget.left -= 1
        self.fetches += 1
        return await fetch(name, rdtype)

    async def keys(self, zone: dns.name.Name, fetch: Fetch, budget: Budget) -> Verdict:
        """The validated DNSKEY set of ``zone`` (SECURE), or why there is none."""
        cached = self._cached((zone, DNSKEY_T), budget)
        if cached is not None:
            return cached
        if self.negative_anchor(zone) is not None:
            return Verdict(INSECURE, why=f"{zone} is under a negative trust anchor")
        anchor = self.anchors.get(zone)
        if anchor is not None:
            ds: tuple[DS, ...] = anchor.ds
            trusted: tuple[DNSKEY, ...] = anchor.keys
            source = "trust anchor"
            ds_ttl = 86400
        else:
            if self.anchor_for(zone) is None:
                return Verdict(INSECURE, why=f"no trust anchor covers {zone}")
            dsv = await self.ds(zone, fetch, budget)
            if dsv.status == NOT_A_ZONE:
                return Verdict(BOGUS, EDE_BOGUS, f"signer {zone} is not a zone")
            if dsv.status != SECURE:
                return dsv
            assert dsv.keys is not None
            ds = tuple(dsv.keys)  # type: ignore[arg-type]
            trusted = ()
            source = f"DS from {zone.parent()}"
            ds_ttl = dsv.ttl
        usable_ds = [d for d in ds if d.algorithm in self.algorithms and d.digest_type in DIGESTS]
        usable_keys = [k for k in trusted if k.algorithm in self.algorithms]
        if not usable_ds and not usable_keys:
            why = f"{zone}: no DS of a supported algorithm (RFC 6840 §5.2)"
            return self._keep((zone, DNSKEY_T), Verdict(INSECURE, why=why, ttl=ds_ttl), budget)
        msg = await self._fetch(zone, DNSKEY_T, fetch, budget)
        dnskeys = _find(msg.answer, zone, DNSKEY_T) if msg is not None else None
        if dnskeys is None:
            return Verdict(BOGUS, EDE_DNSKEY_MISSING, f"no DNSKEY for {zone}")
        entry = [
            k for k in dnskeys if k in usable_keys or any(_matches(k, zone, d) for d in usable_ds)
        ]
        if not entry:
            return Verdict(BOGUS, EDE_DNSKEY_MISSING, f"no DNSKEY of {zone} matches its {source}")
        sep = dns.rrset.RRset(zone, dns.rdataclass.IN, DNSKEY_T)
        for k in entry:
            sep.add(k)
        assert msg is not None
        v = self.verify(dnskeys, _sigs(msg.answer, zone, DNSKEY_T), sep)
        if v.status != SECURE:
            return v
        tags = ", ".join(str(_tag(k)) for k in entry)
        why = f"{zone} DNSKEY validated by key {tags} from the {source}"
        budget.lines.append(why)
        return self._keep(
            (zone, DNSKEY_T),
            Verdict(SECURE, why=why, keys=dnskeys, ttl=min(v.ttl, ds_ttl)),
            budget,
        )

    async def ds(self, zone: dns.name.Name, fetch: Fetch, budget: Budget) -> Verdict:
        """The validated DS set of ``zone`` (SECURE, in ``keys``), or INSECURE when its
        parent proves there is none, or NOT_A_ZONE when ``zone`` is no delegation."""
        cached = self._cached((zone, DS_T), budget)
        if cached is not None:
            return cached
        msg = await self._fetch(zone, DS_T, fetch, budget)
        if msg is None or msg.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return Verdict(BOGUS, EDE_NO_REACHABLE_AUTHORITY, f"no answer to {zone}/DS")
        found = _find(msg.answer, zone, DS_T)
        if found is not None:
            sigs = _sigs(msg.answer, zone, DS_T)
            signers = {s.signer for s in sigs if zone.is_subdomain(s.signer) and s.signer != zone}
            if not signers:
                parent = await self.zone_of(zone.parent(), fetch, budget)
                if parent.status != SECURE:
                    return self._keep((zone, DS_T), attrs.evolve(parent, ttl=found.ttl), budget)
                return Verdict(BOGUS, EDE_RRSIGS_MISSING, f"{zone}/DS has no RRSIG")
            signer = max(signers, key=lambda n: len(n))
            keys = await self.keys(signer, fetch, budget)
            if keys.status != SECURE:
                return keys
            assert keys.keys is not None
            v = self.verify(found, [s for s in sigs if s.signer == signer], keys.keys)
            if v.status != SECURE:
                return v
            return self._keep(
                (zone, DS_T), Verdict(SECURE, why=v.why, keys=found, ttl=v.ttl), budget
            )
        v = await self.denial(zone, DS_T, msg, fetch, budget, parent_side=True)
        if v.status == BOGUS:
            return v
        return self._keep((zone, DS_T), v, budget)

    async def zone_of(self, name: dns.name.Name, fetch: Fetch, budget: Budget) -> Verdict:
        """Top-down from the anchor: is the zone holding ``name`` signed (SECURE, with the
        zone in ``why``), below a proven unsigned delegation (INSECURE), or broken?"""
        nta = self.negative_anchor(name)
        if nta is not None:
            return Verdict(INSECURE, why=f"{name} is under the negative trust anchor {nta}")
        anchor = self.anchor_for(name)
        if anchor is None:
            return Verdict(INSECURE, why=f"no trust anchor covers {name}")
        zone = anchor.zone
        v = await self.keys(zone, fetch, budget)
        if v.status != SECURE:
            return v
        labels = name.labels
        for depth in range(len(zone.labels) + 1, len(labels) + 1):
            below = dns.name.Name(labels[-depth:])
            d = await self.ds(below, fetch, budget)
            if d.status == NOT_A_ZONE:
                continue
            if d.status != SECURE:
                return d
            zone = below
            v = await self.keys(zone, fetch, budget)
            if v.status != SECURE:
                return v
        return Verdict(SECURE, why=str(zone), keys=v.keys)

    # -- authenticated denial ---------------------------------------------------------

    async def denial(
        self,
        sname: dns.name.Name,
        qtype: int,
        msg: dns.message.Message,
        fetch: Fetch,
        budget: Budget,
        *,
        parent_side: bool = False,
    ) -> Verdict:
        """Validate the authority section of a negative answer and check its proof.

        For a DS query (``parent_side``) the outcome says what the name is: INSECURE (an
        unsigned delegation), NOT_A_ZONE (no delegation there) or SECURE never (that is a DS).
        """
        nxdomain = msg.rcode() == dns.rcode.NXDOMAIN
        proof = await self._authority(sname, msg, fetch, budget)
        if proof.status != SECURE:
            return proof
        nsecs = [r for r in msg.authority if r.rdtype == NSEC_T]
        nsec3s = [r for r in msg.authority if r.rdtype == NSEC3_T]
        what = f"{sname}/{dns.rdatatype.to_text(qtype)}"
        if nsecs:
            result = _nsec_denial(sname, qtype, nxdomain, nsecs)
        elif nsec3s:
            result = self._nsec3_denial(sname, qtype, nxdomain, nsec3s)
        else:
            return Verdict(BOGUS, EDE_NSEC_MISSING, f"{what}: no NSEC or NSEC3 in the denial")
        if result is None:
            kind = "NXDOMAIN" if nxdomain else "NODATA"
            return Verdict(BOGUS, EDE_NSEC_MISSING, f"{what}: the NSEC records do not prove {kind}")
        status, why = result
        ttl = min([r.ttl for r in msg.authority] or [0])
        if parent_side:
            if status == SECURE:
                status = NOT_A_ZONE
            return Verdict(status, why=f"{what}: {why}", ttl=ttl)
        return Verdict(status, why=f"{what}: {why}; {proof.why}", ttl=ttl)

    async def _authority(
        self, sname: dns.name.Name, msg: dns.message.Message, fetch: Fetch, budget: Budget
    ) -> Verdict:
        """Validate every SOA/NSEC/NSEC3 RRset of the authority section."""
        rrsets = [r for r in msg.authority if r.rdtype in (SOA_T, NSEC_T, NSEC3_T)]
        if not any(r.rdtype == RRSIG_T for r in msg.authority):
            zone = await self.zone_of(sname, fetch, budget)
            if zone.status != SECURE:
                return zone
            if not rrsets:
                return Verdict(BOGUS, EDE_NSEC_MISSING, f"no NSEC proof for {sname} in {zone.why}")
            return Verdict(BOGUS, EDE_RRSIGS_MISSING, f"denial for {sname} has no RRSIG")
        whys = []
        for rrset in rrsets:
            v = await self.rrset(
                rrset, _sigs(msg.authority, rrset.name, rrset.rdtype), fetch, budget
            )
            if v.status != SECURE:
                return v
            whys.append(v.why)
        return Verdict(SECURE, why="; ".join(whys[:2]))

    def _nsec3_denial(
        self, sname: dns.name.Name, qtype: int, nxdomain: bool, rrsets: list[dns.rrset.RRset]
    ) -> tuple[str, str] | None:
        params = {(r[0].algorithm, r[0].iterations, r[0].salt) for r in rrsets}
        if len(params) != 1:
            return None
        alg, iterations, salt = params.pop()
        if alg != 1:
            return INSECURE, f"NSEC3 hash algorithm {alg} is unknown"
        if iterations > self.max_iterations:
            return INSECURE, f"NSEC3 with {iterations} iterations (over {self.max_iterations})"
        zone = rrsets[0].name.parent()
        n3 = Nsec3Set(zone, salt, iterations, rrsets)
        return n3.deny(sname, qtype, nxdomain)

    async def _wildcard(
        self,
        owner: dns.name.Name,
        labels: int,
        msg: dns.message.Message,
        fetch: Fetch,
        budget: Budget,
    ) -> Verdict:
        """A wildcard expansion is valid only with proof that ``owner`` itself does not exist
        (RFC 4035 §5.3.4, RFC 5155 §8.8). The proof rides in the authority section; when a
        step on the way dropped it, it is asked for with a NODATA query to ``owner``."""
        for source in (msg, None):
            if source is None:
                source = await self._fetch(owner, dns.rdatatype.NULL, fetch, budget)
                if source is None:
                    break
            v = await self._authority(owner, source, fetch, budget)
            if v.status != SECURE:
                continue
            if _wildcard_proven(owner, labels, source.authority, self):
                return Verdict(SECURE, why=f"{owner} is a proven wildcard expansion")
        return Verdict(BOGUS, EDE_NSEC_MISSING, f"no proof that {owner} matched a wildcard")


# -- NSEC ------------------------------------------------------------------------------


def _covers(owner: dns.name.Name, nxt: dns.name.Name, name: dns.name.Name) -> bool:
    """Whether the NSEC interval (owner, next) holds ``name`` (canonical order, with the
    last NSEC of a zone wrapping to its apex)."""
    if owner < nxt:
        return owner < name < nxt
    return name > owner or name < nxt  # the last NSEC: next is the apex


def _common(a: dns.name.Name, b: dns.name.Name) -> dns.name.Name:
    """The longest common ancestor of two names."""
    n = a.fullcompare(b)[2]
    return dns.name.Name(a.labels[-n:]) if n else dns.name.root


def _closest_encloser(
    sname: dns.name.Name, owner: dns.name.Name, nxt: dns.name.Name
) -> dns.name.Name:
    a, b = _common(sname, owner), _common(sname, nxt)
    return a if len(a) >= len(b) else b


def _nsec_denial(
    sname: dns.name.Name, qtype: int, nxdomain: bool, rrsets: list[dns.rrset.RRset]
) -> tuple[str, str] | None:
    records = [(r.name, r[0]) for r in rrsets]
    for owner, nsec in records:
        if owner == sname and not nxdomain:
            types = _types(nsec)
            if qtype in types or CNAME_T in types:
                return None
            if qtype == DS_T:
                if NS_T in types and SOA_T not in types:
                    return INSECURE, f"NSEC at {owner} proves an unsigned delegation"
                return SECURE, f"NSEC at {owner} proves no DS"
            if NS_T in types and SOA_T not in types:
                return None  # a parent-side NSEC cannot deny the child's data
            return SECURE, f"NSEC at {owner} proves no {dns.rdatatype.to_text(qtype)}"
    for owner, nsec in records:
        if not _covers(owner, nsec.next, sname):
            continue
        if not nxdomain and nsec.next.is_subdomain(sname):
            return SECURE, f"NSEC {owner} proves {sname} an empty non-terminal"
        ce = _closest_encloser(sname, owner, nsec.next)
        star = dns.name.Name((WILDCARD, *ce.labels))
        for w_owner, w_nsec in records:
            if nxdomain and _covers(w_owner, w_nsec.next, star):
                return SECURE, f"NSEC {owner} covers {sname}, NSEC {w_owner} covers {star}"
            if not nxdomain and w_owner == star:
                types = _types(w_nsec)
                if qtype not in types and CNAME_T not in types:
                    return SECURE, f"NSEC {owner} covers {sname}, wildcard {star} lacks the type"
        return None
    return None


def _types(rd: NSEC | NSEC3) -> set[int]:
    out: set[int] = set()
    for window, bitmap in rd.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.add(window * 256 + i * 8 + bit)
    return out


# -- NSEC3 -----------------------------------------------------------------------------


class Nsec3Set:
    """The NSEC3 records of one response, with the hashing and interval tests of RFC 5155."""

    def __init__(
        self, zone: dns.name.Name, salt: bytes, iterations: int, rrsets: list[dns.rrset.RRset]
    ) -> None:
        self.zone = zone
        self.salt = salt
        self.iterations = iterations
        self.records = []
        for r in rrsets:
            try:
                h = base64.b32hexdecode(r.name.labels[0].upper())
            except ValueError:
                continue
            self.records.append((h, r[0]))

    def hash(self, name: dns.name.Name) -> bytes:
        return base64.b32hexdecode(
            dns.dnssec.nsec3_hash(name, self.salt or None, self.iterations, 1)
        )

    def matching(self, name: dns.name.Name) -> NSEC3 | None:
        h = self.hash(name)
        return next((rd for owner, rd in self.records if owner == h), None)

    def covering(self, name: dns.name.Name) -> NSEC3 | None:
        h = self.hash(name)
        for owner, rd in self.records:
            nxt = rd.next
            if (owner < h < nxt) if owner < nxt else (h > owner or h < nxt):
                return rd
        return None

    def closest_encloser(
        self, sname: dns.name.Name
    ) -> tuple[dns.name.Name, dns.name.Name, NSEC3] | None:
        """(closest encloser, next closer name, the NSEC3 covering it), RFC 5155 §8.3."""
        name = sname
        while len(name) > len(self.zone) and name.is_subdomain(self.zone):
            parent = name.parent()
            if self.matching(parent) is not None:
                cover = self.covering(name)
                return (parent, name, cover) if cover is not None else None
            name = parent
        return None

    def deny(self, sname: dns.name.Name, qtype: int, nxdomain: bool) -> tuple[str, str] | None:
        what = dns.rdatatype.to_text(qtype)
        if not nxdomain:
            rd = self.matching(sname)
            if rd is not None:
                types = _types(rd)
                if qtype in types or CNAME_T in types:
                    return None
                if qtype == DS_T and NS_T in types and SOA_T not in types:
                    return INSECURE, f"NSEC3 proves {sname} an unsigned delegation"
                return SECURE, f"NSEC3 matching {sname} proves no {what}"
        ce = self.closest_encloser(sname)
        if ce is None:
            return None
        encloser, next_closer, cover = ce
        optout = bool(cover.flags & 1)
        if not nxdomain and qtype == DS_T and optout:
            return INSECURE, f"opt-out NSEC3 covers {next_closer}: an unsigned delegation"
        star = dns.name.Name((WILDCARD, *encloser.labels))
        if nxdomain:
            if self.covering(star) is None:
                return None
            if optout:
                return INSECURE, f"opt-out NSEC3 covers {next_closer}"
            return SECURE, f"NSEC3 proves {sname} does not exist (closest encloser {encloser})"
        wild = self.matching(star)
        if wild is None:
            return None
        types = _types(wild)
        if qtype in types or CNAME_T in types:
            return None
        return SECURE, f"NSEC3 proves the wildcard {star} has no {what}"


# -- helpers ---------------------------------------------------------------------------


def _sigs(section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: int) -> list[RRSIG]:
    return [
        rd
        for r in section
        if r.rdtype == RRSIG_T and r.covers == rdtype and r.name == name
        for rd in r
    ]


def _find(
    section: list[dns.rrset.RRset], name: dns.name.Name, rdtype: int
) -> dns.rrset.RRset | None:
    return next((r for r in section if r.name == name and r.rdtype == rdtype), None)


def _tag(key: DNSKEY) -> int:
    return dns.dnssec.key_id(key)


def _matches(key: DNSKEY, zone: dns.name.Name, ds: DS) -> bool:
    if _tag(key) != ds.key_tag or key.algorithm != ds.algorithm:
        return False
    try:
        return dns.dnssec.make_ds(zone, key, ds.digest_type) == ds
    except (dns.dnssec.UnsupportedAlgorithm, ValueError):
        return False


def _wildcard_labels(owner: dns.name.Name, sigs: list[RRSIG]) -> int | None:
    """The RRSIG labels count when ``owner`` was expanded from a wildcard, else None."""
    count = len(owner) - 1  # without the root label
    if owner.labels[0] == WILDCARD:
        count -= 1
    labels = min((s.labels for s in sigs), default=count)
    return labels if labels < count else None


def _wildcard_proven(
    owner: dns.name.Name, labels: int, authority: list[dns.rrset.RRset], validator: Validator
) -> bool:
    """Whether ``authority`` proves no closer match for ``owner`` than its wildcard."""
    next_closer = dns.name.Name(owner.labels[-(labels + 2) :])
    for r in authority:
        if r.rdtype == NSEC_T and _covers(r.name, r[0].next, owner):
            return True
    nsec3s = [r for r in authority if r.rdtype == NSEC3_T]
    if nsec3s:
        rd = nsec3s[0][0]
        if rd.algorithm != 1 or rd.iterations > validator.max_iterations:
            return False
        n3 = Nsec3Set(nsec3s[0].name.parent(), rd.salt, rd.iterations, nsec3s)
        return n3.covering(next_closer) is not None
    return False
