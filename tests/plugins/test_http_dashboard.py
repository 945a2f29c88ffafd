"""The dashboard's access rules, options, managed lists and query-log paging (issue 15).

In-process (`Server` + httpx); the real process and a real browser are in tests/browser.
"""

from __future__ import annotations

import re
import sqlite3
import time

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest
import trio
from dnsproxy.plugins.blocklist.managed import Managed
from dnsproxy.plugins.http.auth import LoginLimiter, Sessions, hash_password, verify_password
from dnsproxy.plugins.querylog import read
from dnsproxy.plugins.querylog.store import BLOCKED_INDEX, SCHEMA

from dnsproxy.errors import ConfigError
from dnsproxy.server import Server, load
from plugins.querylog.store import COLUMNS
from tests.conftest import csrf, free_port
from tests.plugins.test_http import ask, config_text, start, write_config

PASSWORD = "open sesame"
TOKEN = "t" * 24
HASH = hash_password(PASSWORD)


def test_password_hash_round_trip_and_format():
    assert verify_password(PASSWORD, HASH) and not verify_password("nope", HASH)
    assert HASH.startswith("scrypt$15$8$1$")
    assert hash_password(PASSWORD) != HASH  # salted


def test_options_validated(tmp_path):
    def load_with(http: str, listen: str = "127.0.0.1"):
        text = config_text(free_port(), free_port(), http=http).replace(
            'listen = "127.0.0.1:', f'listen = "{listen}:'
        )
        return load(write_config(tmp_path, text))

    with pytest.raises(
        ConfigError,
        match=r"config.toml: http: listen: 0.0.0.0:\d+ is not a loopback.*password_hash",
    ):
        load_with("", "0.0.0.0")
    load_with(f'password_hash = "{HASH}"\n', "0.0.0.0")  # with a password: fine
    load_with("", "[::1]")
    with pytest.raises(ConfigError, match=r"http: option 'password_hash'.*hash-password"):
        load_with('password_hash = "plaintext"\n')
    with pytest.raises(ConfigError, match=r"http: option 'api_tokens'.*at least 16"):
        load_with('api_tokens = ["short"]\n')
    with pytest.raises(ConfigError, match=r"http: option 'login_max_failures'"):
        load_with("login_max_failures = 0\n")


def test_sessions_and_login_limiter():
    s = Sessions(60)
    cookie = s.new(now=1000)
    nonce = s.check(cookie, now=1030)
    assert nonce is not None and s.csrf_ok(nonce, s.csrf(nonce))
    assert not s.csrf_ok(nonce, "") and not s.csrf_ok(nonce, s.csrf("other"))
    assert s.check(cookie, now=1061) is None  # expired
    assert s.check(cookie[:-2] + "xx", now=1030) is None  # forged
    assert Sessions(60).check(cookie, now=1030) is None  # another process's key
    lim = LoginLimiter(2, 60, max_clients=3)
    lim.failed("a", 0)
    assert lim.blocked_for("a", 1) == 0
    lim.failed("a", 1)
    assert lim.blocked_for("a", 2) == 58
    assert lim.blocked_for("a", 61) == 0
    for c in "bcdef":
        lim.failed(c, 70)
    assert len(lim.seen) == 3


async def test_password_protects_api_and_pages(tmp_path):
    http = f'password_hash = "{HASH}"\napi_tokens = ["{TOKEN}"]\nlogin_max_failures = 2\n'
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path, http=http)
            async with httpx.AsyncClient(base_url=base) as c:
                # open routes stay open
                assert (await c.get("/health")).status_code == 200
                assert (await c.get("/metrics")).status_code == 200
                assert (await c.get("/ready")).status_code == 200
                # the API needs a session or a token; pages redirect to the login
                assert (await c.get("/api/stats")).status_code == 401
                r = await c.post("/api/blocking/disable")
                assert r.status_code == 401 and server.blocking.active()
                r = await c.get("/log")
                assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Flog"
                bad = {"authorization": "Bearer " + "x" * 24}
                assert (await c.get("/api/stats", headers=bad)).status_code == 401
                good = {"authorization": f"Bearer {TOKEN}"}
                assert (await c.get("/api/stats", headers=good)).status_code == 200
                r = await c.post("/api/blocking/disable", params={"duration": "1m"}, headers=good)
                assert r.status_code == 200 and not server.blocking.active()
                server.blocking.resume()
                # failed logins are limited per client
                for status in (401, 401, 429):
                    r = await c.post("/login", data={"password": "wrong"})
                    assert r.status_code == status
                assert "retry-after" in r.headers
                r = await c.post("/login", data={"password": PASSWORD})  # still locked out
                assert r.status_code == 429 and "dnsproxy_session" not in c.cookies
            server.stop()


