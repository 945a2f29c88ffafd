"""The [http] service in-process: metrics after known traffic, health/ready, the JSON API."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import httpx
import pytest
import trio
from dnsproxy.plugins.http import HttpService
from dnsproxy.plugins.http.metrics import Observed

from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_FILTERED, EDE_PROHIBITED, EDE_STALE, respond
from dnsproxy.server import Server, load
from dnsproxy.testing import make_query
from tests.conftest import free_port

POLICY = '''
"""A test policy step: answers "*.blocked.test" NXDOMAIN unless paused, the rest 192.0.2.1."""
from dnsproxy import wire
from dnsproxy.chain import Metric, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.reply import respond, rr

class Policy(Step):
    pausable = True

    def __init__(self, options, setup):
        super().__init__(options, setup)
        self.flushes = 0
        self.is_ready = True
        self.hits = 0

    def query(self, q):
        if self.setup.blocking.active() and q.key.endswith(b"\\x07blocked\\x04test\\x00"):
            q.note("list", "test-list")
            q.explain("policy: matched test-list")
            return respond(q, wire.NXDOMAIN, source="blocklist", blocked=True)
        self.hits += 1
        q.note("rule", "default")
        return respond(q, 0, [rr(1, 60, bytes([192, 0, 2, 1]))], source="policy")

    def flush(self):
        self.flushes += 1

    def ready(self):
        return self.is_ready

    def metrics(self):
        return [Metric("hits", self.hits, labels=(("kind", "answer"),)),
                Metric("size", 7, kind="gauge")]

@hookimpl
def dnsproxy_add_steps(registry):
    registry.add_step("policy", Policy)
'''


def write_config(tmp_path: Path, body: str, policy: bool = True) -> Path:
    (tmp_path / "policy.py").write_text(POLICY)
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(body))
    return path


def config_text(
    dns_port: int, http_port: int, chain: str = '[[chain]]\nplugin = "policy"\n', http: str = ""
):
    return (
        'plugins = ["policy.py"]\n[server]\n'
        f'listen = ["127.0.0.1:{dns_port}"]\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\nquery_timeout = 2\n{http}{chain}'
    )


async def start(nursery: trio.Nursery, tmp_path: Path, chain: str | None = None, http: str = ""):
    dns_port, http_port = free_port(), free_port()
    text = (
        config_text(dns_port, http_port, http=http)
        if chain is None
        else config_text(dns_port, http_port, chain, http)
    )
    path = write_config(tmp_path, text)
    server = Server(path, handle_signals=False)
    await nursery.start(server.run)
    return server, dns_port, f"http://127.0.0.1:{http_port}"


async def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    fn = dns.query.tcp if tcp else dns.query.udp
    return await trio.to_thread.run_sync(lambda: fn(q, "127.0.0.1", timeout=2, port=port))


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (labels matched as a subset)."""
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(3) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(4))
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def policy_step(server: Server):
    return server.chain.steps[0]


