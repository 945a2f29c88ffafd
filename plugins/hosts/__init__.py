"""hosts: answer names from /etc/hosts-style files and inline entries (README.md beside
this file documents the behaviour, options, metrics and examples).

Known names are answered authoritatively (NODATA for other types) so local names never
leak upstream. The table is rendered once into wire-form records per name and type, so an
answer is a dictionary hit; files are polled in `run` and a new table is swapped in whole.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from itertools import islice

import attrs
import dns.exception
import dns.name
import dns.reversename

from dnsproxy import options, wire
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.errors import DnsProxyError
from dnsproxy.files import stamps, watch
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply, respond, rr
from dnsproxy.wire import AAAA as TYPE_AAAA
from dnsproxy.wire import ANY as TYPE_ANY
from dnsproxy.wire import PTR as TYPE_PTR
from dnsproxy.wire import A as TYPE_A
from dnsproxy.wire import Query

MAX_WARNINGS = 20  # broken lines logged per load (all are counted)


@attrs.frozen
class HostsOptions:
    files: tuple[str, ...] = attrs.field(default=(), converter=options.string_tuple)
    entries: tuple[str, ...] = attrs.field(default=(), converter=options.string_tuple)
    ttl: int = attrs.field(default=3600, validator=options.in_range(0, 604800))
    watch: float = options.seconds("5s", 0.1, 3600)
    max_names: int = attrs.field(default=1_000_000, validator=options.in_range(1, 50_000_000))
    max_size: int = attrs.field(default=64 << 20, validator=options.in_range(1, 1 << 32))


class HostsError(DnsProxyError):
    """The table cannot be built (unreadable file, too many names)."""


@attrs.define
class Table:
    """Answers by name, ready to send: {key: {qtype: (record, ...)}}."""

    names: dict[bytes, dict[int, tuple[bytes, ...]]] = attrs.Factory(dict)
    wild: dict[bytes, dict[int, tuple[bytes, ...]]] = attrs.Factory(dict)
    ptr: dict[bytes, tuple[bytes, ...]] = attrs.Factory(dict)
    bad_lines: int = 0
    warnings: list[str] = attrs.Factory(list)

    @property
    def size(self) -> int:
        return len(self.names) + len(self.wild)


class _Builder:
    """Collects (address, name) pairs in order, then renders the records once."""

    def __init__(self, ttl: int, max_names: int) -> None:
        self.ttl = ttl
        self.max_names = max_names
        self.addrs: dict[tuple[bool, bytes], list[ipaddress.IPv4Address | ipaddress.IPv6Address]]
        self.addrs = {}
        self.table = Table()

    def add_lines(self, lines: Iterable[str], origin: str) -> None:
        for lineno, raw in enumerate(lines, 1):
            line = raw.partition("#")[0].strip()
            if not line:
                continue
            problem = self._add_line(line)
            if problem:
                self.table.bad_lines += 1
                if len(self.table.warnings) < MAX_WARNINGS:
                    self.table.warnings.append(f"{origin}:{lineno}: {problem}; line skipped")

    def _add_line(self, line: str) -> str:
        first, *names = line.split()
        try:
            addr = ipaddress.ip_address(first.partition("%")[0])
        except ValueError:
            return f"{first!r} is not an IP address"
        if not names:
            return f"no names after {first}"
        keys = []
        for name in names:
            wild = name.startswith("*.")
            try:
                key = wire.name_to_key(name[2:] if wild else name)
            except (dns.exception.DNSException, ValueError) as exc:
                return f"{name!r} is not a domain name ({exc})"
            if key == b"\x00":
                return f"{name!r}: the root is not a host name"
            if b"*" in key:
                return f"{name!r}: only a leading '*.' wildcard is supported"
            keys.append((wild, key))
        for wild, key in keys:
            found = self.addrs.setdefault((wild, key), [])
            if addr not in found:
                found.append(addr)
        if len(self.addrs) > self.max_names:
            raise HostsError(f"more than max_names = {self.max_names} names")
        return ""

    def build(self) -> Table:
        ttl = self.ttl
        ptr: dict[bytes, list[bytes]] = {}
        for (wild, key), addrs in self.addrs.items():
            a = tuple(rr(TYPE_A, ttl, x.packed) for x in addrs if x.version == 4)
            aaaa = tuple(rr(TYPE_AAAA, ttl, x.packed) for x in addrs if x.version == 6)
            records = {TYPE_A: a, TYPE_AAAA: aaaa, TYPE_ANY: a + aaaa}
            (self.table.wild if wild else self.table.names)[key] = records
            if not wild:
                for x in addrs:
                    rev = dns.reversename.from_address(str(x)).to_wire().lower()
                    ptr.setdefault(rev, []).append(rr(TYPE_PTR, ttl, key))
        self.table.ptr = {k: tuple(dict.fromkeys(v)) for k, v in ptr.items()}
        return self.table


class Hosts(Step):
    Options = HostsOptions
    pure = True  # answers from its table; a reload says so (`changed`)

    def __init__(self, opts: HostsOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        if not opts.files and not opts.entries:
            raise setup.error(None, "needs 'files' or 'entries'")
        self.paths = [setup.path(f) for f in opts.files]
        self.stamps = stamps(self.paths)  # taken before the files are read
        try:
            self.table = self._load()
        except HostsError as exc:
            raise setup.error("files", str(exc)) from exc
        entries_problems = [w for w in self.table.warnings if w.startswith("entries:")]
        if entries_problems:
            raise setup.error("entries", entries_problems[0].removeprefix("entries:"))
        for warning in self.table.warnings:
            self.log.warning("%s: %s", setup.where, warning)
        self.answers = 0
        self.reloads = 0
        self.load_failures = 0  # re-reads that failed (the previous table kept)

    def _load(self) -> Table:
        """Read every file and the entries into a new table. Raises HostsError."""
        builder = _Builder(self.options.ttl, self.options.max_names)
        for path in self.paths:
            try:
                size = path.stat().st_size
                if size > self.options.max_size:
                    raise HostsError(
                        f"{path}: {size} bytes, over max_size = {self.options.max_size}"
                    )
                text = path.read_text(errors="replace")
            except OSError as exc:
                raise HostsError(f"{path}: {exc.strerror or exc}") from exc
            builder.add_lines(text.splitlines(), str(path))
        builder.add_lines(self.options.entries, "entries")
        return builder.build()

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None]:
        """A replay of an answer from the table is one more answer."""
        return self._count_answer

    def _count_answer(self) -> None:
        self.answers += 1

    def query(self, q: Query) -> Reply | None:
        if q.qclass != 1:
            return None
        table = self.table
        records = table.names.get(q.key)
        if records is None and table.wild:
            for parent in islice(wire.parents(q.key), 1, None):
                records = table.wild.get(parent)
                if records is not None:
                    break
        if records is not None:
            self.answers += 1
            q.note("rule", "hosts")
            answers = records.get(q.qtype, ())
            if q.trace is not None:
                q.explain(f"{self.setup.where}: known name, {len(answers)} record(s)")
            return respond(q, wire.NOERROR, answers, aa=True, source="hosts")
        ptr = table.ptr.get(q.key)
        if ptr is None:
            return None
        self.answers += 1
        q.note("rule", "hosts")
        answers = ptr if q.qtype in (TYPE_PTR, TYPE_ANY) else ()
        if q.trace is not None:
            q.explain(f"{self.setup.where}: reverse name of a known address")
        return respond(q, wire.NOERROR, answers, aa=True, source="hosts")

    async def run(self) -> None:
        await watch(self.paths, self.options.watch, self.stamps, self._reload)

    def _reload(self) -> None:
        try:
            table = self._load()
        except HostsError as exc:
            self.load_failures += 1
            self.log.error("%s: %s; keeping the previous table", self.setup.where, exc)
            return
        for warning in table.warnings:
            self.log.warning("%s: %s", self.setup.where, warning)
        self.table = table
        self.changed()
        self.reloads += 1
        self.log.info(
            "%s: reloaded %d names and wildcards (%d bad lines)",
            self.setup.where,
            table.size,
            table.bad_lines,
        )

    async def check(self) -> list[str]:
        try:
            table = self._load()
        except HostsError as exc:
            raise self.setup.error("files", str(exc)) from exc
        lines = [
            f"{len(table.names)} names, {len(table.wild)} wildcards, "
            f"{len(table.ptr)} reverse names, {table.bad_lines} bad lines"
        ]
        return lines + table.warnings

    def metrics(self) -> list[Metric]:
        return [
            Metric("entries", self.table.size, "gauge"),
            Metric("answers", self.answers),
            Metric("reloads", self.reloads),
            Metric("load_failures", self.load_failures),
        ]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("hosts", Hosts)
