"""``[server] workers = 2``: the real supervisor and worker processes on loopback.

One client address always reaches one worker (the classic-BPF steering, seen through a
test plugin answering with its process id), every query is answered, logged once and
counted once in /metrics, a ratelimited client is limited at the configured rate, SIGHUP
reloads both workers (and a bad config neither), SIGTERM stops all, and a worker that
dies is restarted on its own sockets.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import httpx
import pytest

from dnsproxy.config import reuseport_steering
from tests.conftest import Proxy, csrf, free_port, until
from tests.integration.test_listeners_encrypted import CT, Encrypted

pytestmark = pytest.mark.skipif(not reuseport_steering(), reason="needs Linux SO_REUSEPORT")

# Answers whoami.test TXT with the process id of the worker that handled the query.
WHOAMI_PLUGIN = """
import os

from dnsproxy import wire
from dnsproxy.chain import Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.reply import respond, rr


class WhoAmI(Step):
    def query(self, q):
        if q.key != wire.name_to_key("whoami.test"):
            return None
        pid = str(os.getpid()).encode()
        return respond(q, wire.NOERROR, [rr(16, 0, bytes([len(pid)]) + pid)], source="whoami")


@hookimpl
def dnsproxy_add_steps(registry):
    registry.add_step("whoami", WhoAmI)
"""

# Two workers and the supervisor's [http]; HTTP_PORT is replaced by a free port.
WORKERS_AND_HTTP = """
[server]
listen = ["127.0.0.1:{port}"]
workers = 2

[http]
listen = "127.0.0.1:HTTP_PORT"
"""

CONFIG = (
    'plugins = ["PLUGIN"]\n'
    + WORKERS_AND_HTTP
    + """
[[chain]]
plugin = "querylog"
flush_interval = "50ms"

[[chain]]
plugin = "ratelimit"
clients = ["127.0.1.0/24"]
queries_per_second = 10
queries_burst = 20

[[chain]]
plugin = "whoami"

[[chain]]
plugin = "hosts"
entries = ["HOSTS_IP printer.lan"]
"""
)

CLIENTS = [f"127.0.0.{i}" for i in range(1, 51)]  # 50 client addresses, both parities
READY = "workers: 2 serving"


def start(make_proxy, tmp_path: Path, hosts_ip: str = "192.0.2.1") -> tuple[Proxy, int]:
    plugin = tmp_path / "whoami.py"
    plugin.write_text(WHOAMI_PLUGIN)
    http = free_port()
    text = CONFIG.replace("PLUGIN", str(plugin)).replace("HTTP_PORT", str(http))
    return make_proxy(text.replace("HOSTS_IP", hosts_ip), wait_for=READY), http


def worker_pids(proxy: Proxy) -> dict[int, int]:
    """Worker index -> pid, from the supervisor's log (the latest start of each)."""
    found = re.findall(r"worker (\d+) serving \(pid (\d+)\)", proxy.log())
    return {int(i): int(pid) for i, pid in found}


def whoami(proxy: Proxy, source: str, tcp: bool = False) -> int:
    reply = proxy.ask("whoami.test", "TXT", source=source, tcp=tcp)
    return int(reply.answer[0][0].strings[0])


def address(proxy: Proxy, source: str) -> str:
    return proxy.ask("printer.lan", source=source).answer[0][0].address