async def test_session_needs_csrf_for_writes(tmp_path):
    http = f'password_hash = "{HASH}"\n'
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path, http=http)
            async with httpx.AsyncClient(base_url=base) as c:
                r = await c.post("/login", data={"password": PASSWORD, "next": "/cache"})
                assert r.status_code == 303 and r.headers["location"] == "/cache"
                assert "httponly" in r.headers["set-cookie"].lower()
                assert "samesite=strict" in r.headers["set-cookie"].lower()
                page = await c.get("/cache")
                assert page.status_code == 200
                token = csrf(page.text)
                assert (await c.get("/api/stats")).status_code == 200  # the session reads
                r = await c.post("/api/blocking/disable")
                assert r.status_code == 403 and server.blocking.active()
                r = await c.post("/ui/blocking/pause", data={"duration": "5m"})
                assert r.status_code == 403 and server.blocking.active()
                forged = ("y" if token[0] == "x" else "x") + token[1:]  # one character off
                r = await c.post("/ui/blocking/pause", data={"duration": "5m", "csrf": forged})
                assert r.status_code == 403 and server.blocking.active()
                r = await c.post("/ui/blocking/pause", data={"duration": "5m", "csrf": token})
                assert r.status_code == 303 and not server.blocking.active()
                r = await c.post("/api/blocking/enable", headers={"x-csrf-token": token})
                assert r.status_code == 200 and server.blocking.active()
            server.stop()


