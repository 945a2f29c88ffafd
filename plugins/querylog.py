"""querylog — one record per query, to an SQLite database and/or JSON lines.

Description
    Records every query the server answers (or drops): time, client, name, type, rcode,
    the step that answered (``answered_by``), what the steps noted about it (the ``list``
    and ``rule`` that matched, the ``upstream`` used, ``cache`` hit/miss/stale) and how
    long it took.

    Design: the step itself does nothing per query in the chain. The module implements
    an observer (hook ``dnsproxy_observers``, only when a querylog step is configured)
    that appends ``(time, query, reply,
    elapsed)`` to the buffer of each live querylog step — one tuple per query, no
    formatting, no lock, no I/O. A full buffer drops the record and counts it
    (``dnsproxy_querylog_dropped``). The step's background task (`run`) swaps the buffer
    out every ``flush_interval`` and writes the batch from a worker thread: formatting,
    one SQLite transaction, one JSON-lines append. The buffer bound is also the cost
    bound: at most ``buffer`` records are written per ``flush_interval`` (about 5-10 µs
    of CPU each), so under a flood the log drops records rather than slow answers down
    (warned once a minute, counted in ``dnsproxy_querylog_dropped``). The live steps
    are those of the most recently started chain, so a reload never logs a query twice;
    a retired step writes what it still holds before it goes.

    Bounds: ``buffer`` records in memory; the database keeps ``retention`` and at most
    ``max_size_mb`` (oldest rows go first); the JSON-lines file is rotated to ``.1`` at
    ``max_size_mb`` (so at most twice that on disk).

    ``anonymize = true`` keeps only the client's network prefix (``ipv4_prefix``,
    ``ipv6_prefix``), as Pi-hole's and AdGuard Home's privacy modes do.

    ``zones``/``clients`` on this step are accepted but do not filter: every query is logged.

Syntax
    ::

        [[chain]]
        plugin = "querylog"
        sqlite = true               # the embedded database (default on)
        database = ""               # default: <state_dir>/querylog.sqlite
        jsonl = ""                  # a JSON-lines file; "" = off
        retention = "7d"
        max_size_mb = 100
        buffer = 10000              # records held between flushes; beyond: dropped, counted
        flush_interval = "1s"
        anonymize = false
        ipv4_prefix = 24
        ipv6_prefix = 56

    Table ``queries`` columns: ts (unix seconds), client, transport, name, qtype, rcode,
    answered_by, list, rule, upstream, cache, duration_ms, notes (the rest, JSON).

Metrics
    ``dnsproxy_querylog_records_total`` (written), ``dnsproxy_querylog_dropped_total``
    (buffer full), ``dnsproxy_querylog_write_errors_total``, ``dnsproxy_querylog_buffered``.

Examples
    Keep a day of queries in SQLite and also ship JSON lines::

        [[chain]]
        plugin = "querylog"
        retention = "1d"
        jsonl = "/var/log/dnsproxy/queries.jsonl"

        [[chain]]
        plugin = "forward"
        upstreams = ["192.0.2.53"]

    Then: ``sqlite3 .dnsproxy-state/querylog.sqlite "select name, count(*) from queries
    where answered_by = 'blocklist' group by name order by 2 desc limit 10"``.
"""

from __future__ import annotations

import ipaddress
import json
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from dnsproxy import options
from dnsproxy.chain import Chain, Metric, Setup, Step
from dnsproxy.hookspecs import Observer, hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply
from dnsproxy.wire import Query

if TYPE_CHECKING:
    from dnsproxy.server import Server

