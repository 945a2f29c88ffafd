"""The on-disk side of the query log: rows, SQLite with its bounds, JSON lines.

Everything here runs in a worker thread (one at a time), never on the query path.

Size bound: ``max_size_mb`` covers the database and its WAL together. After every batch
(a cheap check: two pragmas and a ``stat``) and on the maintenance timer, when the two
exceed the cap the oldest rows are deleted down to ``LOW_WATER`` of the cap, in chunks of
``CHUNK`` of it; after each chunk the freed pages go back to the file system (incremental
vacuum of the whole free list) and the WAL is checkpointed and truncated, so that the
clean-up itself does not grow the WAL. Between checks the WAL is held to ``WAL_SHARE`` of
the cap by ``wal_autocheckpoint`` and ``journal_size_limit``. So the files exceed the cap
only while a batch is being written, by about that batch.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import dns.rcode
import dns.rdatatype

from dnsproxy import options
from dnsproxy.reply import Reply
from dnsproxy.wire import Query, key_to_text

NOTE_COLUMNS = ("list", "rule", "upstream", "cache")
LOW_WATER = 0.8  # trimming stops when the rows fill this share of max_size_mb
CHUNK = 0.05  # share of max_size_mb (or of a larger file) deleted per step of a trim
WAL_SHARE = 0.1  # share of max_size_mb the WAL may hold between checkpoints
VACUUM_AT_START = 256_000_000  # bytes: a file without auto_vacuum is rebuilt when smaller
AUTO_VACUUM_INCREMENTAL = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts REAL NOT NULL, client TEXT, transport TEXT, name TEXT, qtype TEXT, rcode TEXT,
    answered_by TEXT, list TEXT, rule TEXT, upstream TEXT, cache TEXT,
    duration_ms REAL, notes TEXT, client_name TEXT, blocked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE INDEX IF NOT EXISTS queries_client ON queries (client);
CREATE INDEX IF NOT EXISTS queries_rcode ON queries (rcode);
CREATE INDEX IF NOT EXISTS queries_answered_by ON queries (answered_by);
"""
# Only blocked rows enter it (a write of any other row does not touch it); a query uses it
# when its WHERE has the term ``blocked = 1`` as written here.
BLOCKED_INDEX = "CREATE INDEX IF NOT EXISTS queries_blocked ON queries (blocked) WHERE blocked = 1"

Entry = tuple[float, Query, Reply | None, float]  # (time, query, reply or None, elapsed)