def metrics(http: int) -> dict[str, float]:
    """Sample name (labels dropped) -> the sum of its values."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = name.split("{", 1)[0]
            out[name] = out.get(name, 0.0) + float(value)
    return out


def blast(proxy: Proxy, sources: list[str], per_source: int, window: int = 50) -> int:
    """``per_source`` A queries for printer.lan from each address (``window`` in flight);
    the number of NOERROR answers."""
    q = dns.message.make_query("printer.lan", "A")
    answered = 0
    for source in sources:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(5)
            sent = got = 0
            while got < per_source:
                while sent < per_source and sent - got < window:
                    q.id = sent
                    sock.sendto(q.to_wire(), proxy.addr)
                    sent += 1
                reply = dns.message.from_wire(sock.recv(65535))
                answered += reply.rcode() == dns.rcode.NOERROR
                got += 1
    return answered


def test_one_client_one_worker_and_both_workers_used(make_proxy, tmp_path: Path) -> None:
    proxy, _ = start(make_proxy, tmp_path)
    pids = worker_pids(proxy)
    assert len(pids) == 2 and pids[0] != pids[1]
    for i, source in enumerate(CLIENTS, start=1):
        seen = {whoami(proxy, source) for _ in range(3)} | {whoami(proxy, source, tcp=True)}
        # the program returns the IPv4 source modulo 2: 127.0.0.i goes to worker i % 2
        assert seen == {pids[i % 2]}, (source, seen, pids)


def test_ten_thousand_queries_logged_and_counted_once(make_proxy, tmp_path: Path) -> None:
    proxy, http = start(make_proxy, tmp_path)
    assert blast(proxy, CLIENTS, 200) == 10_000
    db = proxy.dir / ".dnsproxy-state" / "querylog.sqlite"

    def rows() -> int:
        with sqlite3.connect(db) as conn:
            return conn.execute("SELECT count(*) FROM queries").fetchone()[0]

    until(lambda: rows() == 10_000)
    until(lambda: metrics(http)["dnsproxy_requests_total"] == 10_000)
    m = metrics(http)
    assert m["dnsproxy_queries_total"] == 10_000  # the workers' core counters, summed
    time.sleep(0.3)
    assert rows() == 10_000  # no record written twice


def test_ratelimit_is_exact_across_workers(make_proxy, tmp_path: Path) -> None:
    """100 queries from one address, each from its own source port (a reuseport hash of
    the 4-tuple would spread them over both workers and double the burst)."""
    proxy, _ = start(make_proxy, tmp_path)
    wire_q = dns.message.make_query("printer.lan", "A").to_wire()
    socks = []
    start_time = time.monotonic()
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.1.1", 0))
        sock.settimeout(5)
        sock.sendto(wire_q, proxy.addr)
        socks.append(sock)
    rcodes = []
    for sock in socks:
        rcodes.append(dns.message.from_wire(sock.recv(65535)).rcode())
        sock.close()
    elapsed = time.monotonic() - start_time
    ok = rcodes.count(dns.rcode.NOERROR)
    assert rcodes.count(dns.rcode.REFUSED) == 100 - ok
    assert 20 <= ok <= 20 + 10 * elapsed + 1, (ok, elapsed)


def test_sighup_reloads_both_workers_and_a_bad_config_neither(make_proxy, tmp_path: Path) -> None:
    proxy, _ = start(make_proxy, tmp_path)
    sources = ["127.0.0.1", "127.0.0.2"]  # one per worker
    assert {address(proxy, s) for s in sources} == {"192.0.2.1"}
    good = proxy.config_path.read_text()
    proxy.config_path.write_text(good + '\n[[chain]]\nplugin = "nosuchplugin"\n')
    proxy.signal(signal.SIGHUP)
    until(lambda: "reload failed" in proxy.log())
    time.sleep(0.3)
    assert {address(proxy, s) for s in sources} == {"192.0.2.1"}
    assert "worker 0: reloaded" not in proxy.log() and "worker 1: reloaded" not in proxy.log()
    changed = good.replace("192.0.2.1", "192.0.2.99").replace("workers = 2", "workers = 3")
    proxy.config_path.write_text(changed)
    proxy.signal(signal.SIGHUP)
    until(lambda: all(address(proxy, s) == "192.0.2.99" for s in sources))
    until(lambda: "worker 0: reloaded" in proxy.log() and "worker 1: reloaded" in proxy.log())
    assert "reload: workers changed; restart to apply it (2 serve)" in proxy.log()
    assert len(worker_pids(proxy)) == 2


def test_sigterm_stops_all_within_five_seconds(make_proxy, tmp_path: Path) -> None:
    """...and the queries answered just before are all in the query log."""
    proxy, _ = start(make_proxy, tmp_path)
    pids = worker_pids(proxy)
    assert proxy.proc is not None
    assert blast(proxy, CLIENTS[:4], 50) == 200
    began = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(5) == 0
    assert time.monotonic() - began < 5
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    db = proxy.dir / ".dnsproxy-state" / "querylog.sqlite"
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM queries").fetchone()[0] == 200


# Fails to load in a worker process only (there, __main__ is dnsproxy.workers).
FAILING_IN_WORKERS = """
import sys

