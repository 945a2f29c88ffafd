"""forward's upstream health (back-off, probes), the parallel policy, bootstrap
resolution of upstream host names, and DNS stamps."""

from __future__ import annotations

import base64

import pytest
import trio

from dnsproxy import wire
from dnsproxy.errors import ConfigError
from dnsproxy.testing import build_step, make_query, run_chain
from dnsproxy.upstream import UpstreamSpec, parse_stamp
from tests.fakeupstream import FakeUpstream


async def start(nursery, rules) -> FakeUpstream:
    up = FakeUpstream(rules)
    await nursery.start(up.run)
    return up


def answer(ip: str) -> list[dict]:
    return [{"answer": [f"{{qname}} 300 IN A {ip}"]}]


def samples(step) -> dict:
    return {(m.name, m.labels): m.value for m in step.metrics()}


def label(up: FakeUpstream) -> tuple:
    return (("upstream", f"udp://{up.addr}"),)


async def ask(step, name: str, trace: list[str] | None = None):
    q = make_query(name)
    q.trace = trace
    with trio.fail_after(5):
        return await run_chain([step], q)


async def test_failing_upstream_is_backed_off_then_probed_back(nursery):
    silent = await start(nursery, [{"drop": True}])
    fast = await start(nursery, answer("192.0.2.2"))
    step = build_step(
        "forward",
        {
            "upstreams": [silent.addr, fast.addr],
            "timeout": 0.2,
            "backoff_after": 2,
            "backoff_min": "0.3s",
            "backoff_max": "0.6s",
        },
    )
    nursery.start_soon(step.run)
    for i in range(2):
        reply = await ask(step, f"a{i}.example.org")
        assert reply.message().answer[0][0].address == "192.0.2.2"
    m = samples(step)
    assert m[("upstream_up", label(silent))] == 0 and m[("upstream_up", label(fast))] == 1
    assert m[("upstream_backoff_seconds", label(silent))] == 0.3
    assert step.ready()

    # Backed off: a client's query goes straight to the fast one, and the trace says why.
    trace: list[str] = []
    before = len(silent.seen)
    t0 = trio.current_time()
    reply = await ask(step, "b.example.org", trace)
    assert trio.current_time() - t0 < 0.15
    assert [s.qname for s in silent.seen[before:]] == []
    assert any(f"skipped udp://{silent.addr}: backed off after 2 failures" in t for t in trace)

    # Probes (the last question it was asked... none answered: ". NS") go on failing and
    # the back-off doubles to its maximum; once it answers again it is used again.
    with trio.fail_after(3):
        while samples(step)[("upstream_backoff_seconds", label(silent))] < 0.6:
            await trio.sleep(0.05)
    assert {s.qname for s in silent.seen[before:]} == {"."}
    silent.set_rules(answer("192.0.2.1"))
    with trio.fail_after(0.6 + 0.2 + 1):
        while not samples(step)[("upstream_up", label(silent))]:
            await trio.sleep(0.05)
    reply = await ask(step, "c.example.org")
    assert reply.message().answer[0][0].address == "192.0.2.1"
    m = samples(step)
    assert m[("upstream_probes", label(silent))] >= 2
    assert m[("upstream_answers", label(silent))] == 1
    assert m[("upstream_latency_seconds", (*label(fast), ("quantile", "0.5")))] > 0


async def test_all_backed_off_still_asked_and_not_ready(nursery):
    silent = await start(nursery, [{"drop": True}])
    step = build_step("forward", {"upstreams": [silent.addr], "timeout": 0.1, "backoff_after": 1})
    reply = await ask(step, "a.example.org")
    assert reply.rcode == wire.SERVFAIL and not step.ready()
    assert "backed off after 1 failures" in step.not_ready_reason()
    silent.set_rules(answer("192.0.2.1"))  # asked anyway, and answering brings it back
    reply = await ask(step, "b.example.org")
    assert reply.rcode == 0 and step.ready()


