"""forward's upstreams with the real process: parallel racing and back-off (nsd, a slow
and a silent fake), and a DoT upstream named by host name, resolved through an nsd
bootstrap zone to kresd's DoT listener, following the zone when it changes."""

from __future__ import annotations

from pathlib import Path

import dns.rcode
import httpx
import trustme

from tests.conftest import ZONE, Nsd, free_port, until
from tests.fakeupstream import FakeUpstream
from tests.integration.test_encrypted import Kresd
from tests.plugins.test_http import sample


def test_parallel_answers_from_the_fast_one_and_backs_off_the_silent(make_nsd, make_proxy):
    fast = make_nsd({"example.test": ZONE})
    silent = FakeUpstream([{"drop": True}]).start_thread()
    slow = FakeUpstream([{"delay": 0.8, "answer": ["{qname} 300 IN A 192.0.2.99"]}])
    slow.start_thread()
    http_port = free_port()
    proxy = make_proxy(
        f"""
[server]
listen = ["127.0.0.1:{{port}}"]

[http]
listen = "127.0.0.1:{http_port}"

[[chain]]
plugin = "forward"
upstreams = ["{silent.addr}", "{slow.addr}", "{fast.addr}"]
policy = "parallel"
timeout = 0.4
backoff_after = 1
backoff_min = "0.5s"
backoff_max = "1s"
""",
        wait_for=f"listening on http 127.0.0.1:{http_port}",
    )
    labels = {name: f"udp://{up.addr}" for name, up in [("silent", silent), ("fast", fast)]}
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as http:

        def metric(name: str, up: str) -> float:
            return sample(http.get("/metrics").text, name, upstream=labels[up])

        for i in range(6):
            r = proxy.ask("www.example.test", id=i)
            assert r.rcode() == dns.rcode.NOERROR
            assert [rd.address for rd in r.answer[0]] == ["192.0.2.10"]  # nsd's, not slow's
        assert metric("dnsproxy_forward_upstream_up", "silent") == 0
        assert metric("dnsproxy_forward_upstream_up", "fast") == 1
        assert metric("dnsproxy_forward_upstream_answers_total", "fast") >= 6
        assert "backed off after 1 failures" in proxy.log()

        silent.set_rules([{"answer": ["{qname} 300 IN A 192.0.2.10"]}])  # it recovers
        until(
            lambda: metric("dnsproxy_forward_upstream_up", "silent") == 1,
            1.0 + 0.4 + 2,
            "the silent upstream was not probed back",
        )
        # Probes only (no client query since): ". NS", as it never answered a question.
        assert {(s.qname, s.qtype) for s in silent.seen} == {(".", 2)}
        assert metric("dnsproxy_forward_upstream_probes_total", "silent") >= 1
    silent.stop()
    slow.stop()


BOOT_ZONE = """\
$ORIGIN bench.test.
$TTL 1
@      IN SOA ns.bench.test. admin.bench.test. {serial} 3600 600 86400 1
@      IN NS  ns
ns     IN A   127.0.0.1
dot    IN A   {address}
"""


def test_dot_upstream_by_name_follows_the_bootstrap_zone(tmp_path: Path, make_proxy):
    def zones(address: str, serial: int) -> dict[str, str]:
        boot = BOOT_ZONE.format(address=address, serial=serial)
        return {"example.test": ZONE, "bench.test": boot}

    nsd = Nsd(tmp_path / "nsd", zones("127.0.0.1", 1)).start()
    ca = trustme.CA()
    kresd = Kresd(tmp_path / "kresd", nsd, ca)
    cert = ca.issue_cert("dot.bench.test")  # the name only: checked against the host name
    cert.private_key_pem.write_to_path(str(kresd.dir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(kresd.dir / "cert.pem"))
    kresd.start()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    try:
        proxy = make_proxy(
            f"""
[server]
listen = ["127.0.0.1:{{port}}"]

[[chain]]
plugin = "forward"
upstreams = [{{ url = "tls://dot.bench.test:{kresd.dot_port}", ca_file = "{ca_file}" }}]
bootstrap = ["{nsd.addr}"]
bootstrap_min_ttl = "0.5s"
timeout = 1
backoff_after = 100
"""
        )

        def answers() -> bool:
            r = proxy.ask("www.example.test")
            return r.rcode() == dns.rcode.NOERROR and r.answer != []

        until(answers, 5, "the DoT upstream never answered")
        nsd.reload_zones(zones("127.0.0.2", 2))  # nothing listens there
        until(lambda: not answers(), 5, "the new address was not followed")
        nsd.reload_zones(zones("127.0.0.1", 3))
        until(answers, 5, "the address changed back was not followed")
        assert "bootstrap: dot.bench.test is 127.0.0.2" in proxy.log()
    finally:
        kresd.stop()
        nsd.stop()