PRUNE_EVERY = 60.0  # seconds between retention/size checks of the database
DROP_WARN_EVERY = 60.0  # seconds between warnings about a full buffer
BLOCKING_SOURCES = ("blocklist",)  # answered_by values that count as "blocked" in stats
NOTE_COLUMNS = ("list", "rule", "upstream", "cache")

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts REAL NOT NULL, client TEXT, transport TEXT, name TEXT, qtype TEXT, rcode TEXT,
    answered_by TEXT, list TEXT, rule TEXT, upstream TEXT, cache TEXT,
    duration_ms REAL, notes TEXT
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
"""


@attrs.frozen
class QueryLogOptions:
    sqlite: bool = True
    database: str = ""
    jsonl: str = ""
    retention: float = options.seconds(7 * 86400.0, 60, 3650 * 86400)
    max_size_mb: int = attrs.field(default=100, validator=options.in_range(1, 1_000_000))
    buffer: int = attrs.field(default=10000, validator=options.in_range(10, 10_000_000))
    flush_interval: float = options.seconds(1.0, 0.01, 60)
    anonymize: bool = False
    ipv4_prefix: int = attrs.field(default=24, validator=options.in_range(0, 32))
    ipv6_prefix: int = attrs.field(default=56, validator=options.in_range(0, 128))


_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")


def key_text(key: bytes) -> str:
    """The text of a lower-cased wire name ("example.org."), cheaply for ordinary names."""
    labels = []
    off = 0
    while key[off]:
        length = key[off]
        label = key[off + 1 : off + 1 + length]
        if not _SAFE.issuperset(label):
            return dns.name.from_wire(key, 0)[0].to_text()
        labels.append(label.decode("ascii"))
        off += length + 1
    return ".".join(labels) + "."


class Anonymizer:
    """Client address -> its network prefix (cached: clients repeat)."""

    def __init__(self, v4: int, v6: int) -> None:
        self.v4 = v4
        self.v6 = v6
        self.cache: dict[str, str] = {}

    def __call__(self, host: str) -> str:
        out = self.cache.get(host)
        if out is None:
            try:
                addr = ipaddress.ip_address(host.partition("%")[0])
            except ValueError:
                return ""
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            bits = self.v4 if addr.version == 4 else self.v6
            out = str(ipaddress.ip_network(f"{addr}/{bits}", strict=False).network_address)
            if len(self.cache) >= 65536:
                self.cache.clear()
            self.cache[host] = out
        return out


class Texts:
    """Memoised text forms: names, types and rcodes repeat, and dnspython's are slow."""

    def __init__(self, limit: int = 65536) -> None:
        self.limit = limit
        self.names: dict[bytes, str] = {}
        self.qtypes: dict[int, str] = {}
        self.rcodes: dict[int, str] = {}

    def name(self, key: bytes) -> str:
        text = self.names.get(key)
        if text is None:
            if len(self.names) >= self.limit:
                self.names.clear()
            text = self.names[key] = key_text(key)
        return text

    def qtype(self, qtype: int) -> str:
        text = self.qtypes.get(qtype)
        if text is None:
            text = self.qtypes[qtype] = dns.rdatatype.to_text(qtype)
        return text

    def rcode(self, rcode: int) -> str:
        text = self.rcodes.get(rcode)
        if text is None:
            text = self.rcodes[rcode] = dns.rcode.to_text(rcode)
        return text


def row(
    entry: tuple[float, Query, Reply | None, float], client: Any, texts: Texts
) -> tuple[Any, ...]:
    """One buffered entry as a table row (in the writer thread, never on the hot path)."""
    ts, q, reply, elapsed = entry
    notes = q.notes
    picked: list[Any] = [None, None, None, None]
    rest = None
    if notes:
        for key, value in notes.items():
            if key in NOTE_COLUMNS:
                picked[NOTE_COLUMNS.index(key)] = str(value)
            else:
                if rest is None:
                    rest = {}
                rest[key] = value
        if picked[1] is None and picked[0] is not None:  # a list that can name its rule
            rule_for = getattr(notes["list"], "rule_for", None)
            if rule_for is not None:
                picked[1] = rule_for(q)
    return (
        ts,
        client(q.client[0]),
        q.transport,
        texts.name(q.key),
        texts.qtype(q.qtype),
        "DROPPED" if reply is None else texts.rcode(reply.rcode),
        "" if reply is None else reply.source,
        *picked,
        round(elapsed * 1000, 3),
        json.dumps(rest, default=str) if rest else None,
    )