async def test_parallel_takes_the_first_good_answer(nursery):
    slow = await start(nursery, [{"delay": 0.6, "answer": ["{qname} 300 IN A 192.0.2.1"]}])
    fast = await start(nursery, [{"delay": 0.05, "answer": ["{qname} 300 IN A 192.0.2.2"]}])
    step = build_step(
        "forward", {"upstreams": [slow.addr, fast.addr], "policy": "parallel", "timeout": 1}
    )
    t0 = trio.current_time()
    reply = await ask(step, "p.example.org")
    assert trio.current_time() - t0 < 0.4
    assert reply.message().answer[0][0].address == "192.0.2.2"
    assert len(slow.seen) == 1 and len(fast.seen) == 1  # both asked at once
    # A bad answer from one waits for the other.
    fast.set_rules([{"rcode": "SERVFAIL"}])
    reply = await ask(step, "q.example.org")
    assert reply.rcode == 0 and reply.message().answer[0][0].address == "192.0.2.1"
    # Both bad: SERVFAIL naming both.
    slow.set_rules([{"rcode": "SERVFAIL"}])
    reply = await ask(step, "r.example.org")
    assert reply.rcode == wire.SERVFAIL
    ((_, text),) = reply.ede
    assert slow.addr in text and fast.addr in text


async def test_parallel_races_the_best_scores(nursery):
    ups = [await start(nursery, answer(f"192.0.2.{i}")) for i in range(1, 4)]
    step = build_step("forward", {"upstreams": [u.addr for u in ups], "policy": "parallel"})
    step.health[f"udp://{ups[0].addr}"].failed(2.0)  # recently failed: the worst score
    await ask(step, "s.example.org")
    with trio.move_on_after(5):  # the loser's query reaches its upstream too
        while [len(u.seen) for u in ups] != [0, 1, 1]:
            await trio.sleep(0.01)
    assert [len(u.seen) for u in ups] == [0, 1, 1]


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({"backoff_min": "2s", "backoff_max": "1s"}, "backoff_max is below backoff_min"),
        ({"backoff_after": 0}, "backoff_after.: must be between 1 and 1000"),
        ({"bootstrap": ["dns.example"]}, "a bootstrap resolver is a plain IP address"),
        ({"bootstrap": ["tls://192.0.2.1"]}, "a bootstrap resolver is plain DNS"),
        ({"bootstrap_min_ttl": 60, "bootstrap_max_ttl": 1}, "bootstrap_max_ttl is below"),
        ({"upstreams": []}, "needs at least one upstream"),
        ({"backoff_after": 1001}, "backoff_after.: must be between 1 and 1000"),
    ],
)
def test_health_and_bootstrap_options_are_validated(table, error):
    with pytest.raises(ConfigError, match=error):
        build_step("forward", {"upstreams": ["192.0.2.1"], **table})


async def test_host_names_are_resolved_through_bootstrap(nursery, tmp_path):
    boot = await start(
        nursery,
        [
            {
                "match": {"qname": "dot.bench.test", "qtype": "A"},
                "times": 1,
                "answer": ["{qname} 1 IN A 127.0.0.2"],
            },
            {
                "match": {"qname": "dot.bench.test", "qtype": "A"},
                "answer": ["{qname} 1 IN A 127.0.0.3"],
            },
            {"match": {"qname": "dot.bench.test"}, "answer": []},
        ],
    )
    step = build_step(
        "forward",
        {
            "upstreams": ["tls://dot.bench.test"],
            "bootstrap": [boot.addr],
            "bootstrap_min_ttl": "0.2s",
            "timeout": 0.3,
        },
    )
    ((_, addresses),) = step.named
    assert not step.ready()
    assert "tls://dot.bench.test:853: host name not resolved yet" in step.not_ready_reason()
    nursery.start_soon(step.run)
    with trio.fail_after(2):
        while not step.ready():
            await trio.sleep(0.02)
    assert addresses.current == ["127.0.0.2"]
    with trio.fail_after(2):  # re-resolved at its TTL (1 s, over the 0.2 s minimum)
        while addresses.current != ["127.0.0.3"]:
            await trio.sleep(0.05)
    boot.set_rules([{"drop": True}])  # resolution fails: the last good addresses stay
    with trio.fail_after(4):
        while not addresses.error:
            await trio.sleep(0.05)
    assert addresses.current == ["127.0.0.3"] and step.ready()