if getattr(sys.modules["__main__"].__spec__, "name", "") == "dnsproxy.workers":
    raise RuntimeError("not in a worker")
"""


def test_a_worker_failing_at_start_up_stops_the_service_with_status_1(tmp_path: Path) -> None:
    plugin = tmp_path / "failing.py"
    plugin.write_text(FAILING_IN_WORKERS)
    config = tmp_path / "config.toml"
    config.write_text(
        f'plugins = ["{plugin}"]\n[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n'
        '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.1 a.lan"]\n'
    )
    run = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "run", "-c", str(config)],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert "not in a worker" in run.stderr
    assert "failed to start (exit status 1)" in run.stderr


def test_a_dead_worker_is_restarted_on_its_sockets(make_proxy, tmp_path: Path) -> None:
    proxy, _ = start(make_proxy, tmp_path)
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGKILL)
    until(lambda: worker_pids(proxy)[1] != pids[1])
    assert "worker 1 exited" in proxy.log()
    assert whoami(proxy, "127.0.0.1") == worker_pids(proxy)[1]  # odd: still worker 1
    assert whoami(proxy, "127.0.0.2") == pids[0]


FANOUT = (
    WORKERS_AND_HTTP
    + """
[groups]
kids = ["127.0.0.2", "127.0.0.3"]

[[chain]]
plugin = "blocklist"
lists = ["ADS"]