async def test_metrics_after_known_traffic(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            for _ in range(3):
                assert (await ask(port, "www.example.org")).rcode() == dns.rcode.NOERROR
            await ask(port, "www.example.org", "AAAA", tcp=True)
            assert (await ask(port, "x.blocked.test")).rcode() == dns.rcode.NXDOMAIN
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.get("/metrics")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain")
            text = r.text
            assert (
                sample(text, "dnsproxy_requests_total", transport="udp", qtype="A", rcode="NOERROR")
                == 3
            )
            assert (
                sample(
                    text, "dnsproxy_requests_total", transport="tcp", qtype="AAAA", rcode="NOERROR"
                )
                == 1
            )
            assert sample(text, "dnsproxy_requests_total", rcode="NXDOMAIN") == 1
            assert sample(text, "dnsproxy_request_duration_seconds_count") == 5
            assert sample(text, "dnsproxy_request_duration_seconds_bucket", le="+Inf") == 5
            assert sample(text, "dnsproxy_queries_total") == 5
            assert sample(text, "dnsproxy_tcp_evicted_total") == 0
            assert sample(text, "dnsproxy_packet_hits_total") == 0  # the policy step is not pure
            assert sample(text, "dnsproxy_policy_hits_total", step="0", kind="answer") == 4
            assert sample(text, "dnsproxy_policy_size", step="0") == 7
            assert "# TYPE dnsproxy_policy_size gauge" in text
            server.stop()


async def test_health_ready_flush_and_routes(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path)
            step = policy_step(server)
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/health")).json() == {"status": "up"}
                r = await http.get("/ready")
                assert r.status_code == 200 and r.json()["ready"] is True
                step.is_ready = False
                r = await http.get("/ready")
                assert r.status_code == 503
                assert r.json()["steps"][0] == {
                    "step": "config.toml: chain[0] (policy)",
                    "plugin": "policy",
                    "ready": False,
                }
                assert (await http.post("/api/cache/flush")).json() == {"flushed": True}
                assert step.flushes == 1
                assert (await http.get("/api/cache/flush")).status_code == 405
                assert (await http.get("/nope")).status_code == 404
                r = await http.post("/api/cache/flush", headers={"Origin": "http://evil.example"})
                assert r.status_code == 403 and step.flushes == 1
            server.stop()


async def test_blocking_toggle_changes_answers(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await ask(port, "a.blocked.test")).rcode() == dns.rcode.NXDOMAIN
                r = await http.post("/api/blocking/disable", params={"duration": "5m"})
                assert r.status_code == 200
                assert r.json()["enabled"] is False and r.json()["disabled_until"] is not None
                assert 299 < server.blocking.seconds_left() <= 300
                assert (await ask(port, "a.blocked.test")).rcode() == dns.rcode.NOERROR
                r = await http.post("/api/blocking/enable")
                assert r.json()["enabled"] is True and r.json()["disabled_until"] is None
                assert (await ask(port, "a.blocked.test")).rcode() == dns.rcode.NXDOMAIN
                r = await http.post("/api/blocking/disable", params={"duration": "forever"})
                assert r.status_code == 400 and "duration" in r.json()["error"]
                r = await http.post("/api/blocking/disable", params={"duration": "30d"})
                assert r.status_code == 400
                assert server.blocking.active()
            server.stop()


async def test_blocking_without_support_is_409(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            chain = '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n'
            server, _, base = await start(n, tmp_path, chain)
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.get("/api/blocking/status")
                assert r.status_code == 409 and "blocklist" in r.json()["error"]
            server.stop()


async def test_api_query_returns_trace(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.get("/api/query", params={"name": "ads.blocked.test"})
                doc = r.json()
                assert r.status_code == 200
                assert doc["answered_by"] == "blocklist" and doc["blocked"] is True
                assert doc["rcode"] == "NXDOMAIN"
                assert doc["notes"] == {"list": "test-list"}
                assert "policy: matched test-list" in doc["trace"]
                assert "config.toml: chain[0] (policy): answered (rcode 3)" in doc["trace"]
                r = await http.get("/api/query", params={"name": "www.example.org", "type": "a"})
                doc = r.json()
                assert doc["rcode"] == "NOERROR" and doc["answered_by"] == "policy"
                assert doc["blocked"] is False
                assert doc["answer"] == ["www.example.org. 60 IN A 192.0.2.1"]
                for bad in ({}, {"name": "x..y"}, {"name": "a.test", "type": "NOPE"},
                            {"name": "a.test", "client": "me"}):  # fmt: skip
                    r = await http.get("/api/query", params=bad)
                    assert r.status_code == 400, bad
            # API queries are traces, not traffic: not counted as served queries.
            assert server.stats.queries == 0
            server.stop()


async def test_stats_from_memory(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            for name in ("a.blocked.test", "a.blocked.test", "b.blocked.test", "ok.test"):
                await ask(port, name)
            async with httpx.AsyncClient(base_url=base) as http:
                doc = (await http.get("/api/stats", params={"top": "1"})).json()
                assert (await http.get("/api/stats", params={"top": "0"})).status_code == 400
            assert doc["source"] == "memory"
            for window in ("hour", "day"):
                assert doc[window]["queries"] == 4
                assert doc[window]["blocked"] == 3
                assert doc[window]["blocked_share"] == 0.75
                assert doc[window]["top_blocked"] == [{"name": "a.blocked.test.", "count": 2}]
                assert doc[window]["top_clients"] == [{"client": "127.0.0.1", "count": 4}]
                assert doc[window]["untracked"] == {"clients": 0, "blocked_names": 0}
            server.stop()


def test_memory_stats_bounded_and_windowed():
    obs = Observed(600, 3, 2, now=0.0)
    for i in range(5):
        q = make_query(f"n{i}.example.org", client=f"192.0.2.{i}")
        obs.observe(q, respond(q, 3, source="blocklist", blocked=True), 0.001)
    assert len(obs.bucket.clients) == 2 and len(obs.bucket.names) == 2
    assert obs.bucket.clients_untracked == 3 and obs.bucket.names_untracked == 3
    stats = obs.stats(0.0, {"hour": 3600.0}, 5)
    assert stats["hour"]["untracked"] == {"clients": 3, "blocked_names": 3}
    assert sum(e["count"] for e in stats["hour"]["top_clients"]) == 2
    for t in (600.0, 1200.0, 1800.0):  # only 3 buckets are kept
        obs.rotate(t)
    q = make_query("late.example.org")
    obs.observe(q, None, 0.5)
    stats = obs.stats(1800.0, {"hour": 3600.0}, 5)
    assert stats["hour"]["queries"] == 1 and stats["hour"]["blocked"] == 0
    assert obs.requests[("udp", 1, -1)] == 1


def test_memory_stats_count_a_plugins_blocks_by_their_meaning():
    """What counts is `Reply.blocked` (EDE 15/16/17 or a step's blocked=True), not which
    step answered: an ACL's EDE 18 and the cache's stale EDE 3 are not blocks."""
    obs = Observed(600, 3, 10, now=0.0)
    answers = [
        ("late.games.test", dict(ede=[(EDE_FILTERED, "quiet hours")], source="quiet_hours")),
        ("late.games.test", dict(ede=[(EDE_FILTERED, "quiet hours")], source="quiet_hours")),
        ("denied.test", dict(source="policy", blocked=True)),
        ("printer.test", dict(ede=[(EDE_PROHIBITED, "acl")], source="acl")),
        ("old.test", dict(ede=[(EDE_STALE, "stale answer")], source="cache")),
        ("www.test", dict(source="forward")),
    ]
    for name, kw in answers:
        q = make_query(name)
        obs.observe(q, respond(q, 3, **kw), 0.001)
    stats = obs.stats(0.0, {"hour": 3600.0}, 5)["hour"]
    assert (stats["queries"], stats["blocked"], stats["blocked_share"]) == (6, 3, 0.5)
    assert stats["top_blocked"] == [
        {"name": "late.games.test.", "count": 2},
        {"name": "denied.test.", "count": 1},
    ]


def test_config_errors(tmp_path, monkeypatch):
    path = write_config(tmp_path, '[http]\nlisten = "nope:x"\n[[chain]]\nplugin = "forward"\n'
                        'upstreams = ["127.0.0.1:9"]\n')  # fmt: skip
    with pytest.raises(ConfigError, match=r"config.toml: http: option 'listen'"):
        load(path)
    path.write_text('[http]\nlisten = "127.0.0.1:0"\nquery_timeout = "soon"\n'
                    '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n')  # fmt: skip
    with pytest.raises(ConfigError, match=r"http: option 'query_timeout'"):
        load(path)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hypercorn" else real(name)
    )
    path.write_text('[http]\n[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n')
    with pytest.raises(ConfigError, match=r"http: needs the http extra .*missing hypercorn"):
        load(path)


async def test_bind_failure_is_a_clear_error(tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        path = write_config(tmp_path, config_text(free_port(), taken))
        server = Server(path, handle_signals=False)
        service = HttpService(server.config.services[0].options, server)
        with pytest.raises(ConfigError, match=rf"http: listen: cannot bind 127.0.0.1:{taken}"):
            await service.run()


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:9153", True),
        ("10.1.2.3:80", True),
        ("[::1]:9153", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost.:9153", True),
        ("dns.home.example:9153", True),
        ("DNS.Home.Example.", True),
        ("rebind.evil.example:9153", False),
        ("evil.localhost", False),
        ("localhost.evil.example", False),
        ("1.2.3.4.nip.io", False),
        ("127.0.0.1:port", False),
        ("[::1", False),
        ("[::1]x", False),
        ("[evil.example]", False),
        ("::1", False),
        ("", False),
    ],
)
def test_host_allowed(host, ok):
    from dnsproxy.plugins.http.app import host_allowed

    assert host_allowed(host, {"dns.home.example"}) is ok


async def raw_http(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


async def test_rebinding_host_refused_before_routing(tmp_path):
    """Issue 22 item 1: a page on rebind.evil.example controls Host and Origin alike."""
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            http_opts = 'hosts = ["dns.home.example"]\n'
            server, port, base = await start(n, tmp_path, http=http_opts)
            http_port = int(base.rsplit(":", 1)[1])
            evil = f"rebind.evil.example:{http_port}"
            headers = {"Host": evil, "Origin": f"http://{evil}"}
            async with httpx.AsyncClient(base_url=base) as http:
                r = await http.post(
                    "/api/blocking/disable", params={"duration": "1m"}, headers=headers
                )
                assert r.status_code == 421 and "Host" in r.json()["error"]
                assert (await ask(port, "a.blocked.test")).rcode() == dns.rcode.NXDOMAIN
                for method, path in (("GET", "/api/query?name=a.test"), ("GET", "/metrics"),
                                     ("GET", "/health"), ("HEAD", "/health"),
                                     ("GET", "/nope"), ("POST", "/api/cache/flush")):  # fmt: skip
                    r = await http.request(method, path, headers={"Host": evil})
                    assert r.status_code == 421, (method, path)
                assert policy_step(server).flushes == 0
                for host in ("localhost", f"localhost:{http_port}", "dns.home.example",
                             f"DNS.home.example.:{http_port}", f"[::1]:{http_port}",
                             "192.0.2.7"):  # fmt: skip
                    r = await http.get("/health", headers={"Host": host})
                    assert r.status_code == 200, host
                # a listed name may still not drive the API from another origin
                r = await http.post(
                    "/api/cache/flush",
                    headers={"Host": "dns.home.example", "Origin": f"http://{evil}"},
                )
                assert r.status_code == 403
            # HTTP/1.0 without Host: no browser sends that, so it is served
            out = await raw_http(http_port, b"GET /health HTTP/1.0\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 200") and b'"up"' in out
            out = await raw_http(
                http_port,
                b"GET /health HTTP/1.1\r\nHost: localhost\r\nHost: evil.example\r\n"
                b"Connection: close\r\n\r\n",
            )
            assert out.startswith(b"HTTP/1.1 400")
            server.stop()


def test_hosts_option_is_validated(tmp_path):
    for bad in ('["http://dns.example.org"]', '["dns.example.org:80"]', '["*.example.org"]',
                '[""]', "[1]"):  # fmt: skip
        path = write_config(
            tmp_path, config_text(free_port(), free_port(), http=f"hosts = {bad}\n")
        )
        with pytest.raises(ConfigError, match=r"config.toml: http: option 'hosts'"):
            load(path)


def ask_types(port: int, qtypes: range | list[int]) -> None:
    """One UDP query per qtype (blocking: run in a thread)."""
    for qtype in qtypes:
        q = dns.message.make_query("www.example.org", qtype)
        dns.query.udp(q, "127.0.0.1", timeout=2, port=port)


async def test_metrics_labels_bounded_and_rendered_off_loop(tmp_path, monkeypatch):
    """Issue 22 item 3: every qtype a client sends must not become a series of its own."""
    import threading

    from dnsproxy.plugins.http import app as app_mod

    threads = []
    real = app_mod.generate_latest

    def render(registry):
        threads.append(threading.current_thread())
        return real(registry)

    monkeypatch.setattr(app_mod, "generate_latest", render)
    unknown = [*range(300, 500), *range(65280, 65300)]  # no dnspython name for these
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            sent = [*range(1, 60), *unknown]
            await trio.to_thread.run_sync(ask_types, port, sent)
            async with httpx.AsyncClient(base_url=base) as http:
                text = (await http.get("/metrics")).text
            series = [ln for ln in text.splitlines() if ln.startswith("dnsproxy_requests_total")]
            assert len(series) <= len(dns.rdatatype.RdataType) + 1
            nameless = [t for t in sent if dns.rdatatype.to_text(t).startswith("TYPE")]
            assert len(nameless) >= len(unknown)
            assert sample(text, "dnsproxy_requests_total", qtype="other") == len(nameless)
            assert sample(text, "dnsproxy_requests_total", qtype="AAAA", rcode="NOERROR") == 1
            assert "TYPE300" not in text
            assert threads and threading.main_thread() not in threads
            server.stop()


async def test_step_counters_monotonic_across_reload(tmp_path):
    """Issue 21 item 2: a reload that rebuilds a step must not make its counters go back."""
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as http:
                for _ in range(3):
                    await ask(port, "www.example.org")
                text = (await http.get("/metrics")).text
                assert sample(text, "dnsproxy_policy_hits_total", step="0") == 3
                seen = [3.0]
                for _ in range(2):
                    old = policy_step(server)
                    assert await server.reload()
                    assert policy_step(server) is not old and policy_step(server).hits == 0
                    await ask(port, "www.example.org")
                    text = (await http.get("/metrics")).text
                    seen.append(sample(text, "dnsproxy_policy_hits_total", step="0"))
                assert seen == [3.0, 4.0, 5.0]
                assert sample(text, "dnsproxy_policy_size", step="0") == 7  # gauges as they are
            server.stop()


async def test_head_is_get_without_body(tmp_path):
    with trio.fail_after(20):
        async with trio.open_nursery() as n:
            server, _, base = await start(n, tmp_path)
            async with httpx.AsyncClient(base_url=base) as http:
                get = await http.get("/health")
                for path in ("/health", "/metrics", "/ready"):
                    r = await http.head(path)
                    assert r.status_code == 200, path
                    assert r.content == b""
                    assert (
                        r.headers["content-type"] == (await http.get(path)).headers["content-type"]
                    )
                assert int((await http.head("/health")).headers["content-length"]) == len(
                    get.content
                )
                assert (await http.head("/api/cache/flush")).status_code == 405
            server.stop()


async def test_concurrent_stats_share_one_computation(tmp_path, monkeypatch):
    """Issue 22 item 10: 50 concurrent /api/stats compute once, off the event loop."""
    import threading
    import time

    calls = []
    real = Observed.stats

    def counted(self, *args):
        calls.append(threading.current_thread())
        time.sleep(0.2)  # a heavy computation: must not hold up DNS
        return real(self, *args)

    monkeypatch.setattr(Observed, "stats", counted)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            server, port, base = await start(n, tmp_path)
            await ask(port, "a.blocked.test")
            results = []
            async with httpx.AsyncClient(base_url=base) as http:

                async def one() -> None:
                    results.append(await http.get("/api/stats"))

                async with trio.open_nursery() as clients:
                    for _ in range(50):
                        clients.start_soon(one)
                    while not calls:
                        await trio.sleep(0.01)
                    # DNS keeps answering while the stats are computed
                    assert (await ask(port, "a.blocked.test")).rcode() == dns.rcode.NXDOMAIN
                assert len(calls) == 1 and calls[0] is not threading.main_thread()
                assert all(r.status_code == 200 for r in results)
                assert len({r.content for r in results}) == 1
                assert results[0].json()["hour"]["queries"] == 1
                await trio.sleep(1.1)  # the cached answer expires after a second
                doc = (await http.get("/api/stats")).json()
                assert len(calls) == 2 and doc["hour"]["queries"] == 2
            server.stop()


async def test_api_work_bounded(tmp_path, monkeypatch):
    """api_concurrency slots, api_queue waiting, the rest 503 (health stays free)."""
    import time

    real = Observed.stats

    def slow(self, *args):
        time.sleep(0.5)
        return real(self, *args)

    monkeypatch.setattr(Observed, "stats", slow)
    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            http_opts = "api_concurrency = 1\napi_queue = 1\n"
            server, _, base = await start(n, tmp_path, http=http_opts)
            status = {}
            async with httpx.AsyncClient(base_url=base) as http:

                async def stats(top: int) -> None:
                    status[top] = (await http.get("/api/stats", params={"top": top})).status_code

                async with trio.open_nursery() as clients:
                    clients.start_soon(stats, 1)
                    await trio.sleep(0.1)
                    clients.start_soon(stats, 2)
                    await trio.sleep(0.1)
                    await stats(3)
                    assert (await http.get("/health")).status_code == 200
                    assert (await http.get("/metrics")).status_code == 503
            assert status == {1: 200, 2: 200, 3: 503}
            server.stop()
    for bad in (
        "api_concurrency = 0",
        "api_queue = -1",
        'session_ttl = "10s"',
        'login_window = "2d"',
        "log_page_size = 5",
    ):
        path = write_config(tmp_path, config_text(free_port(), free_port(), http=bad + "\n"))
        with pytest.raises(ConfigError, match=rf"http: option '{bad.split()[0]}'"):
            load(path)
