"""querylog: options, bounded buffering, SQLite and JSON lines, retention, size cap, stats."""

from __future__ import annotations

import json
import sqlite3
import time
from types import SimpleNamespace

import pytest
import trio
from dnsproxy.plugins import querylog
from dnsproxy.plugins.querylog import db_stats, read
from dnsproxy.plugins.querylog import store as store_module
from dnsproxy.plugins.querylog.store import SCHEMA, Anonymizer

from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_BLOCKED, EDE_FILTERED, EDE_PROHIBITED, EDE_STALE, respond
from dnsproxy.testing import Answer, build_step, chain_of, make_query, run_chain
from tests.conftest import ROOT


def make(tmp_path, **table):
    return build_step("querylog", table, base_dir=tmp_path, state_dir=tmp_path / "state")


def rows(path, sql="SELECT * FROM queries ORDER BY rowid"):
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in db.execute(sql)]
    finally:
        db.close()


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"sqlite": False}, r"chain\[0\] \(querylog\): sqlite: with sqlite = false, set jsonl"),
        ({"retention": "10s"}, r"option 'retention': must be between"),
        ({"buffer": 0}, r"option 'buffer'"),
        ({"max_size_mb": "big"}, r"option 'max_size_mb' must be an integer"),
        ({"ipv6_prefix": 129}, r"option 'ipv6_prefix'"),
        ({"prune_interval": "10ms"}, r"option 'prune_interval': must be between"),
        ({"prune_interval": "2h"}, r"option 'prune_interval': must be between"),
        ({"jsnol": "q.jsonl"}, r"unknown option 'jsnol' \(did you mean 'jsonl'\?\)"),
    ],
)
def test_bad_options(tmp_path, table, error):
    with pytest.raises(ConfigError, match=error):
        make(tmp_path, **table)


def test_default_database_is_in_state_dir(tmp_path):
    step = make(tmp_path, jsonl="log/q.jsonl")
    assert step.store.db_path == tmp_path / "state" / "querylog.sqlite"
    assert step.store.jsonl == tmp_path / "log" / "q.jsonl"
    assert make(tmp_path, sqlite=False, jsonl="q.jsonl").store.db_path is None


def test_buffer_is_bounded_and_drops_are_counted(tmp_path):
    step = make(tmp_path, buffer=10)
    q = make_query("example.org")
    for _ in range(15):
        step.record(q, None, 0.001)
    assert len(step.buffer) == 10 and step.dropped == 5
    values = {m.name: m.value for m in step.metrics()}
    assert values == {
        "records": 0,
        "dropped": 5,
        "pruned": 0,
        "write_errors": 0,
        "buffered": 10,
    }


async def test_drops_are_warned_once_a_minute(tmp_path, caplog, autojump_clock):
    step = make(tmp_path, buffer=10, sqlite=False, jsonl="q.jsonl")
    q = make_query("example.org")
    for _ in range(12):
        step.record(q, None, 0.0)
    await step.flush_now()
    for _ in range(12):
        step.record(q, None, 0.0)
    await step.flush_now()  # within the minute: not warned again
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "test.toml: chain[0] (querylog): buffer full, 2 records dropped so far"
        " (raise buffer or lower flush_interval)"
    ]
    await trio.sleep(61)
    await step.flush_now()
    assert "4 records dropped" in caplog.records[-1].getMessage()
    assert step.written == 20


def test_anonymizer():
    anon = Anonymizer(24, 56)
    assert anon("192.0.2.77") == "192.0.2.0"
    assert anon("2001:db8:1:2ff:aa::1") == "2001:db8:1:200::"
    assert anon("::ffff:198.51.100.9") == "198.51.100.0"
    assert anon("not-an-ip") == ""