[[chain]]
plugin = "hosts"
entries = ["192.0.2.1 ads.example.test www.shop.test"]
"""
)


def test_dashboard_actions_reach_every_worker(make_proxy, tmp_path: Path) -> None:
    """A blocking pause and resume from the API (of all, and of one group), and a managed
    block and allow from the dashboard, change the answers of both workers."""
    ads = tmp_path / "ads.txt"
    ads.write_text("ads.example.test\n")
    http = free_port()
    proxy = make_proxy(
        FANOUT.replace("ADS", str(ads)).replace("HTTP_PORT", str(http)), wait_for=READY
    )
    sources = ["127.0.0.1", "127.0.0.2"]  # one per worker

    def answers(name: str) -> set[str]:
        return {proxy.ask(name, source=s).answer[0][0].address for s in sources}

    until(lambda: answers("ads.example.test") == {"0.0.0.0"})
    with httpx.Client(base_url=f"http://127.0.0.1:{http}") as web:
        assert web.post("/api/blocking/disable", params={"duration": "5m"}).status_code == 200
        until(lambda: answers("ads.example.test") == {"192.0.2.1"}, 5)
        assert web.post("/api/blocking/enable").status_code == 200
        until(lambda: answers("ads.example.test") == {"0.0.0.0"}, 5)
        r = web.post("/api/blocking/disable", params={"group": "kids", "duration": "5m"})
        assert r.status_code == 200
        kids = ["127.0.0.2", "127.0.0.3"]  # one per worker; 127.0.0.1 and .4 are not kids

        def ads(source: str) -> str:
            return proxy.ask("ads.example.test", source=source).answer[0][0].address

        until(lambda: {ads(s) for s in kids} == {"192.0.2.1"}, 5)
        assert {ads("127.0.0.1"), ads("127.0.0.4")} == {"0.0.0.0"}
        assert web.post("/api/blocking/enable", params={"group": "kids"}).status_code == 200
        until(lambda: {ads(s) for s in kids} == {"0.0.0.0"}, 5)
        assert answers("www.shop.test") == {"192.0.2.1"}
        page = web.get("/managed")
        token = csrf(page.text)
        assert web.post("/ui/block", data={"name": "shop.test", "csrf": token}).status_code == 303
        until(lambda: answers("www.shop.test") == {"0.0.0.0"}, 5)
        r = web.post("/ui/allow", data={"name": "ads.example.test", "csrf": token})
        assert r.status_code == 303
        until(lambda: answers("ads.example.test") == {"192.0.2.1"}, 5)


def test_a_restarted_worker_takes_the_pause_in_force(make_proxy, tmp_path: Path) -> None:
    """The supervisor hands a worker that (re)starts the current pauses with its "ready"
    answer: a worker restarted during a group's pause does not block that group until the
    next change. (127.0.0.1 and 127.0.0.3 reach worker 1; only .3 is a kid.)"""
    ads = tmp_path / "ads.txt"
    ads.write_text("ads.example.test\n")
    http = free_port()
    proxy = make_proxy(
        FANOUT.replace("ADS", str(ads)).replace("HTTP_PORT", str(http)), wait_for=READY
    )

    def ads_for(source: str) -> str:
        return proxy.ask("ads.example.test", source=source).answer[0][0].address

    until(lambda: ads_for("127.0.0.3") == "0.0.0.0")
    with httpx.Client(base_url=f"http://127.0.0.1:{http}") as web:
        r = web.post("/api/blocking/disable", params={"group": "kids", "duration": "5m"})
        assert r.status_code == 200
    until(lambda: ads_for("127.0.0.3") == "192.0.2.1", 5)
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGKILL)
    until(lambda: worker_pids(proxy)[1] != pids[1])
    until(lambda: ads_for("127.0.0.1") == "0.0.0.0", 5)  # its list is loaded: it blocks
    until(lambda: ads_for("127.0.0.3") == "192.0.2.1", 5)  # but not the paused kids


def test_tls_and_https_listeners_are_served_by_both_workers(make_proxy, tmp_path: Path) -> None:
    """DoT and DoH from one address per worker are answered, and logged by the supervisor."""
    enc = Encrypted(tmp_path, make_proxy, server="workers = 2")
    until(lambda: READY in enc.proxy.log())
    q = dns.message.make_query("www.example.test", "A")
    for source in ("127.0.0.1", "127.0.0.2"):
        dot = dns.query.tls(q, "127.0.0.1", port=enc.dot, source=source, timeout=5,
                            ssl_context=enc.context(), server_hostname="dns.example")  # fmt: skip
        assert dot.answer[0][0].address == "192.0.2.10"
        transport = httpx.HTTPTransport(local_address=source, verify=enc.context())
        with httpx.Client(transport=transport) as web:
            r = web.post(enc.url(), content=q.to_wire(), headers=CT)
        assert dns.message.from_wire(r.content).answer[0][0].address == "192.0.2.10"
    until(lambda: len(enc.log_rows()) == 4)
    assert sorted(row["transport"] for row in enc.log_rows()) == ["https", "https", "tls", "tls"]


def test_workers_stop_when_the_supervisor_is_killed(make_proxy, tmp_path: Path) -> None:
    proxy, _ = start(make_proxy, tmp_path)
    pids = worker_pids(proxy)
    assert proxy.proc is not None
    proxy.proc.kill()
    proxy.proc.wait()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    until(lambda: all(gone(pid) for pid in pids.values()), 5)
    assert "Traceback" not in proxy.log()


LISTS_AND_CACHE = (
    WORKERS_AND_HTTP
    + """
[[chain]]
plugin = "blocklist"
lists = ["LIST_URL"]
refresh = "24h"

[[chain]]
plugin = "cache"

