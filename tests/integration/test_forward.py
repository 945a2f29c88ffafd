"""The real proxy process forwarding to a real nsd, queried by real clients (dnspython, dig)."""

from __future__ import annotations

import signal
import struct
import subprocess
import time

import dns.asyncquery
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import trio

from tests.conftest import need

FORWARD = """
[server]
listen = ["127.0.0.1:{port}", "[::1]:{port}"]
[[chain]]
plugin = "forward"
upstreams = ["%s"]
timeout = %s
budget = %s
"""


def config(upstream: str, timeout: float = 2.0, budget: float = 5.0) -> str:
    return FORWARD % (upstream, timeout, budget)


@pytest.fixture
def proxy(nsd, make_proxy):
    return make_proxy(config(nsd.addr))


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("www.example.test", "A", "192.0.2.10"),
        ("www.example.test", "AAAA", "2001:db8::10"),
        ("example.test", "MX", "10 mail.example.test."),
        ("txt.example.test", "TXT", '"hello world"'),
        ("odd.example.test", "TYPE65400", "\\# 4 01020304"),
    ],
)
def test_record_types(proxy, name, rdtype, expected):
    for kw in ({}, {"tcp": True}, {"v6": True}):
        r = proxy.ask(name, rdtype, **kw)
        assert r.rcode() == dns.rcode.NOERROR
        assert expected in [rd.to_text() for rd in r.answer[-1]]


def test_nxdomain_and_nodata_keep_the_soa(proxy):
    r = proxy.ask("nope.example.test")
    assert r.rcode() == dns.rcode.NXDOMAIN and r.authority[0].rdtype == dns.rdatatype.SOA
    r = proxy.ask("www.example.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority


def test_cname_chain_passes_through(proxy):
    r = proxy.ask("alias.example.test")
    assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]


def test_case_and_id_are_echoed(proxy):
    r = proxy.ask("WwW.ExAmPlE.TeSt")
    assert r.question[0].name.to_text() == "WwW.ExAmPlE.TeSt."


def test_txt_over_512_fits_with_edns_and_truncates_without(proxy):
    r = proxy.ask("mid.example.test", "TXT", use_edns=False)
    assert r.flags & dns.flags.TC and not r.answer
    r = proxy.ask("mid.example.test", "TXT", use_edns=0, payload=1232)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 7
    r = proxy.ask("mid.example.test", "TXT", use_edns=0, payload=600)
    assert r.flags & dns.flags.TC  # the client's own smaller limit is honoured


def test_big_txt_truncates_over_udp_and_is_whole_over_tcp(proxy):
    r = proxy.ask("big.example.test", "TXT", use_edns=False)
    assert r.flags & dns.flags.TC and not r.answer
    r = proxy.ask("big.example.test", "TXT", use_edns=0, payload=1232)
    assert r.flags & dns.flags.TC  # 1.5 kB does not fit 1232 either
    r = proxy.ask("big.example.test", "TXT", tcp=True)
    assert not r.flags & dns.flags.TC and len(r.answer[0]) == 16


def test_do_bit_and_edns_are_hop_by_hop(proxy):
    r = proxy.ask("www.example.test", use_edns=0, want_dnssec=True, payload=4096)
    assert r.edns == 0 and r.ednsflags & dns.flags.DO and r.payload == 1232


