"""The query log in the real process: where it writes, and records lost to a full buffer."""

from __future__ import annotations

import time

import dns.rcode
import httpx

from tests.conftest import free_port
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
buffer = 10
flush_interval = "60s"
"""


def test_run_logs_where_the_query_log_is_written(make_proxy):
    proxy = make_proxy(CONFIG.replace("{http}", str(free_port())))
    line = (
        "config.toml: chain[0] (querylog): logging queries to "
        f"{proxy.dir / 'log' / 'queries.sqlite'}, {proxy.dir / 'log' / 'queries.jsonl'}"
    )
    deadline = time.monotonic() + 10
    while line not in proxy.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.stop() == 0
    lines = [x for x in proxy.log().splitlines() if "logging queries to" in x]
    assert len(lines) == 1 and lines[0].endswith(line), proxy.log()


def test_records_dropped_by_a_full_buffer_are_in_stats_and_metrics(make_proxy):
    http_port = free_port()
    proxy = make_proxy(
        CONFIG.replace("{http}", str(http_port)),
        wait_for=f"listening on http 127.0.0.1:{http_port}",
    )
    for _ in range(15):  # the buffer holds 10 until the next flush, a minute away
        assert proxy.ask("www.example.test").rcode() == dns.rcode.REFUSED
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
        deadline = time.monotonic() + 5  # the last query is recorded just after its answer
        while True:
            stats = http.get("/api/stats").json()
            if stats.get("querylog", {}).get("dropped") == 5 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        metrics = http.get("/metrics").text
    assert stats["querylog"] == {
        "records": 0,
        "dropped": 5,
        "pruned": 0,
        "write_errors": 0,
        "buffered": 10,
    }
    assert sample(metrics, "dnsproxy_querylog_dropped_total", step="0") == 5
    assert sample(metrics, "dnsproxy_querylog_buffered", step="0") == 10
