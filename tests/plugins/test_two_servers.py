"""Two Servers in one process keep their own state (issue 14 item 1): each query log holds
only its server's queries, each blocklist blocks only its own list, each /metrics and
/api/stats counts only its own traffic, and a list one server parsed is never lent to
another (a reload of the same server does reuse it)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import httpx
import trio

from dnsproxy.server import Server
from tests.conftest import free_port
from tests.plugins.test_http import sample

STEPS = Path(__file__).resolve().parent.parent / "core" / "stepsplugin.py"


def write_config(root: Path, blocked: str, database: str = "queries.sqlite") -> Path:
    """A server under ``root`` that logs to ``database`` and blocks ``blocked``."""
    root.mkdir(exist_ok=True)
    (root / "list.txt").write_text(f"{blocked}\n")
    path = root / "config.toml"
    path.write_text(
        f'plugins = ["{STEPS}"]\n'
        '[server]\nlisten = ["127.0.0.1:0"]\n'
        f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'
        f'[[chain]]\nplugin = "querylog"\ndatabase = "{database}"\nflush_interval = "20ms"\n'
        '[[chain]]\nplugin = "blocklist"\nlists = ["list.txt"]\n'
        '[[chain]]\nplugin = "static"\n'
    )
    return path


async def serve(nursery: trio.Nursery, path: Path) -> tuple[Server, int, str]:
    """Start a server; its DNS port and HTTP base URL, once its lists are loaded."""
    server = Server(path, handle_signals=False)
    addrs = await nursery.start(server.run)
    while not server.chain.ready():
        await trio.sleep(0.01)
    http = server.config.services[0].options.listen
    return server, addrs[0][2], f"http://127.0.0.1:{http.port}"


async def ask(port: int, name: str) -> str:
    """The A answer's address for ``name`` (0.0.0.0 when blocked)."""
    reply = await dns.asyncquery.udp(dns.message.make_query(name, "A"), "127.0.0.1", 2, port)
    assert reply.rcode() == dns.rcode.NOERROR
    return reply.answer[0][0].address


def names_in(path: Path) -> list[str]:
    """The names in a query log database, oldest first ([] before it has its table)."""
    if not path.exists():
        return []
    db = sqlite3.connect(path)
    try:
        return [n for (n,) in db.execute("SELECT name FROM queries ORDER BY rowid")]
    except sqlite3.OperationalError:  # the writer has not made the table yet
        return []
    finally:
        db.close()


async def logged(path: Path, count: int) -> list[str]:
    """The names in a query log once it holds ``count`` rows, or after 5 s what it has."""
    with trio.move_on_after(5):
        while len(names_in(path)) < count:
            await trio.sleep(0.02)
    return names_in(path)


async def test_two_servers_in_one_process_do_not_see_each_other(tmp_path):
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            a, a_port, a_http = await serve(n, write_config(tmp_path / "a", "ads-a.test"))
            b, b_port, b_http = await serve(n, write_config(tmp_path / "b", "ads-b.test"))

            # each blocklist blocks only its own list
            assert await ask(a_port, "ads-a.test") == "0.0.0.0"
            assert await ask(a_port, "ads-b.test") == "192.0.2.1"
            assert await ask(b_port, "ads-a.test") == "192.0.2.1"
            assert await ask(b_port, "ads-b.test") == "0.0.0.0"
            for name in ("www.a.test", "www.a.test"):
                assert await ask(a_port, name) == "192.0.2.1"
            assert await ask(b_port, "www.b.test") == "192.0.2.1"

            # each query log has only its own server's queries
            a_log = await logged(tmp_path / "a" / "queries.sqlite", 4)
            b_log = await logged(tmp_path / "b" / "queries.sqlite", 3)
            await trio.sleep(0.2)  # a stray record would be flushed by now
            assert await logged(tmp_path / "a" / "queries.sqlite", 4) == a_log
            assert a_log == ["ads-a.test.", "ads-b.test.", "www.a.test.", "www.a.test."]
            assert await logged(tmp_path / "b" / "queries.sqlite", 3) == b_log
            assert b_log == ["ads-a.test.", "ads-b.test.", "www.b.test."]

            # each /metrics and /api/stats counts only its own queries
            for base, queries in ((a_http, 4), (b_http, 3)):
                async with httpx.AsyncClient(base_url=base) as http:
                    text = (await http.get("/metrics")).text
                    stats = (await http.get("/api/stats")).json()
                assert sample(text, "dnsproxy_queries_total") == queries
                assert sample(text, "dnsproxy_request_duration_seconds_count") == queries
                assert sample(text, "dnsproxy_blocklist_blocked_total", list="list.txt") == 1
                assert sample(text, "dnsproxy_querylog_records_total") == queries
                assert stats["source"] == "querylog" and stats["hour"]["queries"] == queries
                assert stats["hour"]["blocked"] == 1
                assert stats["querylog"]["records"] == queries

            # a reload of A reuses the lists A parsed: it blocks from its first query
            assert await a.reload()
            assert a.chain.ready()
            # another server of A's very config (same unchanged list file, same options)
            # parses the list itself: nothing is lent across servers
            other = Server(tmp_path / "a" / "config.toml", handle_signals=False)
            assert not other.chain.ready()
            other.chain.close()
            a.stop()
            b.stop()


async def test_a_reload_hands_the_query_log_to_the_new_chain(tmp_path):
    root = tmp_path / "a"
    path = write_config(root, "ads-a.test", database="old.sqlite")
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, _ = await serve(n, path)
            await ask(port, "before.test")
            assert await logged(root / "old.sqlite", 1) == ["before.test."]
            write_config(root, "ads-a.test", database="new.sqlite")
            assert await server.reload()
            await ask(port, "after.test")
            assert await logged(root / "new.sqlite", 1) == ["after.test."]
            await trio.sleep(0.2)  # the old log's writer had time to take a stray record
            assert await logged(root / "old.sqlite", 1) == ["before.test."]
            server.stop()