def test_write_sqlite_and_jsonl(tmp_path):
    step = make(tmp_path, jsonl="q.jsonl", anonymize=True)
    store = step.store
    store.open()
    q1 = make_query("Ads.Example.org", "AAAA", client="192.0.2.77")
    q1.note("list", "ads")
    q1.note("rule", "||ads.example.org^")
    q1.note("coalesced", True)
    q2 = make_query("www.example.org", transport="tcp")
    q2.note("cache", "miss")
    q2.note("upstream", "127.0.0.1:53")
    t = time.time()
    batch = [
        (t, q1, respond(q1, 3, ede=[(EDE_BLOCKED, "ads")], source="blocklist"), 0.0001),
        (t + 1, q2, respond(q2, 0, source="forward"), 0.0123),
        (t + 2, q2, None, 0.5),
    ]
    assert store.write(batch) == (3, 0)
    store.close()
    got = rows(store.db_path)
    assert got[0] == {
        "ts": t,
        "client": "192.0.2.0",
        "transport": "udp",
        "name": "ads.example.org.",
        "qtype": "AAAA",
        "rcode": "NXDOMAIN",
        "answered_by": "blocklist",
        "list": "ads",
        "rule": "||ads.example.org^",
        "upstream": None,
        "cache": None,
        "duration_ms": 0.1,
        "notes": '{"coalesced": true}',
        "client_name": None,  # no [clients]: no names
        "blocked": 1,
    }
    assert (got[1]["cache"], got[1]["upstream"], got[1]["transport"]) == (
        "miss",
        "127.0.0.1:53",
        "tcp",
    )
    assert (got[2]["rcode"], got[2]["answered_by"]) == ("DROPPED", "")
    assert (got[1]["blocked"], got[2]["blocked"]) == (0, 0)
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert lines[0]["notes"] == {"coalesced": True} and lines[0]["client"] == "192.0.2.0"
    assert lines[0]["blocked"] is True
    assert lines[1]["duration_ms"] == 12.3 and "list" not in lines[1]
    assert "blocked" not in lines[1] and "blocked" not in lines[2]


def on_disk(path):
    """Bytes of the database and its WAL as the file system has them."""
    wal = path.with_name(path.name + "-wal")
    return sum(p.stat().st_size for p in (path, wal) if p.exists())


def insert_rows(path, stamps):
    """Rows written by another connection (as an older dnsproxy or a crash would leave)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(SCHEMA)
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO queries (ts, client, name, qtype, rcode, answered_by)"
            " VALUES (?, '192.0.2.1', 'www.example.org.', 'A', 'NOERROR', 'forward')",
            [(ts,) for ts in stamps],
        )
        db.execute("COMMIT")
    finally:
        db.close()


async def wait_log(caplog, text, seconds=30.0):
    """Until a log record contains ``text`` (real time: the work is in a thread)."""
    deadline = time.monotonic() + seconds
    while not any(text in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, f"not logged: {text}"
        await trio.sleep(0.01)


async def wait_open(step):
    """Until the step's writer has its database open."""
    while step.store.db_path and step.store.db is None:
        await trio.sleep(0.01)


def test_maintain_applies_retention_and_shrinks_the_file(tmp_path):
    step = make(tmp_path, retention="1h", jsonl="q.jsonl")
    store = step.store
    store.open()
    q = make_query("www.example.org")
    now = time.time()
    store.write([(now - 7200, q, None, 0.0)] * 20000 + [(now - 10, q, None, 0.0)])
    big = on_disk(store.db_path)
    assert big > 1_000_000
    assert store.maintain(now) == 20000
    assert [r["ts"] for r in rows(store.db_path)] == [now - 10]
    # the freed pages went back to the file system and the WAL is empty
    assert on_disk(store.db_path) < 100_000
    assert store.db_path.with_name("querylog.sqlite-wal").stat().st_size == 0
    store.close()


def test_jsonl_rotates_at_the_cap(tmp_path):
    step = make(tmp_path, sqlite=False, jsonl="q.jsonl", max_size_mb=1)
    store = step.store
    store.open()
    q = make_query("www.example.org")
    for i in range(40):
        store.write([(time.time() + i, q, None, 0.0)] * 200)
    assert (tmp_path / "q.jsonl.1").exists()
    assert (tmp_path / "q.jsonl").stat().st_size < store.cap + 60_000


async def test_size_cap_bounds_database_and_wal_on_disk(tmp_path):
    """Through the real writer: 40,000 records into a 1 MB log (each batch about 0.25 MB)."""
    step = make(tmp_path, max_size_mb=1, buffer=2000, flush_interval="10ms")
    chain_of([step])
    cap = 1_000_000
    path = step.store.db_path
    queries = [
        make_query(f"host-{i}.example.org", client=f"192.0.2.{i % 250}") for i in range(2000)
    ]
    sizes = []
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            n.start_soon(step.run)
            await wait_open(step)
            for batch in range(20):
                for q in queries:
                    step.record(q, None, 0.001)
                while step.written < (batch + 1) * 2000:
                    await trio.sleep(0.005)
                sizes.append(on_disk(path))
            n.cancel_scope.cancel()
    assert step.dropped == 0 and step.write_errors == 0
    # after every batch: database + WAL within the cap plus the stated 10 % slack
    assert max(sizes) <= cap * 1.1, sizes
    left = rows(path, "SELECT name FROM queries ORDER BY rowid")
    assert 2000 < len(left) < 40000
    assert step.pruned == 40000 - len(left)
    assert left[-1]["name"] == "host-1999.example.org."  # the newest rows are kept


