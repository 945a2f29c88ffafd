"""zone — serve RFC 1035 zone files and inline records authoritatively (CoreDNS ``file``).

See README.md beside this file for the behaviour, syntax and metrics.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import attrs
import dns.exception
import dns.name
import dns.zone
import trio
from dnsproxy.plugins.zone import data
from dnsproxy.plugins.zone.data import Limits, Lookup, Zone, ZoneError

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step, client_matcher
from dnsproxy.files import stamps, watch
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_PROHIBITED,
    Reply,
    respond,
    response_message,
)
from dnsproxy.wire import Query

IXFR, AXFR = 251, 252
KINDS = ("answer", "nodata", "nxdomain", "referral", "transfer", "transfer_refused")
MAX_TRANSFER = 65535 - 64  # one TCP message, with room for the OPT record
LOG_EVERY = 10.0  # seconds between log lines a client can cause (refused transfers)


def _origin(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError("expected a domain name")
    if value:
        try:
            dns.name.from_text(value)
        except dns.exception.DNSException as exc:
            raise ValueError(f"{value!r} is not a domain name ({exc})") from exc
    return value


@attrs.frozen
class ZoneOptions:
    files: tuple[str, ...] = attrs.field(default=(), converter=options.string_tuple)
    records: tuple[str, ...] = attrs.field(default=(), converter=options.string_tuple)
    origin: str = attrs.field(default="", converter=_origin)
    ttl: int = attrs.field(default=3600, validator=options.in_range(0, 604800))
    allow_transfer: tuple[Any, ...] = attrs.field(default=(), converter=options.networks)
    watch: float = options.seconds("5s", 0.1, 3600)
    max_size: int = attrs.field(default=64 << 20, validator=options.in_range(1, 1 << 32))
    max_records: int = attrs.field(default=1_000_000, validator=options.in_range(1, 50_000_000))
    max_follow: int = attrs.field(default=8, validator=options.in_range(1, 16))
    budget: float = options.seconds(5.0, 0.01, 300)


@attrs.frozen(eq=False)
class Zones:
    """Every zone of one load, by origin key; swapped in whole on a reload."""

    by_key: dict[bytes, Zone]
    records: int


class ZoneStep(Step):
    Options = ZoneOptions
    pure = True  # answers from its zones; a reload says so (`changed`)

    def __init__(self, opts: ZoneOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        if not opts.files and not opts.records:
            raise setup.error(None, "needs 'files' or 'records'")
        self.paths = [setup.path(f) for f in opts.files]
        self.origin = dns.name.from_text(opts.origin) if opts.origin else None
        self.limits = Limits(opts.max_size, opts.max_records)
        self.stamps = stamps(self.paths)  # taken before the files are read
        try:
            self.table = self._load()
        except ZoneError as exc:
            raise setup.error(exc.key, str(exc)) from exc
        self.transfer_ok = client_matcher(opts.allow_transfer) if opts.allow_transfer else None
        self.counts = dict.fromkeys(KINDS, 0)
        self.reloads = 0
        self.failed_reloads = 0
        self._refused_logged = -1e9

    # --- loading ------------------------------------------------------------------------

    def _load(self) -> Zones:
        """Parse every file and the inline records into new zones. Raises ZoneError."""
        opts = self.options
        parsed: dict[dns.name.Name, tuple[dns.zone.Zone, str]] = {}
        for path in self.paths:
            zone = data.load_file(path, self.origin, self.limits)
            assert zone.origin is not None
            if zone.origin in parsed:
                raise ZoneError(
                    "files", f"{path}: zone {zone.origin} is also in {parsed[zone.origin][1]}"
                )
            parsed[zone.origin] = (zone, str(path))
        if opts.records:
            rrsets = data.parse_records(opts.records, self.origin, opts.ttl)
            apex = data.inline_apex(rrsets, self.origin)
            found = parsed.get(apex)
            zone = data.add_records(found[0] if found else None, apex, rrsets, opts.ttl)
            parsed[apex] = (zone, found[1] + " and records" if found else "records")
        zones: dict[bytes, Zone] = {}
        total = 0
        for zone, source in parsed.values():
            built = data.check_zone(zone, source, self.limits, total)
            zones[built.key] = built
            total += built.records
        return Zones(zones, total)

    # --- queries --------------------------------------------------------------------------

    def _zone_of(self, key: bytes) -> Zone | None:
        by_key = self.table.by_key
        for parent in wire.parents(key):
            zone = by_key.get(parent)
            if zone is not None:
                return zone
        return None

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None]:
        """A replay counts as the kind of answer it is (transfers are never replayed)."""
        if reply.rcode == wire.NXDOMAIN:
            kind = "nxdomain"
        else:
            kind = "answer" if reply.wire[6:8] != b"\x00\x00" else "nodata"
        return functools.partial(self._count, kind)

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1

    def query(self, q: Query) -> Any:
        if q.qclass != 1:
            return None
        zone = self._zone_of(q.key)
        if zone is None:
            return None  # not one of our zones: the rest of the chain answers
        if q.qtype in (AXFR, IXFR):
            return self._transfer(q, zone)
        found = zone.lookup(q.name, q.key, q.qtype)
        if found.kind == "out":
            return AWAIT
        if found.kind == "delegation":
            self.counts["referral"] += 1
            q.explain(f"{self.setup.where}: {q.text} is delegated below {zone.origin}: passed on")
            return None
        return self._reply(q, zone, found)

    def _reply(self, q: Query, zone: Zone, found: Lookup) -> Reply:
        self.counts[found.kind] += 1
        q.note("rule", "zone")
        if q.trace is not None:
            q.explain(f"{self.setup.where}: {found.kind} from zone {zone.origin}")
        msg = response_message(q, wire.NXDOMAIN if found.kind == "nxdomain" else wire.NOERROR)
        msg.flags |= wire.AA
        msg.answer = list(found.answer)
        msg.authority = list(found.authority)
        msg.additional = list(found.additional)
        return Reply.from_message(msg, source=self.setup.name)

    async def resolve(self, q: Query) -> Reply | None:
        """A CNAME chain that leaves the zone: its target through the chain from the start."""
        zone = self._zone_of(q.key)
        if zone is None:  # reloaded away since `query`
            return None
        found = zone.lookup(q.name, q.key, q.qtype)
        if found.kind == "delegation":
            return None
        if found.kind != "out":
            return self._reply(q, zone, found)
        assert found.target is not None
        result = None
        with trio.move_on_after(self.options.budget):
            result = await self._follow(q, found.target)
        q.note("rule", "zone")
        if result is None:
            text = f"CNAME target {found.target} not resolved"
            q.explain(f"{self.setup.where}: {text}")
            ede = [(EDE_NO_REACHABLE_AUTHORITY, text[:80])]
            return respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name)
        if result.rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return respond(q, result.rcode, ede=result.ede, source=self.setup.name)
        self.counts["answer"] += 1
        other = result.message()
        msg = response_message(q, result.rcode)
        msg.flags |= wire.AA  # for the question's name, which is ours (RFC 1035 §4.1.1)
        msg.answer = [*found.answer, *other.answer]
        msg.authority = list(other.authority)
        return Reply.from_message(msg, ede=result.ede, source=self.setup.name)

    async def _follow(self, q: Query, target: dns.name.Name) -> Reply | None:
        chain = self.chain
        assert chain is not None
        return await chain.follow(
            q,
            target.to_wire(),
            max_follow=self.options.max_follow,
            where=self.setup.where,
            why="the zone",
        )

    def _transfer(self, q: Query, zone: Zone) -> Reply:
        """AXFR (and IXFR, answered with the whole zone as RFC 1995 §4 allows) over a stream
        transport to a client in ``allow_transfer``; REFUSED to anyone else."""
        allowed = (
            self.transfer_ok is not None
            and q.transport != "udp"
            and q.key == zone.key
            and self.transfer_ok(q.client[0])
        )
        if not allowed:
            self.counts["transfer_refused"] += 1
            now = time.monotonic()
            if now - self._refused_logged > LOG_EVERY:
                self._refused_logged = now
                self.log.info(
                    "%s: zone transfer of %s refused to %s over %s",
                    self.setup.where,
                    q.text,
                    q.client[0],
                    q.transport,
                )
            q.explain(f"{self.setup.where}: zone transfer refused")
            ede = [(EDE_PROHIBITED, "zone transfer not allowed")]
            return respond(q, wire.REFUSED, ede=ede, source=self.setup.name)
        msg = response_message(q)
        msg.flags |= wire.AA
        msg.answer = zone.transfer()
        # Not cacheable: a cache in front would hand the zone to clients outside the ACL.
        body = Reply.from_message(msg).wire
        reply = Reply(body, source=self.setup.name, cacheable=False)
        if len(reply.wire) > MAX_TRANSFER:
            self.log.warning(
                "%s: zone %s does not fit one 64 KiB transfer message; SERVFAIL",
                self.setup.where,
                zone.origin,
            )
            return respond(q, wire.SERVFAIL, source=self.setup.name)
        self.counts["transfer"] += 1
        q.explain(f"{self.setup.where}: zone transfer of {zone.origin} to {q.client[0]}")
        return reply

    # --- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        await watch(self.paths, self.options.watch, self.stamps, self._reload)

    def _reload(self) -> None:
        try:
            table = self._load()
        except ZoneError as exc:
            self.failed_reloads += 1
            self.log.error("%s: %s; keeping the zones loaded before", self.setup.where, exc)
            return
        self.table = table
        self.changed()
        self.reloads += 1
        self.log.info(
            "%s: reloaded %d zones, %d records",
            self.setup.where,
            len(table.by_key),
            table.records,
        )

    async def check(self) -> list[str]:
        try:
            table = self._load()
        except ZoneError as exc:
            raise self.setup.error(exc.key, str(exc)) from exc
        return [
            f"zone {z.origin}: {z.records} records from {z.source}, serial {z.soa[0].serial}"
            for z in table.by_key.values()
        ]

    def metrics(self) -> list[Metric]:
        return [
            *(
                Metric("answers", n, labels=(("kind", kind),), help="Queries answered, by kind.")
                for kind, n in self.counts.items()
            ),
            Metric("zones", len(self.table.by_key), "gauge", help="Zones loaded."),
            Metric("records", self.table.records, "gauge", help="Records loaded."),
            Metric("reloads", self.reloads, help="Changed files reloaded."),
            Metric("failed_reloads", self.failed_reloads, help="Reloads that kept the old zones."),
        ]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("zone", ZoneStep)
