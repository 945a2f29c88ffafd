"""SIGHUP in the real process: what a reload keeps (pause, cache, rate accounts), what it
says (serving, restart warnings), and a missing list file that must not stop the server."""

from __future__ import annotations

import re
import signal
import time

import dns.rcode
import httpx
import pytest

from tests.conftest import free_port, until
from tests.plugins.test_http import sample

HEAD = """
[server]
listen = ["127.0.0.1:{port}"]
[http]
listen = "127.0.0.1:{http}"
"""

BLOCK = """
[[chain]]
plugin = "blocklist"
lists = ["{ads}"]
"""

FORWARD = """
[[chain]]
plugin = "forward"
upstreams = ["{upstream}"]
timeout = 0.5
"""


def reload(proxy, times: int) -> None:
    """SIGHUP, then wait for the ``times``-th "reloaded" line of the log."""
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("reloaded ", times, 20)


def address(msg) -> str:
    return msg.answer[0][0].address


@pytest.fixture
def start(make_proxy, tmp_path, nsd):
    """Start the proxy on HEAD + chain text; returns (proxy, http client)."""
    clients: list[httpx.Client] = []

    def run(chain: str) -> tuple[object, httpx.Client]:
        http_port = free_port()
        text = (HEAD + chain).replace("{http}", str(http_port))
        text = text.replace("{upstream}", nsd.addr).replace("{ads}", str(tmp_path / "ads.txt"))
        proxy = make_proxy(text, wait_for=f"listening on http 127.0.0.1:{http_port}")
        http = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5)
        clients.append(http)
        return proxy, http

    (tmp_path / "ads.txt").write_text("www.example.test\n")
    yield run
    for http in clients:
        http.close()


def test_blocking_pause_survives_sighup(start):
    """Item 1: a pause is the user's intent, not config; a reload keeps it."""
    proxy, http = start(BLOCK + FORWARD)
    until(lambda: http.get("/ready").status_code == 200, message="list never loaded")
    assert address(proxy.ask()) == "0.0.0.0"
    status = http.post("/api/blocking/disable", params={"duration": "5m"}).json()
    assert status["enabled"] is False
    assert address(proxy.ask()) == "192.0.2.10"

    reload(proxy, 1)
    assert address(proxy.ask()) == "192.0.2.10"  # still paused after the reload
    after = http.get("/api/blocking/status").json()
    assert after["enabled"] is False and after["disabled_until"] == status["disabled_until"]
    assert "blocking resumed" not in proxy.log()

    assert http.post("/api/blocking/enable").json()["enabled"] is True
    assert address(proxy.ask()) == "0.0.0.0"
    assert proxy.log().count("blocking resumed") == 1

    # A pause without end survives a reload too; status has no end for it.
    status = http.post("/api/blocking/disable").json()
    assert status["enabled"] is False and status["seconds_left"] is None
    assert status["disabled_until"] is None and status["disabled_until_iso"] is None
    reload(proxy, 2)
    assert address(proxy.ask()) == "192.0.2.10"
    http.post("/api/blocking/enable")


def test_blocking_status_says_when_the_pause_ends(start):
    """Item 15: the epoch time stays; seconds left and an ISO-8601 UTC time come with it."""
    _, http = start(BLOCK + FORWARD)
    before = time.time()
    status = http.post("/api/blocking/disable", params={"duration": "5m"}).json()
    assert before + 299 < status["disabled_until"] <= time.time() + 300
    assert 299 <= status["seconds_left"] <= 300
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(status["disabled_until"]))
    assert status["disabled_until_iso"] == iso
    time.sleep(1.1)
    later = http.get("/api/blocking/status").json()
    assert later["disabled_until"] == status["disabled_until"]
    assert later["seconds_left"] <= status["seconds_left"] - 1
    enabled = http.post("/api/blocking/enable").json()
    assert enabled["enabled"] is True
    assert enabled["seconds_left"] is enabled["disabled_until_iso"] is None


def test_timed_pause_ends_by_itself_and_logs_it(start):
    """Item 1: a pause that runs out is logged as resumed with no query arriving."""
    proxy, http = start(BLOCK + FORWARD)
    until(lambda: http.get("/ready").status_code == 200, message="list never loaded")
    http.post("/api/blocking/disable", params={"duration": "1s"})
    reload(proxy, 1)
    proxy.wait_log("blocking resumed", timeout=5)
    assert http.get("/api/blocking/status").json()["enabled"] is True
    assert address(proxy.ask()) == "0.0.0.0"
    assert proxy.log().count("blocking resumed") == 1


