"""The ratelimit step in the running proxy: a UDP flood from one /24 is limited while a
well-behaved client in another /24 and a TCP client keep getting answers."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

# A local-answer step so the test depends on no other plugin and no upstream.
LOCAL_PLUGIN = """
from dnsproxy import wire
from dnsproxy.chain import Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.reply import respond, rr


class Local(Step):
    def query(self, q):
        answers = [rr(1, 60, bytes([192, 0, 2, 1]))] if q.qtype == 1 else []
        return respond(q, wire.NOERROR, answers, source="local")


@hookimpl
def dnsproxy_add_steps(registry):
    registry.add_step("local_answer", Local)
"""

CONFIG = """
plugins = ["PLUGIN"]

[server]
listen = ["127.0.0.1:{port}"]

[[chain]]
plugin = "ratelimit"
RATELIMIT

[[chain]]
plugin = "local_answer"
"""

RATE = 10
FLOODERS = ("127.0.1.1", "127.0.1.2", "127.0.1.3")  # one /24: one account
GOOD = "127.0.2.1"


def start(make_proxy, tmp_path: Path, options: str):
    plugin = tmp_path / "local.py"
    plugin.write_text(LOCAL_PLUGIN)
    config = CONFIG.replace("PLUGIN", str(plugin)).replace("RATELIMIT", options)
    return make_proxy(config)


def udp_socket(source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    return sock


def drain(sock: socket.socket, until: float, out: list[dns.message.Message]) -> None:
    """Read responses from ``sock`` until nothing arrives before ``until``."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        sock.settimeout(left)
        try:
            data = sock.recv(65535)
        except TimeoutError:
            return
        out.append(dns.message.from_wire(data))


def test_udp_flood_is_limited_while_others_are_answered(make_proxy, tmp_path):
    proxy = start(make_proxy, tmp_path, f"responses_per_second = {RATE}\nwindow = 2\nslip = 2")
    flood_socks = [udp_socket(s) for s in FLOODERS]
    good = udp_socket(GOOD)
    query = dns.message.make_query("www.example.test", "A")
    sent = 0
    good_answers = []
    tcp_answers = []
    responses: list[dns.message.Message] = []
    start_time = time.monotonic()
    try:
        for _ in range(6):  # about 1.5 s: a burst of 60 every 0.25 s, one good and one TCP query
            for i in range(60):
                query.id = sent
                flood_socks[i % 3].sendto(query.to_wire(), proxy.addr)
                sent += 1
            for sock in flood_socks:
                drain(sock, time.monotonic() + 0.02, responses)
            good_answers.append(
                dns.query.udp(query, proxy.addr[0], port=proxy.port, timeout=2, sock=good)
            )
            tcp_answers.append(
                dns.query.tcp(query, proxy.addr[0], port=proxy.port, timeout=2, source=FLOODERS[0])
            )
            time.sleep(0.2)
        elapsed = time.monotonic() - start_time
        for sock in flood_socks:
            drain(sock, time.monotonic() + 0.3, responses)
    finally:
        for sock in [*flood_socks, good]:
            sock.close()

    full = [m for m in responses if m.answer]
    slipped = [m for m in responses if m.flags & dns.flags.TC]
    assert len(full) + len(slipped) == len(responses)
    # The first R pass; a flood faster than R keeps the shared account in debt after that.
    assert RATE <= len(full) <= RATE + RATE * elapsed + 2
    limited = sent - len(full)
    assert all(not m.answer and not m.authority for m in slipped)
    assert 0.4 * limited <= len(slipped) <= 0.5 * limited + 1  # every second one slips
    for answer in good_answers + tcp_answers:
        assert answer.rcode() == dns.rcode.NOERROR
        assert not answer.flags & dns.flags.TC
        assert answer.answer[0][0].address == "192.0.2.1"
    log = proxy.log()
    assert "limiting A www.example.test responses to 127.0.1.0/24" in log
    assert "127.0.2.0/24" not in log


def test_query_limit_and_minimal_any(make_proxy, tmp_path):
    proxy = start(make_proxy, tmp_path, "queries_per_second = 5\nqueries_burst = 5")
    query = dns.message.make_query("www.example.test", "A", use_edns=0)
    with udp_socket("127.0.3.1") as sock:
        replies = [
            dns.query.udp(query, proxy.addr[0], port=proxy.port, timeout=2, sock=sock)
            for _ in range(12)
        ]
    rcodes = [r.rcode() for r in replies]
    assert rcodes[:5] == [dns.rcode.NOERROR] * 5
    assert dns.rcode.REFUSED in rcodes[5:]
    refused = next(r for r in replies if r.rcode() == dns.rcode.REFUSED)
    assert [(o.otype, o.code) for o in refused.options] == [(dns.edns.EDE, 31)]

    with udp_socket("127.0.3.2") as sock:
        any_q = dns.message.make_query("www.example.test", "ANY")
        reply = dns.query.udp(any_q, proxy.addr[0], port=proxy.port, timeout=2, sock=sock)
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.HINFO]
    assert reply.answer[0][0].cpu == b"RFC8482"
