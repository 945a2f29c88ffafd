"""The query log in the real process: where it writes, and records lost to a full buffer."""

from __future__ import annotations

import time

import dns.rcode
import httpx

from tests.conftest import ROOT, free_port
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


def test_a_plugin_files_blocks_are_counted_as_blocked(make_proxy):
    """docs/examples/deny_names.py, loaded as a plugin file, answers with EDE 15: the real
    process logs it as blocked, and the API and the dashboard count it so."""
    http_port = free_port()
    proxy = make_proxy(
        f'plugins = ["{ROOT / "docs" / "examples" / "deny_names.py"}"]\n'
        + CONFIG.replace("{http}", str(http_port)).replace('"60s"', '"0.05s"')
        + '[[chain]]\nplugin = "deny_names"\nnames = ["ads.example.test"]\n'
        + '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.7 printer.example.test"]\n',
        wait_for=f"listening on http 127.0.0.1:{http_port}",
    )
    r = proxy.ask("x.ads.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [(o.code, o.text) for o in r.options] == [(15, "denied")]
    assert proxy.ask("printer.example.test").answer[0][0].address == "192.0.2.7"
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
        deadline = time.monotonic() + 10  # the log is written every 50 ms
        while True:
            stats = http.get("/api/stats").json()
            if stats["hour"]["queries"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        blocked = http.get("/ui/log/rows", params={"result": "blocked"}).text
        local = http.get("/ui/log/rows", params={"result": "local"}).text
    assert stats["source"] == "querylog"
    assert (stats["hour"]["queries"], stats["hour"]["blocked"]) == (2, 1)
    assert stats["hour"]["top_blocked"] == [{"name": "x.ads.example.test.", "count": 1}]
    assert "x.ads.example.test." in blocked and "printer.example.test." not in blocked
    assert "printer.example.test." in local and "x.ads.example.test." not in local
    assert proxy.stop() == 0
