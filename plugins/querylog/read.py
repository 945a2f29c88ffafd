"""Reading the SQLite query log for the dashboard: filtered pages, one row, the overview.

Every function opens the database read-only, runs in a worker thread (the caller's
business) and never touches the writer's connection. Pages are keyset-paginated on the
rowid (newest first, ``before`` = the last rowid shown), so no page costs more than its
rows plus the index walk to them: the filtered columns (client, rcode, answered_by, ts,
and blocked through a partial index of the blocked rows) are indexed with the rowid as
trailing key (`store.SCHEMA`, `store.BLOCKED_INDEX`). A time range becomes a rowid
range through the ts index (rows are written in time order). A name filter is a
substring test on the rows walked newest first, stopping at a full page.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

CACHED, FORWARDED = "cache", "forward"  # answered_by values
ERRORS = ("SERVFAIL", "DROPPED")  # rcodes counted as errors
RESULTS = ("blocked", "cached", "forwarded", "local", "error")
_NOT_ERROR = f"rcode NOT IN {ERRORS!r}"
_NOT_BLOCKED = f"blocked = 0 AND {_NOT_ERROR}"
RESULT_SQL = {  # "blocked = 1" as the partial index `store.BLOCKED_INDEX` is written
    "blocked": f"blocked = 1 AND {_NOT_ERROR}",
    "cached": f"answered_by = '{CACHED}' AND {_NOT_BLOCKED}",
    "forwarded": f"answered_by = '{FORWARDED}' AND {_NOT_BLOCKED}",
    "error": f"rcode IN {ERRORS!r}",
    "local": f"answered_by NOT IN ('{CACHED}', '{FORWARDED}') AND {_NOT_BLOCKED}",
}
ROW_COLUMNS = ("rowid", "ts", "client", "transport", "name", "qtype", "rcode", "answered_by",
               "list", "rule", "upstream", "cache", "duration_ms", "notes",
               "client_name", "blocked")  # fmt: skip
LATENCY_ROWS = 100_000  # newest upstream answers read for the latency percentiles


def top_client(address: str, name: str | None, count: int) -> dict[str, Any]:
    """A ``top_clients`` entry: its ``name`` is there only for a named client."""
    entry: dict[str, Any] = {"client": address, "count": count}
    if name:
        entry["name"] = name
    return entry


def result_of(answered_by: str | None, rcode: str | None, blocked: bool) -> str:
    """The dashboard's result class of a row (one of `RESULTS`), as `RESULT_SQL` has it."""
    if rcode in ERRORS:
        return "error"
    if blocked:
        return "blocked"
    return {CACHED: "cached", FORWARDED: "forwarded"}.get(answered_by or "", "local")


@attrs.frozen
class Filters:
    """What the query-log page asks for; empty fields do not filter."""

    client: str = ""
    name: str = ""  # a substring of the name, lower-case
    result: str = ""  # one of RESULTS
    rcode: str = ""
    since: float | None = None  # Unix times
    until: float | None = None
    before: int | None = None  # rowid: the page starts below it
    limit: int = 50


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def _rowid_bound(db: sqlite3.Connection, ts: float, first: bool) -> int | None:
    """The first rowid at or after ``ts`` (``first``), or the last one before it."""
    sql = (
        "SELECT rowid FROM queries WHERE ts >= ? ORDER BY ts LIMIT 1"
        if first
        else "SELECT rowid FROM queries WHERE ts < ? ORDER BY ts DESC LIMIT 1"
    )
    got = db.execute(sql, (ts,)).fetchone()
    return None if got is None else int(got[0])


def page(path: Path, f: Filters) -> list[dict[str, Any]]:
    """Up to ``f.limit`` rows matching ``f``, newest first."""
    where: list[str] = []
    args: list[Any] = []
    with _connect(path) as db:
        if f.since is not None:
            low = _rowid_bound(db, f.since, True)
            if low is None:
                return []
            where.append("rowid >= ?")
            args.append(low)
        if f.until is not None:
            high = _rowid_bound(db, f.until, False)
            if high is None:
                return []
            where.append("rowid <= ?")
            args.append(high)
        if f.before is not None:
            where.append("rowid < ?")
            args.append(f.before)
        if f.client:
            where.append("client = ?")
            args.append(f.client)
        if f.rcode:
            where.append("rcode = ?")
            args.append(f.rcode)
        if f.result:
            where.append(RESULT_SQL[f.result])
        if f.name:
            where.append("instr(name, ?) > 0")
            args.append(f.name)
        sql = f"SELECT {', '.join(ROW_COLUMNS)} FROM queries"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = db.execute(sql + " ORDER BY rowid DESC LIMIT ?", (*args, f.limit)).fetchall()
    return [_doc(r) for r in rows]