def test_unchanged_cache_and_ratelimit_keep_their_state(start, nsd, tmp_path):
    """Item 2: a reload that leaves the cache and ratelimit steps alone keeps their state."""
    chain = (
        '[[chain]]\nplugin = "ratelimit"\nqueries_per_second = 1000\n'
        '[[chain]]\nplugin = "cache"\n' + FORWARD
    )
    proxy, http = start(chain)
    assert address(proxy.ask()) == "192.0.2.10"
    assert address(proxy.ask()) == "192.0.2.10"
    text = http.get("/metrics").text
    assert sample(text, "dnsproxy_cache_entries") == 1
    assert sample(text, "dnsproxy_cache_hits_total") == 1
    assert sample(text, "dnsproxy_ratelimit_entries") == 1
    nsd.stop()  # from now on only the cache can answer

    # An unrelated change: a hosts step in front; the cache and ratelimit tables are equal.
    config = proxy.config_path.read_text()
    hosts = '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.50 printer.lan"]\n'
    proxy.config_path.write_text(config.replace("[[chain]]", hosts + "[[chain]]", 1))
    reload(proxy, 1)
    text = http.get("/metrics").text
    assert sample(text, "dnsproxy_cache_entries") == 1
    assert sample(text, "dnsproxy_ratelimit_entries") == 1
    hit = proxy.ask()
    assert hit.rcode() == dns.rcode.NOERROR and address(hit) == "192.0.2.10"
    text = http.get("/metrics").text
    assert sample(text, "dnsproxy_cache_hits_total") == 2
    assert sample(text, "dnsproxy_cache_misses_total") == 1

    # A changed cache step starts empty (its options differ).
    proxy.config_path.write_text(
        proxy.config_path.read_text().replace(
            'plugin = "cache"\n', 'plugin = "cache"\nmax_entries = 500\n'
        )
    )
    reload(proxy, 2)
    assert sample(http.get("/metrics").text, "dnsproxy_cache_entries") == 0


def test_restart_warning_compares_with_what_is_bound(start):
    """Item 3: the warning follows the bound listeners, not the previous file."""
    proxy, _ = start(FORWARD)
    config = proxy.config_path.read_text()
    moved = config.replace(f"127.0.0.1:{proxy.port}", f"127.0.0.1:{free_port()}", 1)
    assert moved != config
    warning = "listen addresses changed; restart to apply them"
    proxy.config_path.write_text(moved)
    reload(proxy, 1)
    assert proxy.log().count(warning) == 1
    proxy.config_path.write_text(config)
    reload(proxy, 2)
    assert proxy.log().count(warning) == 1  # the restored file matches the listeners
    assert proxy.ask().rcode() == dns.rcode.NOERROR


def test_reload_says_when_the_new_config_serves(start):
    """Item 4: one line once the new chain serves, with the time the reload took."""
    proxy, _ = start(BLOCK + FORWARD)
    reload(proxy, 1)
    lines = re.findall(r"reloaded config\.toml: (\d+) steps serving in (\d+\.\d\d) s", proxy.log())
    assert len(lines) == 1 and int(lines[0][0]) == 2 and float(lines[0][1]) < 10


def test_missing_list_file_serves_and_is_picked_up(make_proxy, tmp_path, nsd):
    """Item 7: a missing list is an error in the log and /ready, not a dead server."""
    (tmp_path / "ads.txt").write_text("www.example.test\n")
    late = tmp_path / "late.txt"
    http_port = free_port()
    config = (
        HEAD.replace("{http}", str(http_port))
        + f'[[chain]]\nplugin = "blocklist"\nwatch = "0.2s"\n'
        f'lists = ["{tmp_path / "ads.txt"}", "{late}"]\n' + FORWARD.replace("{upstream}", nsd.addr)
    )
    proxy = make_proxy(config, wait_for=f"listening on http 127.0.0.1:{http_port}")
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:
        until(lambda: address(proxy.ask()) == "0.0.0.0", message=proxy.log())
        assert address(proxy.ask("mail.example.test")) == "192.0.2.25"
        r = http.get("/ready")
        assert r.status_code == 503
        (step,) = [s for s in r.json()["steps"] if s["plugin"] == "blocklist"]
        assert step["ready"] is False and "late.txt" in step["reason"]
        errors = [line for line in proxy.log().splitlines() if " error " in line]
        assert any(str(late) in line and "create the file" in line for line in errors), errors

        late.write_text("mail.example.test\n")
        until(lambda: address(proxy.ask("mail.example.test")) == "0.0.0.0", 5, proxy.log())
        assert http.get("/ready").status_code == 200
        assert address(proxy.ask()) == "0.0.0.0"