def test_dig_sees_the_answer(proxy):
    dig = need("dig")
    out = subprocess.run(
        [dig, "+short", "@127.0.0.1", "-p", str(proxy.port), "www.example.test"],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert out.strip() == "192.0.2.10"
    out = subprocess.run(
        [
            dig,
            "+tcp",
            "+keepopen",
            "@::1",
            "-p",
            str(proxy.port),
            "www.example.test",
            "AAAA",
            "mail.example.test",
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout
    assert "2001:db8::10" in out and "192.0.2.25" in out


def test_pipelined_tcp_through_the_forwarder(proxy):
    import socket

    msgs = [
        dns.message.make_query(f"{n}.example.test", "A") for n in ("www", "mail", "nope", "ns") * 10
    ]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"".join(struct.pack("!H", len(w)) + w for w in (m.to_wire() for m in msgs)))
        seen = {}
        buf = b""
        while len(seen) < len(msgs):
            chunk = s.recv(65536)
            assert chunk
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
                size = struct.unpack_from("!H", buf)[0]
                r = dns.message.from_wire(buf[2 : 2 + size])
                buf = buf[2 + size :]
                seen[r.id] = r
    for m in msgs:
        assert seen[m.id].question[0].name == m.question[0].name


def test_sigterm_exits_zero_and_sighup_reloads(nsd, make_proxy):
    proxy = make_proxy(config(nsd.addr))
    assert proxy.ask("www.example.test").answer
    text = proxy.config_path.read_text()
    proxy.config_path.write_text(text + "bogus_key = 1\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("reload failed", timeout=5)
    assert "config.toml: chain[0] (forward): unknown option 'bogus_key'" in proxy.log()
    assert proxy.ask("www.example.test").answer  # the old chain keeps serving
    proxy.config_path.write_text(text)
    proxy.signal(signal.SIGHUP)
    proxy.wait_log("reloaded", timeout=5)
    assert proxy.stop() == 0


def test_reload_under_load_loses_no_query(nsd, make_proxy):
    proxy = make_proxy(config(nsd.addr))
    import socket
    import threading

    lost: list[str] = []
    stop = threading.Event()

    def load() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(2)
            while not stop.is_set():
                q = dns.message.make_query("www.example.test", "A")
                s.sendto(q.to_wire(), ("127.0.0.1", proxy.port))
                try:
                    r = dns.message.from_wire(s.recv(4096))
                    if r.id != q.id or not r.answer:
                        lost.append("bad")
                except OSError:
                    lost.append("timeout")

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 6):
            time.sleep(0.2)
            # One at a time: SIGHUPs that arrive during a reload are delivered as one.
            proxy.signal(signal.SIGHUP)
            proxy.wait_log("reloaded", i)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert proxy.log().count("reloaded") == 5
    assert lost == []


async def test_silent_upstream_gives_servfail_with_ede_22(make_proxy):
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proxy = make_proxy(config(f"127.0.0.1:{port}", timeout=0.3, budget=1.0))
    start = trio.current_time()
    with trio.fail_after(5):
        r = await dns.asyncquery.udp(
            dns.message.make_query("x.example.test", "A", use_edns=0),
            "127.0.0.1",
            port=proxy.port,
            timeout=4,
        )
    assert r.rcode() == dns.rcode.SERVFAIL
    assert [o.code for o in r.options] == [22]
    assert trio.current_time() - start < 1.5
    sock.close()


async def test_lying_upstream_is_ignored_until_the_real_answer(make_proxy):
    """Wrong ID, wrong question, QR=0 and a wrong source port all arrive first."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    other = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await other.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    proxy = make_proxy(config(f"127.0.0.1:{port}"))

    async def liar() -> None:
        data, addr = await sock.recvfrom(4096)
        q = dns.message.from_wire(data)

        def answer(query: dns.message.Message, address: str) -> dns.message.Message:
            r = dns.message.make_response(query)
            r.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A", address))
            return r

        good = answer(q, "192.0.2.77")
        bad_id = answer(q, "6.6.6.1")  # each lie is wrong in one way and has its own address
        bad_id.id = (q.id + 1) % 65536
        other_q = dns.message.make_query("evil.example.test", "A")
        other_q.id = q.id
        bad_q = answer(other_q, "6.6.6.2")
        not_response = bytearray(answer(q, "6.6.6.3").to_wire())
        not_response[2] &= 0x7F
        for forged in (bad_id.to_wire(), bad_q.to_wire(), bytes(not_response), b"\x00\x01garbage"):
            await sock.sendto(forged, addr)
        await other.sendto(answer(q, "6.6.6.4").to_wire(), addr)  # wrong source port
        await trio.sleep(0.05)
        await sock.sendto(good.to_wire(), addr)

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            n.start_soon(liar)
            r = await dns.asyncquery.udp(
                dns.message.make_query("target.example.test", "A"),
                "127.0.0.1",
                port=proxy.port,
                timeout=4,
            )
    assert [rd.address for rd in r.answer[0]] == ["192.0.2.77"]
    sock.close()
    other.close()


def test_own_listener_as_upstream_is_rejected(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:5399"]\n[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:5399"]\n'
    )
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert (
        "chain[0] (forward): upstreams: 127.0.0.1:5399 is this proxy's own listener" in out.stderr
    )