[[chain]]
plugin = "hosts"
entries = ["192.0.2.1 ads.example.test tracker.example.test"]
"""
)


def test_list_refresh_and_cache_page_cover_every_worker(make_proxy, tmp_path: Path) -> None:
    """The dashboard's "refresh now" re-downloads the list in both workers (not only in
    the supervisor, which answers no query), and its cache page counts both workers' hits."""
    www = tmp_path / "www"
    www.mkdir()
    (www / "ads.txt").write_text("ads.example.test\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    lists = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=lists.serve_forever, daemon=True).start()
    try:
        port = free_port()
        url = f"http://127.0.0.1:{lists.server_address[1]}/ads.txt"
        text = LISTS_AND_CACHE.replace("LIST_URL", url).replace("HTTP_PORT", str(port))
        proxy = make_proxy(text, wait_for=READY)
        sources = ["127.0.0.1", "127.0.0.2"]  # one per worker

        def answers(name: str) -> set[str]:
            return {proxy.ask(name, source=s).answer[0][0].address for s in sources}

        until(lambda: answers("ads.example.test") == {"0.0.0.0"})
        assert answers("tracker.example.test") == {"192.0.2.1"}
        assert answers("tracker.example.test") == {"192.0.2.1"}  # a cache hit in each
        (www / "ads.txt").write_text("ads.example.test\ntracker.example.test\n")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as web:
            page = web.get("/cache")
            hits = re.search(
                r"<td>[^<]*cache[^<]*</td><td[^>]*>\d+</td><td[^>]*>(\d+)</td>", page.text
            )
            assert hits is not None and int(hits.group(1)) >= 2, page.text
            token = csrf(page.text)
            form = {"step": "0", "list": "0", "csrf": token}
            assert web.post("/ui/lists/refresh", data=form).status_code == 303
        until(lambda: answers("tracker.example.test") == {"0.0.0.0"}, 5)
    finally:
        lists.shutdown()


# Every query to the relay, which forwards everything back: a forwarding loop.
TO_RELAY = (
    WORKERS_AND_HTTP
    + """
[[chain]]
plugin = "forward"
upstreams = ["127.0.0.1:RELAY_PORT"]
"""
)

RELAY = """
[server]
listen = ["127.0.0.1:RELAY_PORT"]

[http]
listen = "127.0.0.1:HTTP_PORT"

[[chain]]
plugin = "forward"
upstreams = ["127.0.0.1:PROXY_PORT"]
"""


def test_a_loop_through_both_workers_is_caught_at_its_first_return(
    make_proxy, tmp_path: Path
) -> None:
    """The workers are one proxy with one loop secret, also after a reload and in a
    restarted worker. A client's query reaches worker 0, which forwards it to a relay;
    the relay sends it back from 127.0.0.1, to worker 1, which knows the token worker 0
    put on it: the query went round once. (With a secret per worker, worker 1 would add
    its own token and forward it again, and the relay would catch the loop.)"""
    http, relay_port, relay_http = free_port(), free_port(), free_port()
    text = TO_RELAY.replace("HTTP_PORT", str(http)).replace("RELAY_PORT", str(relay_port))
    proxy = make_proxy(text, wait_for=READY)
    relay_text = RELAY.replace("RELAY_PORT", str(relay_port)).replace("HTTP_PORT", str(relay_http))
    relay = make_proxy(relay_text.replace("PROXY_PORT", str(proxy.port)))
    client = "127.0.0.2"  # worker 0 (127.0.0.i reaches worker i % 2); 127.0.0.1: worker 1

    def counts(port: int) -> tuple[float, float]:
        """Loops caught and queries forwarded (summed over the workers of a proxy)."""
        m = metrics(port)
        return m["dnsproxy_forward_loops_total"], m["dnsproxy_forward_upstream_queries_total"]

    def loop_caught(n: int) -> None:
        """Query n goes round once: the relay forwards it once and catches no loop."""
        assert proxy.ask(f"q{n}.loop.test", source=client).rcode() == dns.rcode.SERVFAIL
        assert counts(relay_http) == (0, n)

    loop_caught(1)
    assert counts(http) == (1, 1)  # the proxy forwarded it once, worker 1 caught it
    assert "worker 1: forwarding loop: q1.loop.test" in proxy.log()
    proxy.signal(signal.SIGHUP)
    until(lambda: "worker 0: reloaded" in proxy.log() and "worker 1: reloaded" in proxy.log())
    loop_caught(2)
    pids = worker_pids(proxy)
    os.kill(pids[1], signal.SIGKILL)
    until(lambda: worker_pids(proxy)[1] != pids[1])
    loop_caught(3)
    assert "forwarding loop" not in relay.log()