async def test_retention_runs_on_a_timer_without_queries(tmp_path, autojump_clock):
    step = make(tmp_path, retention="1m")
    chain_of([step])
    path = step.store.db_path
    now = time.time()
    deadline = time.monotonic() + 30  # real time: the virtual clock races ahead of threads
    expired = "SELECT ts FROM queries WHERE ts < strftime('%s') - 60"
    async with trio.open_nursery() as n:
        n.start_soon(step.run)
        await wait_open(step)
        insert_rows(path, [now])
        # Round 1 may race the clean-up at start-up; round 2 starts after it is over (it
        # deletes expired rows before anything else), so only the timer is left to act.
        for _ in range(2):
            insert_rows(path, [now - 120] * 20000)
            # no query arrives: only the writer's own timers delete rows and shrink files
            while rows(path, expired) or on_disk(path) >= 100_000:
                assert time.monotonic() < deadline, "expired rows stay or the files do not shrink"
                await trio.sleep(1)
        assert [r["ts"] for r in rows(path, "SELECT ts FROM queries")] == [now]
        n.cancel_scope.cancel()
    assert step.written == 0 and step.pruned == 40000


async def test_database_without_auto_vacuum_is_rebuilt_at_start(tmp_path, caplog):
    caplog.set_level("INFO")
    step = make(tmp_path, max_size_mb=1)
    chain_of([step])
    path = step.store.db_path
    path.parent.mkdir()
    insert_rows(path, [time.time()] * 30000)  # about 3 MB, made without auto_vacuum
    async with trio.open_nursery() as n:
        n.start_soon(step.run)
        await wait_log(caplog, "rebuilt with auto_vacuum")
        n.cancel_scope.cancel()
    assert rows(path, "PRAGMA auto_vacuum") == [{"auto_vacuum": 2}]
    assert on_disk(path) <= 1_000_000
    assert 0 < len(rows(path)) < 30000


