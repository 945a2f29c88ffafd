"""Observability end to end: the real proxy process, nsd upstream, dnspython clients.

/metrics after known traffic, a cache flush through the API seen as a miss, the query log
in SQLite and JSON lines, and the ``dnsproxy query`` trace.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import sys
import time

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from dnsproxy.testing import registry
from tests.conftest import Proxy, free_port, until
from tests.fakeupstream import FakeUpstream
from tests.plugins.test_http import sample

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]

[http]
listen = "127.0.0.1:{http}"

[[chain]]
plugin = "querylog"
database = "log/queries.sqlite"
jsonl = "log/queries.jsonl"
flush_interval = "50ms"

[[chain]]
plugin = "cache"

[[chain]]
plugin = "forward"
upstreams = ["{upstream}"]
timeout = 1.0
"""


def wait_rows(path, count: int, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            db = sqlite3.connect(path)
            db.row_factory = sqlite3.Row
            try:
                got = [dict(r) for r in db.execute("SELECT * FROM queries ORDER BY rowid")]
            finally:
                db.close()
            if len(got) >= count:
                return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"query log has fewer than {count} rows")
        time.sleep(0.05)


# The proxy takes its clock after sending, so the client may stop its own a little earlier.
SCHEDULING_SLACK_MS = 50.0


def timed_ask(proxy: Proxy, name: str) -> tuple[dns.message.Message, float]:
    """One query and the round trip the client measured, in ms."""
    start = time.monotonic()
    r = proxy.ask(name)
    return r, (time.monotonic() - start) * 1000


def test_metrics_flush_and_query_log(nsd, make_proxy):
    http_port = free_port()
    config = CONFIG.replace("{http}", str(http_port)).replace("{upstream}", nsd.addr)
    proxy = make_proxy(config, wait_for=f"listening on http 127.0.0.1:{http_port}")
    base = f"http://127.0.0.1:{http_port}"
    with httpx.Client(base_url=base, timeout=5) as http:
        assert http.get("/ready").json()["ready"] is True
        rtts = []  # each query's round trip as the client saw it, in ms
        for _ in range(3):  # one miss, two hits
            r, rtt = timed_ask(proxy, "www.example.test")
            assert r.rcode() == dns.rcode.NOERROR and r.answer
            rtts.append(rtt)
        r, rtt = timed_ask(proxy, "nope.example.test")
        assert r.rcode() == dns.rcode.NXDOMAIN
        rtts.append(rtt)
        text = http.get("/metrics").text
        assert sample(text, "dnsproxy_requests_total", qtype="A", rcode="NOERROR") == 3
        assert sample(text, "dnsproxy_requests_total", qtype="A", rcode="NXDOMAIN") == 1
        assert sample(text, "dnsproxy_request_duration_seconds_count") == 4
        assert sample(text, "dnsproxy_cache_hits_total", step="1") == 2
        assert sample(text, "dnsproxy_cache_misses_total", step="1") == 2

        assert http.post("/api/cache/flush").json() == {"flushed": True}
        r, rtt = timed_ask(proxy, "www.example.test")
        assert r.answer
        rtts.append(rtt)
        text = http.get("/metrics").text
        assert sample(text, "dnsproxy_cache_misses_total", step="1") == 3
        assert sample(text, "dnsproxy_cache_hits_total", step="1") == 2

        got = wait_rows(proxy.dir / "log" / "queries.sqlite", 5)
        assert [r["cache"] for r in got] == ["miss", "hit", "hit", "miss", "miss"]
        assert [r["rcode"] for r in got] == ["NOERROR"] * 3 + ["NXDOMAIN", "NOERROR"]
        assert got[0]["answered_by"] == "forward" and got[0]["upstream"] == f"udp://{nsd.addr}"
        assert got[1]["answered_by"] == "cache" and got[1]["upstream"] is None
        assert {r["client"] for r in got} == {"127.0.0.1"}
        assert got[3]["name"] == "nope.example.test."
        for row, rtt in zip(got, rtts, strict=True):  # the proxy's time is within the trip
            assert 0 <= row["duration_ms"] <= rtt + SCHEDULING_SLACK_MS, (row, rtt)

        stats = http.get("/api/stats").json()
        assert stats["source"] == "querylog" and stats["hour"]["queries"] == 5
        assert stats["hour"]["top_clients"] == [{"client": "127.0.0.1", "count": 5}]

        trace = http.get("/api/query", params={"name": "mail.example.test"}).json()
        assert (
            trace["answered_by"] == "forward" and trace["notes"]["upstream"] == f"udp://{nsd.addr}"
        )
        assert trace["answer"] == ["mail.example.test. 300 IN A 192.0.2.25"]
        assert any(f"udp://{nsd.addr} answered rcode 0" in line for line in trace["trace"])

    proxy.stop()
    lines = (proxy.dir / "log" / "queries.jsonl").read_text().splitlines()
    docs = [json.loads(x) for x in lines]
    assert [d["name"] for d in docs] == ["www.example.test."] * 3 + [
        "nope.example.test.",
        "www.example.test.",
    ]
    assert docs[0]["upstream"] == f"udp://{nsd.addr}" and docs[1]["cache"] == "hit"


SLOW_CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]

[[chain]]
plugin = "querylog"
database = "queries.sqlite"
flush_interval = "50ms"