COLUMNS = (
    "ts",
    "client",
    "transport",
    "name",
    "qtype",
    "rcode",
    "answered_by",
    *NOTE_COLUMNS,
    "duration_ms",
    "notes",
)
INSERT = f"INSERT INTO queries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Store:
    """The on-disk side: SQLite and JSON lines. Used from one worker thread at a time."""

    def __init__(self, opts: QueryLogOptions, db_path: Path | None, jsonl: Path | None) -> None:
        self.opts = opts
        self.db_path = db_path
        self.jsonl = jsonl
        self.cap = opts.max_size_mb * 1_000_000
        self.db: sqlite3.Connection | None = None
        self.last_prune = 0.0
        self.texts = Texts()
        self.client = (
            Anonymizer(opts.ipv4_prefix, opts.ipv6_prefix) if opts.anonymize else _identity
        )

    def open(self) -> None:
        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.executescript(SCHEMA)
            self.db = db
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def write(self, batch: list[tuple[float, Query, Reply | None, float]]) -> int:
        client, texts = self.client, self.texts
        rows = [row(e, client, texts) for e in batch]
        if self.db is not None and rows:
            self.db.execute("BEGIN")
            try:
                self.db.executemany(INSERT, rows)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
        if self.jsonl is not None and rows:
            self._append_jsonl(rows)
        now = time.time()
        if self.db is not None and now - self.last_prune >= PRUNE_EVERY:
            self.prune(now)
        return len(rows)

    def _append_jsonl(self, rows: list[tuple[Any, ...]]) -> None:
        assert self.jsonl is not None
        lines = []
        for r in rows:
            doc = {k: v for k, v in zip(COLUMNS, r, strict=True) if v is not None}
            if "notes" in doc:
                doc["notes"] = json.loads(doc["notes"])
            lines.append(json.dumps(doc, separators=(",", ":")))
        try:
            if self.jsonl.stat().st_size >= self.cap:
                self.jsonl.replace(self.jsonl.with_name(self.jsonl.name + ".1"))
        except FileNotFoundError:
            pass
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def prune(self, now: float) -> None:
        """Apply retention, then the size cap (oldest rows first)."""
        assert self.db is not None
        self.last_prune = now
        db = self.db
        db.execute("DELETE FROM queries WHERE ts < ?", (now - self.opts.retention,))
        while self._used() > self.cap:
            total = db.execute("SELECT count(*) FROM queries").fetchone()[0]
            if not total:
                break
            db.execute(
                "DELETE FROM queries WHERE rowid IN "
                "(SELECT rowid FROM queries ORDER BY rowid LIMIT ?)",
                (max(1, total // 10),),
            )
        db.execute("PRAGMA incremental_vacuum")

    def _used(self) -> int:
        assert self.db is not None
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.db.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _identity(host: str) -> str:
    return host


class QueryLog(Step):
    """A chain step only so that it is configured per chain and gets `run()`."""

    Options = QueryLogOptions

    def __init__(self, opts: QueryLogOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        db_path = None
        if opts.sqlite:
            db_path = setup.path(opts.database) if opts.database else None
            if db_path is None:
                db_path = setup.state_dir / "querylog.sqlite"
        jsonl = setup.path(opts.jsonl) if opts.jsonl else None
        if db_path is None and jsonl is None:
            raise setup.error("sqlite", "with sqlite = false, set jsonl (or nothing is logged)")
        self.store = Store(opts, db_path, jsonl)
        self.buffer: list[tuple[float, Query, Reply | None, float]] = []
        self.limit = opts.buffer
        self.written = 0
        self.dropped = 0
        self.write_errors = 0
        self.dropped_reported = 0
        self.drop_warned = -DROP_WARN_EVERY

    def record(self, q: Query, reply: Reply | None, elapsed: float) -> None:
        """Hot path (from the observer hook): buffer the entry or count the drop."""
        if len(self.buffer) >= self.limit:
            self.dropped += 1
            return
        self.buffer.append((time.time(), q, reply, elapsed))

    async def run(self) -> None:
        await trio.to_thread.run_sync(self.store.open)
        _activate(self)
        try:
            while True:
                await trio.sleep(self.options.flush_interval)
                await self.flush_now()
        finally:
            _deactivate(self)
            with trio.CancelScope(shield=True):
                await self.flush_now()
                await trio.to_thread.run_sync(self.store.close)

    async def flush_now(self) -> None:
        """Write what is buffered (from a worker thread); say so if records were dropped."""
        if self.dropped != self.dropped_reported:
            now = trio.current_time()
            if now - self.drop_warned >= DROP_WARN_EVERY:
                self.log.warning(
                    "%s: buffer full, %d records dropped so far (raise buffer or lower"
                    " flush_interval)",
                    self.setup.where,
                    self.dropped,
                )
                self.drop_warned = now
                self.dropped_reported = self.dropped
        if not self.buffer:
            return
        batch, self.buffer = self.buffer, []
        try:
            self.written += await trio.to_thread.run_sync(self.store.write, batch)
        except (sqlite3.Error, OSError) as exc:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                self.log.error(
                    "%s: cannot write the query log (%d failed batches): %s",
                    self.setup.where,
                    self.write_errors,
                    exc,
                )

    async def check(self) -> list[str]:
        await trio.to_thread.run_sync(self.store.open)
        await trio.to_thread.run_sync(self.store.close)
        where = [str(p) for p in (self.store.db_path, self.store.jsonl) if p is not None]
        return [f"logging to {', '.join(where)}"]

    def metrics(self) -> list[Metric]:
        return [
            Metric("records", self.written, help="Query log records written."),
            Metric("dropped", self.dropped, help="Records dropped because the buffer was full."),
            Metric("write_errors", self.write_errors, help="Batches that failed to write."),
            Metric("buffered", len(self.buffer), kind="gauge", help="Records waiting."),
        ]


# --- routing the observer hook to the live steps -----------------------------------------

_live: list[QueryLog] = []  # the querylog steps of the newest running chain


def _activate(step: QueryLog) -> None:
    if _live and _live[0].chain is not step.chain:
        _live.clear()  # a newer chain took over: its steps log from now on
    if step not in _live:
        _live.append(step)


def _deactivate(step: QueryLog) -> None:
    if step in _live:
        _live.remove(step)


def live_database(chain: Chain | None) -> Path | None:
    """The SQLite file of a querylog step in ``chain`` (for the HTTP API's stats)."""
    if chain is None:
        return None
    for step in chain.steps:
        if isinstance(step, QueryLog) and step.store.db_path is not None:
            return step.store.db_path
    return None


def db_stats(path: Path, now: float, windows: dict[str, float], top: int) -> dict[str, Any]:
    """Queries, blocked share, top blocked names and top clients per window (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    blocked = ",".join("?" * len(BLOCKING_SOURCES))
    try:
        out = {}
        for label, span in windows.items():
            since = now - span
            total, nblocked = db.execute(
                f"SELECT count(*), coalesce(sum(answered_by IN ({blocked})), 0)"
                " FROM queries WHERE ts >= ?",
                (*BLOCKING_SOURCES, since),
            ).fetchone()
            names = db.execute(
                f"SELECT name, count(*) FROM queries WHERE ts >= ? AND answered_by IN ({blocked})"
                " GROUP BY name ORDER BY 2 DESC, 1 LIMIT ?",
                (since, *BLOCKING_SOURCES, top),
            ).fetchall()
            clients = db.execute(
                "SELECT client, count(*) FROM queries WHERE ts >= ?"
                " GROUP BY client ORDER BY 2 DESC, 1 LIMIT ?",
                (since, top),
            ).fetchall()
            out[label] = {
                "queries": total,
                "blocked": nblocked,
                "blocked_share": round(nblocked / total, 4) if total else 0.0,
                "top_blocked": [{"name": n, "count": c} for n, c in names],
                "top_clients": [{"client": n, "count": c} for n, c in clients],
            }
        return out
    finally:
        db.close()


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("querylog", QueryLog)


@hookimpl
def dnsproxy_observers(server: Server) -> list[Observer] | None:
    if any(isinstance(step, QueryLog) for step in server.chain.steps):
        return [observe]
    return None


def observe(query: Query, reply: Reply | None, elapsed: float) -> None:
    """Hand a finished query to the live querylog steps (hot path: an append each)."""
    for step in _live:
        step.record(query, reply, elapsed)