async def test_large_database_without_auto_vacuum_is_trimmed_and_warned(
    tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(store_module, "VACUUM_AT_START", 100_000)  # "large" for this test
    step = make(tmp_path, max_size_mb=1)
    chain_of([step])
    path = step.store.db_path
    path.parent.mkdir()
    insert_rows(path, [time.time()] * 30000)
    async with trio.open_nursery() as n:
        n.start_soon(step.run)
        await wait_log(caplog, f"sqlite3 {path} 'PRAGMA auto_vacuum = INCREMENTAL; VACUUM'")
        n.cancel_scope.cancel()
    assert rows(path, "PRAGMA auto_vacuum") == [{"auto_vacuum": 0}]
    assert len(rows(path)) < 30000  # trimmed to the cap, though the file cannot shrink


async def test_observer_hook_and_background_flush(tmp_path):
    step = make(tmp_path, flush_interval="20ms", jsonl="q.jsonl")
    server = SimpleNamespace(chain=chain_of([step]))  # what the hook reads of a Server
    assert querylog.dnsproxy_observers(server) == [step.record]
    assert querylog.dnsproxy_observers(SimpleNamespace(chain=chain_of([]))) is None
    q = make_query("www.example.org")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(step.run)
            for _ in range(5):
                step.record(q, respond(q, 0, source="x"), 0.0)
            while step.written < 5:
                await trio.sleep(0.01)
            assert len(rows(step.store.db_path)) == 5
            step.record(q, None, 0.0)
            n.cancel_scope.cancel()
    # cancelled: what was still buffered was written on the way out
    assert len(rows(step.store.db_path)) == 6
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 6


def test_write_errors_are_counted(tmp_path):
    step = make(tmp_path, sqlite=False, jsonl="missing-dir-is-a-file/q.jsonl")
    (tmp_path / "missing-dir-is-a-file").write_text("")
    q = make_query("www.example.org")
    step.record(q, None, 0.0)

    async def flush():
        await step.flush_now()

    trio.run(flush)
    assert step.write_errors == 1 and step.written == 0 and not step.buffer


def test_db_stats(tmp_path):
    step = make(tmp_path)
    store = step.store
    store.open()
    now = time.time()
    entries = []
    for name, client, source, age in [
        ("ads.example.org", "192.0.2.1", "blocklist", 10),
        ("ads.example.org", "192.0.2.1", "blocklist", 20),
        ("track.example.org", "192.0.2.2", "blocklist", 30),
        ("www.example.org", "192.0.2.1", "forward", 40),
        ("old.example.org", "192.0.2.3", "blocklist", 7200),
    ]:
        q = make_query(name, client=client)
        ede = [(EDE_BLOCKED, "ads")] if source == "blocklist" else []
        entries.append((now - age, q, respond(q, 0, ede=ede, source=source), 0.0))
    store.write(entries)
    store.close()
    stats = db_stats(store.db_path, now, {"hour": 3600.0, "day": 86400.0}, 1)
    assert stats["hour"] == {
        "queries": 4,
        "blocked": 3,
        "blocked_share": 0.75,
        "top_blocked": [{"name": "ads.example.org.", "count": 2}],
        "top_clients": [{"client": "192.0.2.1", "count": 3}],
    }
    assert stats["day"]["queries"] == 5 and stats["day"]["blocked"] == 4


QUIET_HOURS = ROOT / "examples" / "quiet-hours" / "src" / "dnsproxy_quiet_hours" / "__init__.py"
DENY_NAMES = ROOT / "docs" / "examples" / "deny_names.py"


async def test_a_plugins_blocking_answers_are_logged_as_blocked(tmp_path):
    """Blocked is the reply's meaning (EDE 15/16/17, or blocked=True), whichever step gave
    it: rows, the page filter, one row, the overview and db_stats all agree."""
    quiet = build_step(QUIET_HOURS, {"domains": ["games.test"], "start": "00:00", "end": "24:00"})
    deny = build_step(DENY_NAMES, {"names": ["ads.test"]})
    chain = chain_of([quiet, deny, Answer({"www.test": "192.0.2.1"})])
    now = time.time()
    entries = []
    for name in ("x.games.test", "x.games.test", "ads.test", "www.test"):
        q = make_query(name)
        entries.append((now - 10, q, await run_chain(chain, q), 0.0))
    for name, kw in [
        ("denied.test", dict(rcode=5, source="policy", blocked=True)),
        ("printer.test", dict(rcode=5, ede=[(EDE_PROHIBITED, "acl")], source="acl")),
        ("old.test", dict(ede=[(EDE_STALE, "stale answer")], source="cache")),
        ("fresh.test", dict(source="forward")),
    ]:
        q = make_query(name)
        entries.append((now - 5, q, respond(q, **kw), 0.0))
    step = make(tmp_path, jsonl="q.jsonl")
    step.store.open()
    step.store.write(entries)
    step.store.close()
    path = step.store.db_path
    assert [(r["name"], r["answered_by"], r["blocked"]) for r in rows(path)] == [
        ("x.games.test.", "quiet_hours", 1),
        ("x.games.test.", "quiet_hours", 1),
        ("ads.test.", "deny_names", 1),
        ("www.test.", "answer", 0),
        ("denied.test.", "policy", 1),
        ("printer.test.", "acl", 0),
        ("old.test.", "cache", 0),
        ("fresh.test.", "forward", 0),
    ]
    jsonl = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert [doc.get("blocked", False) for doc in jsonl] == [True] * 3 + [False, True] + [False] * 3

    def names(result: str) -> list[str]:
        return [r["name"] for r in read.page(path, read.Filters(result=result, limit=50))]

    assert names("blocked") == ["denied.test.", "ads.test.", "x.games.test.", "x.games.test."]
    assert names("local") == ["printer.test.", "www.test."]
    assert names("cached") == ["old.test."]
    assert names("forwarded") == ["fresh.test."]
    (first,) = read.page(path, read.Filters(name="ads", limit=1))
    assert (first["result"], first["blocked"]) == ("blocked", True)
    overview = read.overview(path, now, 3600, 600, 2)
    assert overview["totals"]["blocked"] == 4
    assert overview["top_blocked"] == [
        {"name": "x.games.test.", "count": 2},
        {"name": "ads.test.", "count": 1},
    ]
    stats = db_stats(path, now, {"hour": 3600.0}, 2)["hour"]
    assert (stats["queries"], stats["blocked"], stats["blocked_share"]) == (8, 4, 0.5)
    assert stats["top_blocked"] == overview["top_blocked"]


# The schema before the blocked column, as an older dnsproxy created its files.
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    ts REAL NOT NULL, client TEXT, transport TEXT, name TEXT, qtype TEXT, rcode TEXT,
    answered_by TEXT, list TEXT, rule TEXT, upstream TEXT, cache TEXT,
    duration_ms REAL, notes TEXT, client_name TEXT
);
CREATE INDEX IF NOT EXISTS queries_ts ON queries (ts);
CREATE INDEX IF NOT EXISTS queries_client ON queries (client);
CREATE INDEX IF NOT EXISTS queries_rcode ON queries (rcode);
CREATE INDEX IF NOT EXISTS queries_answered_by ON queries (answered_by);
"""


def test_a_file_from_before_the_blocked_column_is_migrated(tmp_path, caplog):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    now = time.time()
    old_rows = [
        (now - 30, "ads.test.", "NXDOMAIN", "blocklist", "ads.txt"),
        (now - 20, "www.test.", "NOERROR", "forward", None),
        (now - 15, "ads.test.", "NOERROR", "blocklist", "ads.txt"),
        (now - 10, "printer.lan.", "NOERROR", "hosts", None),
    ]
    db.executemany(
        "INSERT INTO queries (ts, client, name, qtype, rcode, answered_by, list)"
        " VALUES (?, '192.0.2.1', ?, 'A', ?, ?, ?)",
        old_rows,
    )
    db.commit()
    db.close()
    caplog.set_level("INFO")
    step = make(tmp_path, database=str(path))
    step.store.open()
    q = make_query("late.games.test")
    step.store.write([(now, q, respond(q, 3, ede=[(EDE_FILTERED, "")], source="quiet"), 0.0)])
    step.store.close()
    got = [(r["name"], r["answered_by"], r["list"], r["blocked"]) for r in rows(path)]
    assert got == [
        ("ads.test.", "blocklist", "ads.txt", 1),
        ("www.test.", "forward", None, 0),
        ("ads.test.", "blocklist", "ads.txt", 1),
        ("printer.lan.", "hosts", None, 0),
        ("late.games.test.", "quiet", None, 1),
    ]
    said = [r.getMessage() for r in caplog.records if "blocked column" in r.getMessage()]
    assert said == [
        f"test.toml: chain[0] (querylog): {path}: added the blocked column,"
        " 2 blocklist rows marked blocked"
    ]
    top = db_stats(path, now, {"hour": 3600.0}, 5)["hour"]["top_blocked"]
    assert top == [{"name": "ads.test.", "count": 2}, {"name": "late.games.test.", "count": 1}]
    make(tmp_path, database=str(path)).store.open()  # a second start: nothing to do
    assert len([r for r in caplog.records if "blocked column" in r.getMessage()]) == 1


def test_a_failed_migration_leaves_the_file_as_it_was(tmp_path, caplog):
    """The column and the marks go in one transaction: when marking fails, the file keeps
    its old schema, holds no lock, and the next start migrates it."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO queries (ts, name, answered_by) VALUES (1, 'ads.test.', 'blocklist')")
    db.execute(
        "CREATE TRIGGER frozen BEFORE UPDATE ON queries BEGIN SELECT RAISE(ABORT, 'frozen'); END"
    )
    db.commit()
    db.close()
    caplog.set_level("INFO")
    with pytest.raises(sqlite3.Error, match="frozen"):
        make(tmp_path, database=str(path)).store.open()
    assert [r["answered_by"] for r in rows(path)] == ["blocklist"]
    assert "blocked" not in rows(path)[0]
    db = sqlite3.connect(path, timeout=0.5)  # no transaction left open: not locked
    db.execute("DROP TRIGGER frozen")
    db.commit()
    db.close()
    step = make(tmp_path, database=str(path))
    step.store.open()
    step.store.close()
    assert [(r["name"], r["blocked"]) for r in rows(path)] == [("ads.test.", 1)]
    assert [r.getMessage().endswith("1 blocklist rows marked blocked") for r in caplog.records
            if "blocked column" in r.getMessage()] == [True]  # fmt: skip


def test_readers_get_the_file_only_once_the_writer_has_opened_it(tmp_path):
    """Before the writer opened (and migrated) it, or when it could not, the file may lack
    the columns readers ask for: the dashboard and /api/stats then get None (their memory
    fallback), never a "no such column" failure."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.commit()
    db.close()
    step = make(tmp_path, database=str(path))
    assert (step.db(), step.summary(time.time(), {"hour": 3600.0}, 5)) == (None, None)
    step.store.open()
    assert step.db() == path
    assert step.summary(time.time(), {"hour": 3600.0}, 5)["hour"]["queries"] == 0
    step.store.close()
    assert step.db() is None