async def test_without_password_api_stays_open_but_ui_needs_csrf(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as c:
                assert (await c.post("/api/blocking/disable")).status_code == 200
                server.blocking.resume()
                assert (await c.get("/login")).status_code == 303
                r = await c.post("/ui/blocking/pause", data={"duration": "5m"})
                assert r.status_code == 403 and server.blocking.active()
                page = await c.get("/blocking")  # hands out a session for the token
                assert page.status_code == 200 and "dnsproxy_session" in c.cookies
                token = csrf(page.text)
                r = await c.post("/ui/blocking/pause", data={"duration": "5m", "csrf": token})
                assert r.status_code == 303 and not server.blocking.active()
            server.stop()


BLOCKLIST_CHAIN = """\
[[chain]]
plugin = "blocklist"
lists = ["{ads}"]
[[chain]]
plugin = "policy"
"""


async def start_blocking(n: trio.Nursery, tmp_path, head: str = "") -> tuple[Server, int, str]:
    """A server whose chain is `head` + BLOCKLIST_CHAIN (ads.example.test listed), once its
    blocklist has loaded."""
    ads = tmp_path / "ads.txt"
    ads.write_text("ads.example.test\n")
    server, port, base = await start(n, tmp_path, head + BLOCKLIST_CHAIN.format(ads=ads))
    step = server.chain.steps[head.count("[[chain]]")]  # the blocklist
    while not step.ready():
        await trio.sleep(0.02)
    return server, port, base


async def test_allow_block_apply_at_once_and_survive_restart(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start_blocking(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as c:
                page = await c.get("/managed")
                token = csrf(page.text)
                assert (await ask(port, "www.shop.test")).answer
                r = await c.post("/ui/block", data={"name": "Shop.Test.", "csrf": token})
                assert r.status_code == 303
                msg = await ask(port, "www.shop.test")  # subdomains too, no reload
                assert msg.answer[0][0].to_text() == "0.0.0.0"
                r = await c.post("/ui/allow", data={"name": "ads.example.test", "csrf": token})
                assert r.status_code == 303
                assert (await ask(port, "ads.example.test")).answer[0][0].to_text() == "192.0.2.1"
                assert "shop.test" in (await c.get("/managed")).text
                r = await c.post("/ui/block", data={"name": "not a name!", "csrf": token})
                assert r.status_code == 400
            server.stop()
        # a new server (a restart) on the same state directory keeps the entries
        async with trio.open_nursery() as n:
            server = Server(tmp_path / "config.toml", handle_signals=False)
            await n.start(server.run)
            while not server.chain.steps[0].ready():
                await trio.sleep(0.02)
            assert (await ask(server.bound[0].port, "www.shop.test")).answer[0][0].to_text() == (
                "0.0.0.0"
            )
            managed = server.chain.steps[0].managed
            assert managed.entries("block") == ["shop.test"]
            assert managed.entries("allow") == ["ads.example.test"]
            server.stop()


async def test_a_group_is_paused_and_resumed_from_the_blocking_page(tmp_path):
    async def seen(port: int, source: str) -> str:
        q = dns.message.make_query("ads.example.test", "A")
        r = await trio.to_thread.run_sync(
            lambda: dns.query.udp(q, "127.0.0.1", timeout=2, port=port, source=source)
        )
        return r.answer[0][0].to_text()

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start_blocking(
                n, tmp_path, '[groups]\nkids = ["127.0.0.2"]\n'
            )
            async with httpx.AsyncClient(base_url=base) as c:
                page = await c.get("/blocking")
                assert "<td>kids</td><td>on</td>" in page.text
                token = csrf(page.text)
                form = {"group": "kids", "duration": "1h", "csrf": token}
                assert (await c.post("/ui/blocking/pause", data=form)).status_code == 303
                assert await seen(port, "127.0.0.2") == "192.0.2.1"  # the kid: unblocked
                assert await seen(port, "127.0.0.1") == "0.0.0.0"  # everyone else: blocked
                assert server.blocking.active()  # blocking for all stays on
                page = await c.get("/ui/blocking")
                assert re.search(
                    r"<td>kids</td><td>paused for another (60:00|59:[0-5]\d) ", page.text
                )
                form = {"group": "kids", "csrf": token}
                assert (await c.post("/ui/blocking/resume", data=form)).status_code == 303
                assert await seen(port, "127.0.0.2") == "0.0.0.0"
                form = {"group": "nobody-here", "duration": "1h", "csrf": token}
                r = await c.post("/ui/blocking/pause", data=form)
                assert r.status_code == 400 and "unknown group 'nobody-here'" in r.text
            server.stop()


async def test_a_click_is_not_outlived_by_a_cached_answer(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start_blocking(n, tmp_path, '[[chain]]\nplugin = "cache"\n')
            async with httpx.AsyncClient(base_url=base) as c:
                page = await c.get("/managed")
                token = csrf(page.text)
                for _ in range(2):  # the second answer comes from the cache
                    assert (await ask(port, "www.shop.test")).answer[0][0].to_text() != "0.0.0.0"
                r = await c.post("/ui/block", data={"name": "shop.test", "csrf": token})
                assert r.status_code == 303
                assert (await ask(port, "www.shop.test")).answer[0][0].to_text() == "0.0.0.0"
            server.stop()


def test_managed_moves_between_lists(tmp_path):
    m = Managed(tmp_path)
    m.add("block", "a.test")
    m.add("allow", "A.test.")
    assert m.entries("block") == [] and m.entries("allow") == ["a.test"]
    assert m.remove("allow", "a.test") and not m.remove("allow", "a.test")


def test_log_pages_are_keyset_and_filtered(tmp_path):
    db_path = tmp_path / "q.sqlite"
    db = sqlite3.connect(db_path)
    db.executescript(SCHEMA)
    db.execute(BLOCKED_INDEX)
    now = time.time()
    rows = []
    for i in range(300):
        source = ("blocklist", "cache", "forward", "hosts")[i % 4]
        rcode = "SERVFAIL" if i % 50 == 0 else "NOERROR"
        rows.append((now - 300 + i, f"10.0.0.{i % 3}", "udp", f"n{i}.example.test.", "A",
                     rcode, source, None, None, None, None, 1.0, None,
                     int(source == "blocklist")))  # fmt: skip
    columns = ", ".join((*COLUMNS[:13], "blocked"))  # client_name stays NULL
    db.executemany(f"INSERT INTO queries ({columns}) VALUES ({','.join('?' * 14)})", rows)
    db.commit()
    db.close()
    first = read.page(db_path, read.Filters(limit=50))
    assert [r["name"] for r in first[:2]] == ["n299.example.test.", "n298.example.test."]
    second = read.page(db_path, read.Filters(limit=50, before=first[-1]["rowid"]))
    assert second[0]["rowid"] == first[-1]["rowid"] - 1 and len(second) == 50
    by_client = read.page(db_path, read.Filters(client="10.0.0.1", limit=500))
    assert len(by_client) == 100 and {r["client"] for r in by_client} == {"10.0.0.1"}
    by_name = read.page(db_path, read.Filters(name="n12", limit=500))
    assert {r["name"] for r in by_name} == {"n12.example.test."} | {
        f"n12{d}.example.test." for d in range(10)
    }
    blocked = read.page(db_path, read.Filters(result="blocked", limit=500))
    assert {r["result"] for r in blocked} == {"blocked"}
    errors = read.page(db_path, read.Filters(result="error", limit=500))
    assert len(errors) == 6 and {r["rcode"] for r in errors} == {"SERVFAIL"}
    local = read.page(db_path, read.Filters(result="local", limit=500))
    assert {r["answered_by"] for r in local} == {"hosts"}
    window = read.page(db_path, read.Filters(since=now - 100, until=now - 50, limit=500))
    assert len(window) == 50 and all(now - 100 <= r["ts"] < now - 50 for r in window)
    plan = sqlite3.connect(db_path).execute(
        "EXPLAIN QUERY PLAN SELECT rowid FROM queries WHERE client = ? AND rowid < ?"
        " ORDER BY rowid DESC LIMIT 50", ("10.0.0.1", 10**9)
    ).fetchall()  # fmt: skip
    assert "queries_client" in str(plan) and "TEMP B-TREE" not in str(plan)
    plan = sqlite3.connect(db_path).execute(
        f"EXPLAIN QUERY PLAN SELECT rowid FROM queries WHERE {read.RESULT_SQL['blocked']}"
        " AND rowid < ? ORDER BY rowid DESC LIMIT 50", (10**9,)
    ).fetchall()  # fmt: skip
    assert "queries_blocked" in str(plan) and "TEMP B-TREE" not in str(plan)
    assert read.one(db_path, first[0]["rowid"])["name"] == "n299.example.test."
    data = read.overview(db_path, now, 86400, 600, 5)
    assert data["totals"]["queries"] == 300 and sum(data["chart"]["queries"]) == 300
    assert data["totals"]["blocked"] == 72  # 75 blocklist rows, 3 of them SERVFAIL


async def test_query_log_page_renders_live_rows(tmp_path):
    chain = (
        '[[chain]]\nplugin = "querylog"\nflush_interval = "0.05s"\n[[chain]]\nplugin = "policy"\n'
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path, chain)
            assert (await ask(port, "live.example.test")).rcode() == dns.rcode.NOERROR
            async with httpx.AsyncClient(base_url=base) as c:
                for _ in range(100):
                    r = await c.get("/ui/log/rows", params={"name": "live"})
                    if "live.example.test." in r.text:
                        break
                    await trio.sleep(0.05)
                assert "live.example.test." in r.text
                assert (await c.get("/log", params={"result": "nope"})).status_code == 400
                assert (await c.get("/log", params={"before": "x"})).status_code == 400
                assert (await c.get("/log/999999")).status_code == 404
                for path in ("/", "/log", "/lists", "/cache", "/blocking", "/managed"):
                    assert (await c.get(path)).status_code == 200, path
            server.stop()


def test_hash_password_command():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "hash-password"],
        input=PASSWORD + "\n", capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert verify_password(PASSWORD, out.stdout.strip())
    empty = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "hash-password"],
        input="\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert empty.returncode == 1 and "empty password" in empty.stderr
