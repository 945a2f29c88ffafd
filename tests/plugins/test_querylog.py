"""querylog: options, bounded buffering, SQLite and JSON lines, retention, size cap, stats."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest
import trio
from dnsproxy.plugins import querylog
from dnsproxy.plugins.querylog import Anonymizer, db_stats, key_text

from dnsproxy.errors import ConfigError
from dnsproxy.reply import respond
from dnsproxy.testing import build_step, chain_of, make_query
from dnsproxy.wire import name_to_key


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
    assert values == {"records": 0, "dropped": 5, "write_errors": 0, "buffered": 10}


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


def test_key_text():
    assert key_text(name_to_key("WWW.Example.ORG")) == "www.example.org."
    assert key_text(b"\x00") == "."
    assert key_text(b"\x03a b\x04test\x00") == "a\\032b.test."


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
        (t, q1, respond(q1, 3, source="blocklist"), 0.0001),
        (t + 1, q2, respond(q2, 0, source="forward"), 0.0123),
        (t + 2, q2, None, 0.5),
    ]
    assert store.write(batch) == 3
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
    }
    assert (got[1]["cache"], got[1]["upstream"], got[1]["transport"]) == (
        "miss",
        "127.0.0.1:53",
        "tcp",
    )
    assert (got[2]["rcode"], got[2]["answered_by"]) == ("DROPPED", "")
    lines = [json.loads(x) for x in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert lines[0]["notes"] == {"coalesced": True} and lines[0]["client"] == "192.0.2.0"
    assert lines[1]["duration_ms"] == 12.3 and "list" not in lines[1]


def test_retention_and_size_cap(tmp_path):
    step = make(tmp_path, retention="1h", jsonl="q.jsonl")
    store = step.store
    store.open()
    q = make_query("www.example.org")
    now = time.time()
    store.write([(now - 7200, q, None, 0.0), (now - 10, q, None, 0.0)])
    # the first write pruned: the entry older than the retention is gone
    assert [r["ts"] for r in rows(store.db_path)] == [now - 10]
    store.cap = 200_000  # a small cap (the option's floor is 1 MB) to exercise trimming
    for i in range(40):
        store.write([(now + i, q, None, 0.0)] * 200)
    store.prune(now + 100)
    assert store._used() <= store.cap
    left = [r["ts"] for r in rows(store.db_path, "SELECT ts FROM queries ORDER BY rowid")]
    assert 0 < len(left) < 8001
    assert left[-1] == now + 39  # the newest rows are kept
    store.close()
    # the JSON-lines file rotates at the cap, keeping one old file
    assert (tmp_path / "q.jsonl.1").exists()
    assert (tmp_path / "q.jsonl").stat().st_size < store.cap + 20_000


async def test_observer_hook_and_background_flush(tmp_path):
    step = make(tmp_path, flush_interval="20ms", jsonl="q.jsonl")
    chain_of([step])
    q = make_query("www.example.org")
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(step.run)
            while step not in querylog._live:
                await trio.sleep(0.01)
            for _ in range(5):
                querylog.observe(q, respond(q, 0, source="x"), 0.0)
            while step.written < 5:
                await trio.sleep(0.01)
            assert len(rows(step.store.db_path)) == 5
            querylog.observe(q, None, 0.0)
            n.cancel_scope.cancel()
    # cancelled: what was still buffered was written on the way out
    assert step not in querylog._live
    assert len(rows(step.store.db_path)) == 6
    assert len((tmp_path / "q.jsonl").read_text().splitlines()) == 6


async def test_newer_chain_takes_over(tmp_path):
    old = make(tmp_path, flush_interval="20ms", database="old.sqlite")
    new = make(tmp_path, flush_interval="20ms", database="new.sqlite")
    chain_of([old])
    chain_of([new])
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            n.start_soon(old.run)
            while old not in querylog._live:
                await trio.sleep(0.01)
            n.start_soon(new.run)
            while new not in querylog._live:
                await trio.sleep(0.01)
            assert querylog._live == [new]
            n.cancel_scope.cancel()


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
        entries.append((now - age, q, respond(q, 0, source=source), 0.0))
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