def test_host_name_without_any_resolver_is_a_config_error(tmp_path, monkeypatch):
    from dnsproxy.plugins.forward import transport

    conf = tmp_path / "resolv.conf"
    conf.write_text("search example\n")
    monkeypatch.setattr(transport, "RESOLV_CONF", conf)
    with pytest.raises(ConfigError, match="names no nameserver but this proxy"):
        build_step("forward", {"upstreams": ["tls://dns.example"]})


def stamp(proto: int, *fields: bytes | list[bytes]) -> str:
    """A DNS stamp built by the specification (LP and VLP fields)."""
    out = bytes([proto]) + (1).to_bytes(8, "little")
    for f in fields:
        if isinstance(f, list):
            items = f or [b""]
            out += b"".join(
                bytes([len(x) | (0x80 if i < len(items) - 1 else 0)]) + x
                for i, x in enumerate(items)
            )
        else:
            out += bytes([len(f)]) + f
    return "sdns://" + base64.urlsafe_b64encode(out).rstrip(b"=").decode()


def test_published_cloudflare_doh_stamp():
    url, extra = parse_stamp(
        "sdns://AgcAAAAAAAAABzEuMC4wLjEAEmRucy5jbG91ZGZsYXJlLmNvbQovZG5zLXF1ZXJ5"
    )
    assert url == "https://dns.cloudflare.com/dns-query" and extra == {"bootstrap": ["1.0.0.1"]}


@pytest.mark.parametrize(
    ("text", "url", "extra"),
    [
        (stamp(0, b"192.0.2.53:5353"), "udp://192.0.2.53:5353", {}),
        (stamp(0, b"[2001:db8::1]"), "udp://[2001:db8::1]", {}),
        (
            stamp(3, b"127.0.0.1:8853", [b"h" * 32], b"dot.bench.test"),
            "tls://dot.bench.test:8853",
            {"bootstrap": ["127.0.0.1"]},
        ),
        (stamp(3, b"", [], b"dns.quad9.net"), "tls://dns.quad9.net", {}),
        (stamp(2, b"", [], b"doh.bench.test:8443", b"/q"), "https://doh.bench.test:8443/q", {}),
    ],
)
def test_stamps_become_upstream_specs(text, url, extra):
    assert parse_stamp(text) == (url, extra)
    spec = UpstreamSpec.parse({"url": text, "ca_file": "ca.pem"})
    assert spec.url == url and spec.extra == {**extra, "ca_file": "ca.pem"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("sdns://!!!", "base64url"),
        (stamp(1, b"192.0.2.1"), "protocol 0x01 is not supported"),
        (stamp(3, b"192.0.2.1", [b"short"], b"h.test"), "not SHA-256"),
        (stamp(3, b"192.0.2.1", []), "truncated"),
        (stamp(2, b"", [], b"h.test", b"nopath"), "must start with /"),
        (stamp(3, b"not-an-ip", [], b"h.test"), "address"),
        (stamp(0, b""), "without an address"),
    ],
)
def test_bad_stamps_are_config_errors(text, error):
    with pytest.raises(ConfigError, match=error):
        build_step("forward", {"upstreams": [text]})


async def test_query_through_a_plain_stamp(nursery):
    up = await start(nursery, answer("192.0.2.9"))
    host, port = up.addr.split(":")
    step = build_step("forward", {"upstreams": [stamp(0, f"{host}:{port}".encode())]})
    reply = await ask(step, "st.example.org")
    assert reply.message().answer[0][0].address == "192.0.2.9"
