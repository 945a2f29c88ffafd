"""querylog — one record per query, to an SQLite database and/or JSON lines.

The step (`QueryLog`: its buffer, the writer task with the flush and maintenance timers,
its counters), which is also the observer of its server's queries (`QueryLog.record`)
and what the HTTP API reads (`QueryLogReader`). The files and their bounds are in
`store`. README.md beside this file documents options, bounds, metrics and examples.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import Observer, QueryLogReader, hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply
from dnsproxy.wire import Query

from .read import top_client
from .store import Entry, QueryLogOptions, Store

if TYPE_CHECKING:
    from dnsproxy.server import Server

DROP_WARN_EVERY = 60.0  # seconds between warnings about a full buffer
T = TypeVar("T")


class QueryLog(Step):
    """A chain step only so that it is configured per chain and gets `run()`."""

    Options = QueryLogOptions
    pure = True  # it never answers: its observer sees every query, replayed ones too

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
        names = setup.clients.name if setup.clients.enabled else None
        self.store = Store(opts, db_path, jsonl, self.log, setup.where, names)
        self.buffer: list[Entry] = []
        self.limit = opts.buffer
        self.written = 0
        self.dropped = 0
        self.pruned = 0
        self.write_errors = 0
        self.dropped_reported = 0
        self.drop_warned = -DROP_WARN_EVERY

    def record(self, q: Query, reply: Reply | None, elapsed: float) -> None:
        """The observer (hot path): buffer the entry or count the drop."""
        if len(self.buffer) >= self.limit:
            self.dropped += 1
            return
        self.buffer.append((time.time(), q, reply, elapsed))

    async def run(self) -> None:
        """Flush every ``flush_interval``, maintain the database every ``prune_interval``;
        nothing in a worker process (`Setup.worker`: the supervisor writes its records)."""
        if self.setup.worker is not None:
            return
        flush_every, prune_every = self.options.flush_interval, self.options.prune_interval
        try:
            await trio.to_thread.run_sync(self.store.open)
            where = [str(p.absolute()) for p in (self.store.db_path, self.store.jsonl) if p]
            self.log.info("%s: logging queries to %s", self.setup.where, ", ".join(where))
            self.pruned += await self._off_loop(self.store.prepare, time.time()) or 0
            now = trio.current_time()
            next_flush, next_prune = now + flush_every, now + prune_every
            while True:
                await trio.sleep_until(min(next_flush, next_prune))
                now = trio.current_time()
                if now >= next_flush:
                    await self.flush_now()
                    next_flush = trio.current_time() + flush_every
                if now >= next_prune:
                    await self.prune_now()
                    next_prune = trio.current_time() + prune_every
        finally:
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
        done = await self._off_loop(self.store.write, batch)
        if done is not None:
            self.written += done[0]
            self.pruned += done[1]

    async def prune_now(self) -> None:
        """Apply retention and the size cap and give the space back, with no query needed."""
        removed = await self._off_loop(self.store.maintain, time.time())
        self.pruned += removed or 0

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)`` in a worker thread; a failure is counted, logged and gives None."""
        try:
            return await trio.to_thread.run_sync(fn, *args)
        except (sqlite3.Error, OSError) as exc:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 100 == 0:
                self.log.error(
                    "%s: cannot write the query log (%d failures): %s",
                    self.setup.where,
                    self.write_errors,
                    exc,
                )
            return None

    async def check(self) -> list[str]:
        await trio.to_thread.run_sync(self.store.open)
        await trio.to_thread.run_sync(self.store.close)
        where = [str(p) for p in (self.store.db_path, self.store.jsonl) if p is not None]
        return [f"logging to {', '.join(where)}"]

    def counters(self) -> dict[str, int]:
        """`QueryLogReader.counters`: what `metrics` reports, by name."""
        return {m.name: int(m.value) for m in self.metrics()}

    def summary(self, now: float, windows: Mapping[str, float], top: int) -> dict[str, Any] | None:
        """`QueryLogReader.summary`: `db_stats` of the database; None without one."""
        path = self.db()
        return None if path is None else db_stats(path, now, windows, top)

    def db(self) -> Path | None:
        """The SQLite file the dashboard reads (`read`), once this step's writer has it
        open: a file it has not opened (yet, or could not) may lack today's columns."""
        return self.store.db_path if self.store.db is not None else None

    def metrics(self) -> list[Metric]:
        return [
            Metric("records", self.written, help="Query log records written."),
            Metric("dropped", self.dropped, help="Records dropped because the buffer was full."),
            Metric("pruned", self.pruned, help="Rows removed by retention or max_size_mb."),
            Metric("write_errors", self.write_errors, help="Writes or clean-ups that failed."),
            Metric("buffered", len(self.buffer), kind="gauge", help="Records waiting."),
        ]


def db_stats(path: Path, now: float, windows: Mapping[str, float], top: int) -> dict[str, Any]:
    """Queries, blocked share, top blocked names and top clients per window (read-only)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        out = {}
        for label, span in windows.items():
            since = now - span
            total, nblocked = db.execute(
                "SELECT count(*), coalesce(sum(blocked), 0) FROM queries WHERE ts >= ?",
                (since,),
            ).fetchone()
            names = db.execute(
                "SELECT name, count(*) FROM queries WHERE ts >= ? AND blocked = 1"
                " GROUP BY name ORDER BY 2 DESC, 1 LIMIT ?",
                (since, top),
            ).fetchall()
            clients = db.execute(
                "SELECT client, max(client_name), count(*) FROM queries WHERE ts >= ?"
                " GROUP BY client ORDER BY 3 DESC, 1 LIMIT ?",
                (since, top),
            ).fetchall()
            out[label] = {
                "queries": total,
                "blocked": nblocked,
                "blocked_share": round(nblocked / total, 4) if total else 0.0,
                "top_blocked": [{"name": n, "count": c} for n, c in names],
                "top_clients": [top_client(a, n, c) for a, n, c in clients],
            }
        return out
    finally:
        db.close()


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("querylog", QueryLog)


@hookimpl
def dnsproxy_observers(server: Server) -> list[Observer] | None:
    """The `QueryLog.record` of each querylog step in ``server``'s current chain."""
    return [s.record for s in server.chain.steps if isinstance(s, QueryLog)] or None


@hookimpl
def dnsproxy_query_logs(server: Server) -> list[QueryLogReader] | None:
    """The querylog steps of ``server``'s current chain, for the HTTP API's stats."""
    return [s for s in server.chain.steps if isinstance(s, QueryLog)] or None
