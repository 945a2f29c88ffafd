"""blocklist — block names from hosts, domain, dnsmasq and adblock-syntax lists.

Description
    Answers queries for listed names (and their subdomains) itself, with Extended DNS
    Error 15 naming the list; everything else passes on. Lists are files or http(s) URLs,
    loaded in the background: the step answers from the start and each list attaches when
    it is parsed. URL lists refresh with conditional GETs and survive failures through a
    copy on disk; files are re-read when they change. Replies coming back through the
    step are checked too: a CNAME whose target is blocked blocks the answer. Formats,
    semantics and the memory layout are in plugins/blocklist/README.md.

Syntax
    ::

        [[chain]]
        plugin = "blocklist"
        lists = ["ads.txt", "https://example.org/hosts"]   # required
        allow = ["allow.txt"]     # exceptions, same formats
        mode = "null"             # null | nxdomain | nodata | refused | "192.0.2.1" | [..]
        ttl = 60
        subdomains = true         # hosts/plain/dnsmasq entries cover subdomains
        cname = true              # inspect CNAME targets of upstream answers
        refresh = "24h"           # URL lists
        retry = "5m"              # after a failed download
        watch = "5s"              # how often files are checked for changes
        timeout = "60s"           # per download, all of it
        max_size = 104857600      # bytes per list
        max_entries = 5000000     # names per list
        max_patterns = 1000       # wildcard and regex rules per list

Metrics
    ``dnsproxy_blocklist_blocked{list}`` (counter), ``dnsproxy_blocklist_entries{list}``
    (gauge), ``dnsproxy_blocklist_lists_ready`` (gauge), ``dnsproxy_blocklist_load_failures``
    (counter).

Examples
    Block two lists for everyone but the child's tablet, which gets a stricter one::

        [[chain]]
        plugin = "blocklist"
        clients = ["192.168.1.50/32"]
        lists = ["/work/shared/blocklists/basic.hosts", "strict.txt"]

        [[chain]]
        plugin = "blocklist"
        lists = ["/work/shared/blocklists/basic.hosts"]
        allow = ["example.org-allow.txt"]
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import attrs
import numpy as np
import trio

from dnsproxy import options, wire
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_BLOCKED, Reply, rr
from dnsproxy.wire import AAAA as TYPE_AAAA
from dnsproxy.wire import HEADER, Query
from dnsproxy.wire import A as TYPE_A

from .domainset import NO_MATCH, DomainSet, cname_rdata, merge
from .managed import KINDS, Managed
from .parse import ALLOW, EXACT, IMPORTANT, KIND_BITS, SUBONLY, BadList, Parsed, parse_list
from .source import FetchError, Source

MODES = ("null", "nxdomain", "nodata", "refused")
MAX_LISTS = (1 << (16 - KIND_BITS)) - 1
CNAME_IN = b"\x00\x05\x00\x01"  # type CNAME, class IN, as in every CNAME record's header
MAX_CNAMES = 16  # CNAME records inspected per answer (CONFORMANCE A8: chains of 10-16)
PARSED_TABLE = "blocklist.parsed"  # the `Shared.weak` table of parsed lists
MANAGED_TABLE = "blocklist.managed"  # the `Shared.weak` table of `Managed`, by state_dir


def _mode(value: object) -> str | tuple[str, ...]:
    """A mode keyword, or the addresses to answer with (normalised, idempotent)."""
    if isinstance(value, str) and value in MODES:
        return value
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"expected one of {', '.join(MODES)} or IP addresses, got {value!r}")
    out = []
    for item in items:
        try:
            out.append(str(ipaddress.ip_address(item)))  # type: ignore[arg-type]
        except ValueError as exc:
            raise ValueError(
                f"expected one of {', '.join(MODES)} or IP addresses, got {item!r}"
            ) from exc
    return tuple(out)


def _lists(value: object) -> tuple[str, ...]:
    out = options.string_tuple(value)
    if len(out) > MAX_LISTS:
        raise ValueError(f"at most {MAX_LISTS} lists per step")
    return out


def _allow_lists(value: object) -> tuple[str, ...]:
    """Exception lists; a network here was meant for ``[server] allow`` (the client ACL)."""
    out = _lists(value)
    for item in out:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            continue
        raise ValueError(
            f"{item!r} is a network, but blocklist allow takes list files of names never to "
            "block; to let clients in by address use [server] allow"
        )
    return out


@attrs.frozen
class BlocklistOptions:
    lists: tuple[str, ...] = attrs.field(converter=_lists)
    allow: tuple[str, ...] = attrs.field(default=(), converter=_allow_lists)
    mode: str | tuple[str, ...] = attrs.field(default="null", converter=_mode)
    ttl: int = attrs.field(default=60, validator=options.in_range(0, 604800))
    subdomains: bool = True
    cname: bool = True
    refresh: float = options.seconds("24h", 60, 30 * 86400)
    retry: float = options.seconds("5m", 1, 86400)
    watch: float = options.seconds("5s", 0.1, 3600)
    timeout: float = options.seconds("60s", 0.1, 3600)
    max_size: int = attrs.field(default=100 << 20, validator=options.in_range(1, 1 << 32))
    max_entries: int = attrs.field(default=5_000_000, validator=options.in_range(1, 50_000_000))
    max_patterns: int = attrs.field(default=1000, validator=options.in_range(0, 100_000))


class Blocklist(Step):
    Options = BlocklistOptions
    pausable = True
    pure = True  # a new merged set says so (`changed`); pauses bump `Blocking.generation`

    def __init__(self, opts: BlocklistOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        if len(opts.lists) + len(opts.allow) > MAX_LISTS - len(KINDS):
            raise setup.error(
                "lists", f"at most {MAX_LISTS - len(KINDS)} lists and allow lists together"
            )
        # The server's managed allow/block lists (the dashboard's buttons) come last.
        managed = setup.shared.weak(MANAGED_TABLE)
        self.managed: Managed = managed.get(setup.state_dir) or Managed(setup.state_dir)
        managed[setup.state_dir] = self.managed
        specs = [(s, False) for s in opts.lists] + [(s, True) for s in opts.allow]
        specs += [(str(self.managed.paths[k]), k == "allow") for k in KINDS]
        self.sources = [
            Source.make(i, spec, allow, setup.base_dir, setup.state_dir)
            for i, (spec, allow) in enumerate(specs)
        ]
        self.lists = self.sources[: -len(KINDS)]  # the configured ones
        self.managed_sources = self.sources[-len(KINDS) :]
        self.set = DomainSet(np.empty(0, np.int64), np.empty(0, np.uint16))
        # Parsed lists by source, file stamp and parse options, while some step of this
        # server holds them: never another server's (`Shared`).
        self.parsed_lists = setup.shared.weak(PARSED_TABLE)
        self._reuse_parsed()
        self.blocked = [0] * len(self.sources)
        self.load_failures = 0
        self.problems: dict[int, str] = {}  # why a list is not loaded, by source index
        self.blocking = setup.blocking
        self._merge_lock = trio.Lock()
        self._parse_limiter = trio.CapacityLimiter(1)  # one list in memory at a time
        self._client: Any = None
        self._records = self._answer_records(opts)
        rcode = {"nxdomain": wire.NXDOMAIN, "refused": wire.REFUSED}.get(str(opts.mode), 0)
        self._flags = wire.QR | wire.RA | rcode
        self._ede = [((EDE_BLOCKED, src.name),) for src in self.sources]
        self._list_notes = [ListNote(self, src.name) for src in self.sources]

    def _key(self, src: Source, stamp: tuple[int, int]) -> tuple[object, ...]:
        opts = self.options
        where = str(src.path) if src.path is not None else src.url
        return (where, stamp, src.allow, opts.subdomains, opts.max_entries, opts.max_patterns)

    def _reuse_parsed(self) -> None:
        """Attach lists another step of this server parsed from the same, unchanged file.

        A step built by a SIGHUP reload thus blocks from its first query instead of
        answering unblocked while it parses everything again.
        """
        for src in self.sources:
            stamp = src.stamp()
            parsed = self.parsed_lists.get(self._key(src, stamp)) if stamp else None
            if parsed is not None:
                src.parsed = parsed
                src.seen = stamp
        loaded = [
            (s.index, s.parsed.hashes, s.parsed.kinds, s.parsed.patterns)
            for s in self.sources
            if s.parsed is not None
        ]
        if loaded:
            self.set = merge(loaded)

    # --- the hot path -------------------------------------------------------------------

    def query(self, q: Query) -> Reply | None:
        blocking = self.blocking
        if blocking.paused_until is not None and not blocking.active():
            return None
        if blocking.groups and blocking.paused_for(self.setup.clients.record(q).groups):
            return None
        if q.qclass != 1:
            return None
        tag = self.set.decide(q.key)
        if tag == NO_MATCH:
            return None
        if tag & ALLOW:  # an exception overrode a block
            q.note("rule", Match(self, tag, q.key, None))
            if q.trace is not None:
                q.explain(f"{self.setup.where}: {self.explain(tag, q.key, None)}")
            return None
        return self._block(q, tag, None)

    def response(self, q: Query, reply: Reply) -> Reply | None:
        """Block an answer whose CNAME chain leads to a blocked name."""
        if reply.wire[6:8] == b"\0\0" or not self.options.cname:  # no answer records
            return reply
        if CNAME_IN not in reply.wire:  # no CNAME record can be there: skip the walk
            return reply
        blocking = self.blocking
        if blocking.paused_until is not None and not blocking.active():
            return reply
        if blocking.groups and blocking.paused_for(self.setup.clients.record(q).groups):
            return reply
        try:
            for rdata in cname_rdata(reply.wire, MAX_CNAMES):
                target = wire.read_name(reply.wire, rdata)
                tag = self.set.decide(target)
                if tag != NO_MATCH and not tag & ALLOW:
                    return self._block(q, tag, target)
        except ValueError:
            pass  # malformed: not ours to judge (forward already stripped what it could)
        return reply

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None] | None:
        """A replay of a blocked answer is one more block of the list that matched."""
        note = (q.notes or {}).get("list")
        for index, listed in enumerate(self._list_notes):
            if listed is note:
                return functools.partial(self._count_block, index)
        return None

    def _count_block(self, index: int) -> None:
        self.blocked[index] += 1

    def _block(self, q: Query, tag: int, via: bytes | None) -> Reply:
        index = tag >> KIND_BITS
        self.blocked[index] += 1
        q.note("list", self._list_notes[index])  # the query log asks it for the rule
        if via is not None or q.trace is not None:  # the list cannot re-derive these alone
            q.note("rule", Match(self, tag, via or q.key, via))
        if q.trace is not None:
            q.explain(f"{self.setup.where}: {self.explain(tag, via or q.key, via)}")
        # respond() by hand, with everything but the header and question prepared.
        count, records = self._records.get(q.qtype, (0, b""))
        flags = self._flags | (q.flags & (wire.RD | wire.CD))
        question = q.data[12 : q.qend] if q.qend else q.question
        body = HEADER.pack(q.id, flags, 1, count, 0, 0) + question + records
        if via is not None and q.trace is not None:  # the step that decided, for the trace
            q.explain(f"{self.setup.where}: answered (rcode {flags & 0xF}) instead of the reply")
        return Reply(body, ede=self._ede[index], source="blocklist", blocked=True)

    # --- explanations (traces, the query log's rule column): never on the hot path -------

    def rule(self, tag: int, key: bytes, entry: int | str) -> str:
        """A matched rule as its list writes it, re-derived from the entry and its kind:
        ``doubleclick.net`` from a hosts or domain list, ``||doubleclick.net^`` from an
        adblock list (lists keep only hashes; the rule's text is not stored)."""
        src = self.sources[tag >> KIND_BITS]
        if isinstance(entry, str):
            return f"/{entry}/"
        name = wire.key_to_text(key[entry:])
        if src.parsed is None or not src.parsed.in_adblock_syntax:
            return f"*.{name}" if tag & SUBONLY else name
        text = f"||*.{name}^" if tag & SUBONLY else f"|{name}^" if tag & EXACT else f"||{name}^"
        if tag & ALLOW and not src.allow:
            text = "@@" + text
        return text + "$important" if tag & IMPORTANT else text

    def rules(self, key: bytes) -> list[tuple[int, str]]:
        """(tag, rule text) of every rule that matches ``key``, most specific first."""
        return [(t, self.rule(t, key, entry)) for t, entry in self.set.matches(key)]

    def explain(self, tag: int, key: bytes, via: bytes | None) -> str:
        """One line: which list and rule decided for ``key``, and what else matched it."""
        decided = ""
        others = []
        for t, rule in self.rules(key):
            text = f"{self.sources[t >> KIND_BITS].name} {rule!r}"
            if not decided and t == tag:
                decided = rule
            elif text not in others:
                others.append(text)
        name = self.sources[tag >> KIND_BITS].name
        what = f"CNAME target {wire.key_to_text(via)}" if via else wire.key_to_text(key)
        verb = "allowed by" if tag & ALLOW else "blocked by"
        line = f"{verb} {name}: {what} matched {decided!r}"
        return line + f"; also matched: {', '.join(others)}" if others else line

    @staticmethod
    def _answer_records(opts: BlocklistOptions) -> dict[int, tuple[int, bytes]]:
        """{qtype: (count, records)} of the blocked answer; other types get none."""
        if opts.mode == "null":
            addrs = ["0.0.0.0", "::"]
        elif isinstance(opts.mode, tuple):
            addrs = list(opts.mode)
        else:
            return {}
        out: dict[int, list[bytes]] = {TYPE_A: [], TYPE_AAAA: []}
        for text in addrs:
            addr = ipaddress.ip_address(text)
            rtype = TYPE_A if addr.version == 4 else TYPE_AAAA
            out[rtype].append(rr(rtype, opts.ttl, addr.packed))
        return {k: (len(v), b"".join(v)) for k, v in out.items() if v}

    # --- state ----------------------------------------------------------------------------

    def ready(self) -> bool:
        return all(src.parsed is not None for src in self.sources)

    def not_ready_reason(self) -> str | None:
        waiting = [s for s in self.sources if s.parsed is None]
        if not waiting:
            return None
        return "; ".join(f"list {s.name}: {self.problems.get(s.index, 'loading')}" for s in waiting)

    def metrics(self) -> list[Metric]:
        out = []
        for src in self.sources:
            labels = (("list", src.name),)
            out.append(Metric("blocked", self.blocked[src.index], labels=labels))
            names = src.parsed.names if src.parsed is not None else 0
            out.append(Metric("entries", names, "gauge", labels))
        ready = sum(src.parsed is not None for src in self.lists)
        out.append(Metric("lists_ready", ready, "gauge"))
        out.append(Metric("load_failures", self.load_failures))
        return out

    # --- loading ------------------------------------------------------------------------

    async def run(self) -> None:
        self.log.info("%s: loading %d lists", self.setup.where, len(self.lists))
        try:
            async with trio.open_nursery() as nursery:
                for src in self.sources:
                    nursery.start_soon(self._keep_loaded, src)
        finally:
            await self._close_client()

    async def check(self) -> list[str]:
        lines = []
        try:
            for src in self.sources:
                if src.path is not None and not src.path.is_file():
                    key = "allow" if src.allow else "lists"
                    raise self.setup.error(key, f"{src.path}: no such file")
                try:
                    data, origin = await self._fetch(src, check=True)
                except FetchError as exc:
                    raise self.setup.error("allow" if src.allow else "lists", str(exc)) from exc
                assert data is not None
                try:
                    parsed = await self._parse(src, data)
                except BadList as exc:
                    key = "allow" if src.allow else "lists"
                    raise self.setup.error(key, f"{src.spec}: {exc}") from exc
                lines.append(f"list {src.name}{origin}: {parsed.summary()}")
                lines.extend(f"  {src.name}: {p}" for p in parsed.problems[:5])
        finally:
            await self._close_client()
        return lines

    async def load_now(self) -> None:
        """Read and attach every list once, in the caller's task, instead of `run`.

        For embedding and tests that want the lists in place before the first query and
        no background timers: a list that cannot be read is counted, logged and left
        out (not retried).
        """
        try:
            for src in self.sources:
                try:
                    data, origin = await self._fetch(src)
                except FetchError as exc:
                    self.load_failures += 1
                    self.problems[src.index] = str(exc)
                    self.log.warning("%s: list %s: %s", self.setup.where, src.name, exc)
                    continue
                if data is not None:
                    await self._load(src, data, origin)
        finally:
            await self._close_client()

    async def apply_managed(self) -> None:
        """Re-read the managed allow/block files now (after the dashboard changed them), so
        the change applies to the next query without waiting for ``watch``."""
        for src in self.managed_sources:
            try:
                data = src.read_file(self.options.max_size, if_changed=True)
            except FetchError as exc:
                self._file_failed(src, exc)
                continue
            if data is not None:
                await self._load(src, data, "")

    async def refresh_now(self, index: int) -> str | None:
        """Read or download list ``index`` now (the dashboard's "refresh now"), in the
        caller's task (the HTTP client stays for `run` to close); returns the problem, or
        None when the list is current."""
        src = self.sources[index]
        try:
            data, origin = await self._fetch(src)
        except FetchError as exc:
            self.load_failures += 1
            self.problems[src.index] = str(exc)
            return str(exc)
        self.problems.pop(src.index, None)
        if data is not None:
            await self._load(src, data, origin)
        return None

    def next_refresh(self, src: Source) -> float | None:
        """Unix time the list is next read or downloaded (None: not yet tried)."""
        if src.checked_at is None:
            return None
        if src.path is not None:
            return src.checked_at + self.options.watch
        wait = self.options.retry if src.index in self.problems else self.options.refresh
        return src.checked_at + wait

    async def _keep_loaded(self, src: Source) -> None:
        if src.url is not None and src.parsed is None:
            cached = src.cached()
            if cached is not None:
                await self._load(src, cached, " (last good copy)")
            del cached  # lists are big: hold no copy while sleeping
        while True:
            try:
                data, origin = await self._fetch(src)
            except FetchError as exc:
                src.failures += 1
                self.load_failures += 1
                if src.path is None:
                    self.problems[src.index] = str(exc)
                    kept = "keeping the previous version" if src.parsed else "not loaded yet"
                    self.log.warning("%s: list %s: %s; %s", self.setup.where, src.name, exc, kept)
                    await trio.sleep(self.options.retry)
                    continue
                if self.problems.get(src.index) != str(exc):  # once per change of the problem
                    self._file_failed(src, exc)
                await trio.sleep(self.options.watch)
                continue
            self.problems.pop(src.index, None)
            if data is not None:
                await self._load(src, data, origin)
                del data
            elif src.url is not None:
                self.log.info("%s: list %s: not modified", self.setup.where, src.name)
            await trio.sleep(self.options.refresh if src.url else self.options.watch)

    def _file_failed(self, src: Source, exc: FetchError) -> None:
        """Log a list file that cannot be read: the step blocks with the other lists."""
        self.problems[src.index] = str(exc)
        key = "allow" if src.allow else "lists"
        if src.parsed is not None:
            self.log.warning(
                "%s: list %s: %s; keeping the previous version", self.setup.where, src.name, exc
            )
            return
        self.log.error(
            "%s: %s: list %s cannot be read (%s): serving without it, not ready; create the"
            " file or fix the path in the config (it is picked up within %g s of appearing)",
            self.setup.where,
            key,
            src.name,
            exc,
            self.options.watch,
        )

    async def _fetch(self, src: Source, check: bool = False) -> tuple[bytes | None, str]:
        """The list's new bytes (None: unchanged) and where they came from, for the log."""
        opts = self.options
        if not check:
            src.checked_at = time.time()
        if src.path is not None:
            return src.read_file(opts.max_size, if_changed=not check), ""
        client = await self._http()
        try:
            data = await src.download(client, opts.max_size, opts.timeout)
        except FetchError:
            cached = src.cached() if check else None
            if cached is None:
                raise
            return cached, " (last good copy: download failed)"
        if data is None and check:
            return src.cached(), " (last good copy: not modified)"
        if data is None and src.stamp() != src.seen:
            # Not modified since the kept copy, which is not the one in use: another
            # process (a `workers` sibling) downloaded it since.
            return src.cached(), " (last good copy: kept by another process)"
        return data, ""

    async def _http(self) -> Any:
        if self._client is None:
            import httpx  # only needed when a list is a URL

            self._client = httpx.AsyncClient(follow_redirects=True, timeout=self.options.timeout)
        return self._client

    async def _close_client(self) -> None:
        if self._client is not None:
            with trio.CancelScope(shield=True):
                await self._client.aclose()
            self._client = None

    async def _parse(self, src: Source, data: bytes) -> Parsed:
        opts = self.options
        parse: Callable[[], Parsed] = lambda: parse_list(  # noqa: E731
            data,
            subdomains=opts.subdomains,
            max_entries=opts.max_entries,
            max_patterns=opts.max_patterns,
        )
        async with self._parse_limiter:
            parsed = await trio.to_thread.run_sync(parse)
        if not parsed.rules and parsed.errors:
            raise BadList(f"no rules in {parsed.errors} lines: is it a blocklist?")
        if src.allow:
            parsed.kinds |= np.uint8(ALLOW)
            parsed.patterns[:] = [(p, k | ALLOW) for p, k in parsed.patterns]
        return parsed

    async def _load(self, src: Source, data: bytes, origin: str) -> None:
        """Parse and attach a list; on failure the previous version stays."""
        start = time.monotonic()
        try:
            parsed = await self._parse(src, data)
        except BadList as exc:
            self.load_failures += 1
            self.log.error(
                "%s: list %s%s: %s; keeping the previous version",
                self.setup.where,
                src.name,
                origin,
                exc,
            )
            return
        for problem in parsed.problems[:5]:
            self.log.info("%s: list %s: %s", self.setup.where, src.name, problem)
        if src.url is not None and not origin:
            src.keep(data)
        if src.url is not None:
            src.seen = src.stamp()  # the kept copy this list now is
        stamp = src.seen
        if stamp is not None:
            self.parsed_lists[self._key(src, stamp)] = parsed
        async with self._merge_lock:
            loaded = [
                (s.index, p.hashes, p.kinds, p.patterns)
                for s in self.sources
                if (p := parsed if s is src else s.parsed) is not None
            ]
            self.set = await trio.to_thread.run_sync(merge, loaded)
            self.changed()
            src.parsed = parsed  # after the swap, so ready() means "answering with it"
            src.loaded_at = time.time()
        del loaded
        _release_memory()
        ready = sum(s.parsed is not None for s in self.lists)
        self.log.info(
            "%s: list %s%s: %s in %.2f s; %d/%d lists ready, %d names",
            self.setup.where,
            src.name,
            origin,
            parsed.summary(),
            time.monotonic() - start,
            ready,
            len(self.lists),
            self.set.size,
        )


class ListNote(str):
    """A list's name, as the ``list`` note of a query it blocked, that can also say which of
    its rules matched (`rule_for`, for the query log's rule column): so a blocked answer
    makes no object of its own, and the rule's text is made only in the log's writer."""

    step: Blocklist

    def __new__(cls, step: Blocklist, name: str) -> ListNote:
        note = super().__new__(cls, name)
        note.step = step
        return note

    def rule_for(self, q: Query) -> str:
        """The rule that blocked ``q`` ("?" if the list changed since)."""
        return Match(self.step, self.step.set.decide(q.key), q.key, None).rule()


class Match:
    """The rule that decided a query, as the ``rule`` note of a traced query, a CNAME block
    or an exception that won: its text is made only when read (the query log's writer
    thread, a trace, /api/query)."""

    __slots__ = ("key", "step", "tag", "via")

    def __init__(self, step: Blocklist, tag: int, key: bytes, via: bytes | None) -> None:
        self.step = step
        self.tag = tag
        self.key = key
        self.via = via

    def rule(self) -> str:
        """The rule's text ("?" if the list changed since and no longer has the entry)."""
        return next((r for t, r in self.step.rules(self.key) if t == self.tag), "?")

    def __str__(self) -> str:
        rule = self.rule()
        if self.tag & ALLOW:
            return f"allowed by {self.step.sources[self.tag >> KIND_BITS].name}: {rule}"
        return f"{rule} (CNAME target {wire.key_to_text(self.via)})" if self.via else rule

    def __repr__(self) -> str:
        return f"<Match {self}>"


def _release_memory() -> None:
    """Hand the parser's freed buffers back to the OS.

    glibc keeps freed memory in the heap of the worker thread that parsed (a large list
    leaves much of its parse there); malloc_trim returns it. Elsewhere this is a no-op.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("blocklist", Blocklist)