@attrs.frozen
class QueryLogOptions:
    sqlite: bool = True
    database: str = ""
    jsonl: str = ""
    retention: float = options.seconds(7 * 86400.0, 60, 3650 * 86400)
    max_size_mb: int = attrs.field(default=100, validator=options.in_range(1, 1_000_000))
    buffer: int = attrs.field(default=10000, validator=options.in_range(10, 10_000_000))
    flush_interval: float = options.seconds(1.0, 0.01, 60)
    prune_interval: float = options.seconds(5.0, 0.05, 3600)
    anonymize: bool = False
    ipv4_prefix: int = attrs.field(default=24, validator=options.in_range(0, 32))
    ipv6_prefix: int = attrs.field(default=56, validator=options.in_range(0, 128))


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
            text = self.names[key] = key_to_text(key, final_dot=True)
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
    entry: Entry,
    client: Callable[[str], str],
    texts: Texts,
    name: Callable[[Query], str | None] | None = None,
) -> tuple[Any, ...]:
    """One buffered entry as a table row (in the writer thread, never on the hot path);
    ``name`` gives the client's name ([clients], leases, PTR), None to log none."""
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
    if q.client_id is not None:  # the DoT/DoH client identifier, beside the notes
        rest = {**(rest or {}), "client_id": q.client_id}
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
        None if name is None else name(q),
        1 if reply is not None and reply.blocked else 0,
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
    "client_name",
    "blocked",
)
INSERT = f"INSERT INTO queries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class Store:
    """SQLite and JSON lines, bounded in age and size. Used from one worker thread at a time."""

    def __init__(
        self,
        opts: QueryLogOptions,
        db_path: Path | None,
        jsonl: Path | None,
        log: logging.Logger,
        where: str,
        names: Callable[[Query], str | None] | None = None,
    ) -> None:
        self.opts = opts
        # client names are not logged when addresses are anonymised
        self.names = None if opts.anonymize else names
        self.db_path = db_path
        self.wal_path = None if db_path is None else db_path.with_name(db_path.name + "-wal")
        self.jsonl = jsonl
        self.log = log
        self.where = where
        self.cap = opts.max_size_mb * 1_000_000
        self.db: sqlite3.Connection | None = None
        self.page_size = 4096
        self.texts = Texts()
        self.client: Callable[[str], str] = (
            Anonymizer(opts.ipv4_prefix, opts.ipv6_prefix) if opts.anonymize else _identity
        )

    def open(self) -> None:
        if self.db_path is not None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            self.page_size = db.execute("PRAGMA page_size").fetchone()[0]
            wal_pages = max(16, int(self.cap * WAL_SHARE) // self.page_size)
            db.execute(f"PRAGMA wal_autocheckpoint = {wal_pages}")
            db.execute(f"PRAGMA journal_size_limit = {wal_pages * self.page_size}")
            db.executescript(SCHEMA)
            columns = {r[1] for r in db.execute("PRAGMA table_info(queries)")}
            if "client_name" not in columns:  # a file from before client names
                db.execute("ALTER TABLE queries ADD COLUMN client_name TEXT")
            if "blocked" not in columns:  # from before: only the blocklist's rows were blocked
                self._add_blocked(db)
            db.execute(BLOCKED_INDEX)
            self.db = db
        if self.jsonl is not None:
            self.jsonl.parent.mkdir(parents=True, exist_ok=True)

    def _add_blocked(self, db: sqlite3.Connection) -> None:
        """Add the ``blocked`` column to a file from before it, marking the rows that were
        counted as blocked then (the blocklist's), in one transaction."""
        with _transaction(db):
            db.execute("ALTER TABLE queries ADD COLUMN blocked INTEGER NOT NULL DEFAULT 0")
            marked = db.execute(
                "UPDATE queries SET blocked = 1 WHERE answered_by = 'blocklist'"
            ).rowcount
        self.log.info(
            "%s: %s: added the blocked column, %d blocklist rows marked blocked",
            self.where,
            self.db_path,
            marked,
        )

    def prepare(self, now: float) -> int:
        """At start-up: bring the open file under the bounds, rebuild it if it cannot shrink.

        Returns the rows removed.
        """
        if self.db is None:
            return 0
        removed = self.maintain(now)
        if self.db.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
            # a file created without auto_vacuum never shrinks; switching needs a rebuild
            if self._content() <= VACUUM_AT_START:
                self.db.execute("PRAGMA auto_vacuum = INCREMENTAL")
                self.db.execute("VACUUM")
                self.log.info("%s: %s rebuilt with auto_vacuum", self.where, self.db_path)
            else:
                self.log.warning(
                    "%s: %s was created without auto_vacuum and does not shrink; stop"
                    " dnsproxy and run: sqlite3 %s 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM'",
                    self.where,
                    self.db_path,
                    self.db_path,
                )
        return removed

    def write(self, batch: list[Entry]) -> tuple[int, int]:
        """Append a batch; keep the size cap. Returns (rows written, rows removed)."""
        client, texts = self.client, self.texts
        rows = [row(e, client, texts, self.names) for e in batch]
        removed = 0
        if self.db is not None and rows:
            with _transaction(self.db):
                self.db.executemany(INSERT, rows)
            removed = self.trim()
        if self.jsonl is not None and rows:
            self._append_jsonl(rows)
        return len(rows), removed

    def _append_jsonl(self, rows: list[tuple[Any, ...]]) -> None:
        assert self.jsonl is not None
        lines = []
        for r in rows:
            doc = {k: v for k, v in zip(COLUMNS, r, strict=True) if v is not None}
            if "notes" in doc:
                doc["notes"] = json.loads(doc["notes"])
            if doc.pop("blocked"):  # like an empty column, "not blocked" is left out
                doc["blocked"] = True
            lines.append(json.dumps(doc, separators=(",", ":")))
        try:
            if self.jsonl.stat().st_size >= self.cap:
                self.jsonl.replace(self.jsonl.with_name(self.jsonl.name + ".1"))
        except FileNotFoundError:
            pass
        with self.jsonl.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def maintain(self, now: float) -> int:
        """Retention, then the size cap, then free pages and the WAL back to the disk."""
        if self.db is None:
            return 0
        removed = 0
        chunk = self._chunk()
        while chunk:
            n = self._delete_oldest(chunk, now - self.opts.retention)
            removed += n
            self._shrink()
            if n < chunk:
                break
        removed += self.trim()
        self._shrink()
        return removed

    def trim(self) -> int:
        """When the database and WAL exceed the cap, delete the oldest rows to LOW_WATER."""
        assert self.db is not None
        if self.size() <= self.cap:
            return 0
        removed = 0
        chunk = self._chunk()
        while chunk and self._content() > self.cap * LOW_WATER:
            n = self._delete_oldest(chunk)
            if not n:
                break
            removed += n
            self._shrink()
        if not removed:
            self._shrink()  # the WAL alone was over
        return removed

    def size(self) -> int:
        """Bytes of the database (as this connection sees it) plus its WAL file."""
        assert self.db is not None and self.wal_path is not None
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        try:
            wal = self.wal_path.stat().st_size
        except FileNotFoundError:
            wal = 0
        return int(pages * self.page_size + wal)

    def _content(self) -> int:
        assert self.db is not None
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        free = self.db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * self.page_size)

    def _chunk(self) -> int:
        """About CHUNK of the cap (or of the rows, when they hold more) as a row count."""
        assert self.db is not None
        lo, hi = self.db.execute("SELECT min(rowid), max(rowid) FROM queries").fetchone()
        if lo is None:
            return 0
        content = max(self._content(), 1)
        return max(1, int((hi - lo + 1) * CHUNK * max(self.cap, content) / content))

    def _delete_oldest(self, limit: int, before: float | None = None) -> int:
        assert self.db is not None
        if before is None:
            sql = "SELECT rowid FROM queries ORDER BY rowid LIMIT ?"
            args: tuple[float, ...] = (limit,)
        else:
            sql = "SELECT rowid FROM queries WHERE ts < ? ORDER BY ts LIMIT ?"
            args = (before, limit)
        return self.db.execute(f"DELETE FROM queries WHERE rowid IN ({sql})", args).rowcount

    def _shrink(self) -> None:
        """Return every free page to the file system and empty the WAL."""
        assert self.db is not None
        # executescript steps the pragma to the end; execute() would free a single page
        self.db.executescript("PRAGMA incremental_vacuum;")
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _identity(host: str) -> str:
    return host


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction on an autocommit connection: committed, or rolled back on error."""
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