def one(path: Path, rowid: int) -> dict[str, Any] | None:
    """The row ``rowid``, or None."""
    with _connect(path) as db:
        got = db.execute(
            f"SELECT {', '.join(ROW_COLUMNS)} FROM queries WHERE rowid = ?", (rowid,)
        ).fetchone()
    return None if got is None else _doc(got)


def _doc(r: tuple[Any, ...]) -> dict[str, Any]:
    doc = dict(zip(ROW_COLUMNS, r, strict=True))
    doc["blocked"] = bool(doc["blocked"])
    doc["result"] = result_of(doc["answered_by"], doc["rcode"], doc["blocked"])
    return doc


def overview(path: Path, now: float, span: float, step: float, top: int) -> dict[str, Any]:
    """Over the last ``span`` seconds: per ``step`` counts by result (the chart), totals,
    top names, top blocked names, top clients; per upstream over the last hour, answers
    and latency percentiles (p50, p99 of the newest `LATENCY_ROWS`)."""
    since = now - span
    start = since - since % step
    with _connect(path) as db:
        low = _rowid_bound(db, since, True)
        if low is None:
            low = 1 << 62
        series = db.execute(
            "SELECT CAST((ts - ?) / ? AS INTEGER) AS b, count(*),"
            f" sum({RESULT_SQL['blocked']}), sum({RESULT_SQL['cached']}),"
            f" sum({RESULT_SQL['forwarded']}), sum({RESULT_SQL['error']})"
            " FROM queries WHERE rowid >= ? GROUP BY b ORDER BY b",
            (start, step, low),
        ).fetchall()

        def top_of(column: str, extra: str = "") -> list[tuple[str, int]]:
            return db.execute(
                f"SELECT {column}, count(*) FROM queries WHERE rowid >= ? {extra}"
                f" GROUP BY {column} ORDER BY 2 DESC, 1 LIMIT ?",
                (low, top),
            ).fetchall()

        names = top_of("name")
        blocked = top_of("name", f"AND {RESULT_SQL['blocked']}")
        clients = db.execute(
            "SELECT client, max(client_name), count(*) FROM queries WHERE rowid >= ?"
            " GROUP BY client ORDER BY 3 DESC, 1 LIMIT ?",
            (low, top),
        ).fetchall()
        hour = _rowid_bound(db, now - 3600, True)
        latency = (
            []
            if hour is None
            else db.execute(
                "SELECT upstream, duration_ms FROM queries WHERE rowid >= ?"
                " AND upstream IS NOT NULL ORDER BY rowid DESC LIMIT ?",
                (hour, LATENCY_ROWS),
            ).fetchall()
        )
    buckets = int(span // step) + 1
    chart: dict[str, list[float]] = {
        k: [0] * buckets for k in ("queries", "blocked", "cached", "forwarded", "error")
    }
    chart["time"] = [start + i * step for i in range(buckets)]
    for b, total, nb, nc, nf, ne in series:
        if 0 <= b < buckets:
            for key, value in zip(chart, (total, nb, nc, nf, ne), strict=False):
                chart[key][b] = value or 0
    totals = {k: sum(v) for k, v in chart.items() if k != "time"}
    by_upstream: dict[str, list[float]] = {}
    for upstream, ms in latency:
        by_upstream.setdefault(upstream, []).append(ms or 0.0)
    upstreams = []
    for name, values in sorted(by_upstream.items()):
        values.sort()
        upstreams.append(
            {
                "upstream": name,
                "answers": len(values),
                "p50_ms": _quantile(values, 0.5),
                "p99_ms": _quantile(values, 0.99),
            }
        )
    return {
        "chart": chart,
        "totals": totals,
        "top_names": [{"name": n, "count": c} for n, c in names],
        "top_blocked": [{"name": n, "count": c} for n, c in blocked],
        "top_clients": [top_client(a, n, c) for a, n, c in clients],
        "upstreams": upstreams,
    }


def _quantile(sorted_values: list[float], q: float) -> float:
    return round(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))], 2)


def rcodes(path: Path) -> list[str]:
    """The rcodes the log holds (for the filter's choices; a few index seeks)."""
    out: list[str] = []
    with _connect(path) as db:
        last = ""
        while True:
            got = db.execute(
                "SELECT rcode FROM queries WHERE rcode > ? ORDER BY rcode LIMIT 1", (last,)
            ).fetchone()
            if got is None or len(out) >= 32:
                return out
            last = got[0]
            out.append(last)