[[chain]]
plugin = "forward"
upstreams = ["{upstream}"]
timeout = 2.0
"""


def test_query_log_duration_is_the_time_spent_on_the_query(make_proxy):
    """``duration_ms`` covers the upstream's delay and never exceeds the client's round trip."""
    delay = 0.3
    with FakeUpstream([{"match": {"qname": "slow.example.test."}, "delay": delay}]) as upstream:
        proxy = make_proxy(SLOW_CONFIG.replace("{upstream}", upstream.addr))
        db = proxy.dir / "queries.sqlite"
        # The log goes live once the step has opened its database, a little after the
        # listeners: query until a query is logged.
        for _ in range(50):
            proxy.ask("warm.example.test")
            with contextlib.suppress(TimeoutError, sqlite3.OperationalError):  # not yet created
                wait_rows(db, 1, timeout=0.2)
                break
        rtts = []
        for name in ("fast.example.test", "slow.example.test"):
            r, rtt = timed_ask(proxy, name)
            assert r.rcode() == dns.rcode.NOERROR and r.answer
            rtts.append(rtt)
        for _ in range(100):
            got = [row for row in wait_rows(db, 1) if row["name"] != "warm.example.test."]
            if len(got) >= 2:
                break
            time.sleep(0.05)
    assert [row["name"] for row in got] == ["fast.example.test.", "slow.example.test."]
    for row, rtt in zip(got, rtts, strict=True):
        assert 0 <= row["duration_ms"] <= rtt + SCHEDULING_SLACK_MS, (row, rtt)
    assert got[1]["duration_ms"] >= delay * 1000
    assert got[0]["duration_ms"] < delay * 1000 <= rtts[1]


def run_query(config_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", "query", *args, "-c", str(config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_dnsproxy_query_trace(nsd, tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
        '[[chain]]\nplugin = "cache"\n'
        f'[[chain]]\nplugin = "forward"\nupstreams = ["{nsd.addr}"]\n'
        '[[chain]]\nplugin = "forward"\nzones = ["other.test"]\nupstreams = ["127.0.0.1:9"]\n'
    )
    out = run_query(path, "alias.example.test", "A")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert ";; query: alias.example.test. A from 127.0.0.1 (udp)" in text
    assert ";;   config.toml: chain[1] (forward)" in text
    assert f"config.toml: chain[1] (forward): udp://{nsd.addr} answered rcode 0" in text
    assert ";; answered by: forward (config.toml: chain[1] (forward))" in text
    assert f";; upstream: udp://{nsd.addr}" in text
    assert ";; cache: miss" in text
    assert ";; response: NOERROR, 2 answer(s)" in text
    assert "alias.example.test. 300 IN CNAME www.example.test." in text
    assert "www.example.test. 300 IN A 192.0.2.10" in text

    out = run_query(path, "www.example.test", "BOGUS")
    assert out.returncode == 1 and "unknown record type 'BOGUS'" in out.stderr


def test_dnsproxy_query_explains_refusal(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[[chain]]\nplugin = "forward"\nzones = ["corp.test"]\nupstreams = ["127.0.0.1:9"]\n'
    )
    out = run_query(path, "www.example.org")
    assert out.returncode == 0, out.stderr
    assert ";; answered by: no step (the query fell off the end of the chain)" in out.stdout
    assert "no step answered: REFUSED" in out.stdout
    assert ";; response: REFUSED, 0 answer(s)" in out.stdout


def test_blocking_toggle_and_blocked_trace(nsd, make_proxy, tmp_path):
    if "blocklist" not in registry().steps:
        pytest.skip("the blocklist plugin is not registered yet")
    ads = tmp_path / "ads.hosts"
    ads.write_text("0.0.0.0 www.example.test\n")
    http_port = free_port()
    config = (
        '[server]\nlisten = ["127.0.0.1:{port}"]\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[[chain]]\nplugin = "blocklist"\nlists = ["{ads}"]\n'
        f'[[chain]]\nplugin = "forward"\nupstreams = ["{nsd.addr}"]\n'
    )
    proxy = make_proxy(config, wait_for=f"listening on http 127.0.0.1:{http_port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
        # the list loads in the background
        until(lambda: http.get("/ready").status_code == 200, message="blocklist never became ready")
        assert proxy.ask("www.example.test").answer[0][0].address == "0.0.0.0"
        r = http.post("/api/blocking/disable", params={"duration": "10m"})
        assert r.status_code == 200 and r.json()["enabled"] is False
        assert proxy.ask("www.example.test").answer[0][0].address == "192.0.2.10"
        assert http.post("/api/blocking/enable").json()["enabled"] is True
        assert proxy.ask("www.example.test").answer[0][0].address == "0.0.0.0"
        text = http.get("/metrics").text
        assert sample(text, "dnsproxy_requests_total", qtype="A", rcode="NOERROR") == 3
        stats = http.get("/api/stats").json()
        assert stats["source"] == "memory"
        assert stats["hour"]["blocked"] == 2 and stats["hour"]["queries"] == 3
        assert stats["hour"]["top_blocked"] == [{"name": "www.example.test.", "count": 2}]

    out = run_query(proxy.config_path, "www.example.test")
    assert out.returncode == 0, out.stderr
    assert ";; answered by: blocklist (config.toml: chain[0] (blocklist))" in out.stdout
    assert ";; matched list: " in out.stdout  # the list's name is the blocklist's business
    assert "config.toml: chain[0] (blocklist): blocked by " in out.stdout
    assert "www.example.test. 60 IN A 0.0.0.0" in out.stdout
