"""Listener abuse (CONFORMANCE.md C5) against the DoT and DoH listeners, plus a TLS
handshake flood: the encrypted listeners stay bounded and the plain ones keep answering."""

from __future__ import annotations

import base64
import contextlib
import random
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import dns.message
import httpx
import pytest
import trustme

from tests.conformance.confkit import (
    Proxy,
    alive,
    closed_within,
    frame,
    free_port,
    read_frame,
    trickle,
    wait_until,
)

IDLE = 1.0
MAX_CONNS = 20
# Long enough that a legitimate client's handshake is never cut by a loaded machine's
# scheduling (it spans round trips, so a stall of either side counts); no test waits for it.
HANDSHAKE = 3.0


class Listeners:
    def __init__(self, workdir: Path) -> None:
        ca = trustme.CA()
        cert = ca.issue_cert("dns.example", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
        self.ctx = ssl.create_default_context()
        ca.configure_trust(self.ctx)
        self.ctx.check_hostname = False
        self.dot = ("127.0.0.1", free_port())
        self.doh = ("127.0.0.1", free_port())
        self.proxy = Proxy(
            workdir,
            "[server]\n"
            f'listen = ["127.0.0.1:{{port}}", "tls://127.0.0.1:{self.dot[1]}",'
            f' "https://127.0.0.1:{self.doh[1]}"]\n'
            f'tls_cert = "{workdir}/cert.pem"\ntls_key = "{workdir}/key.pem"\n'
            f"tcp_idle_timeout = {IDLE}\nmax_tcp_connections = {MAX_CONNS}\n"
            f"tls_handshake_timeout = {HANDSHAKE}\nmax_tcp_pipeline = 10\n"
            '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.10 *.example.test"]\n',
        ).start("listening on https")

    def tls(self) -> ssl.SSLSocket:
        raw = socket.create_connection(self.dot, timeout=5)
        return self.ctx.wrap_socket(raw, server_hostname="dns.example")

    def dot_answers(self) -> bool:
        q = dns.message.make_query("dot.example.test", "A")
        with self.tls() as s:
            s.sendall(frame(q.to_wire()))
            answer = read_frame(s)
            return answer is not None and bool(dns.message.from_wire(answer).answer)

    def doh_answers(self) -> bool:
        q = dns.message.make_query("doh.example.test", "A")
        with httpx.Client(http2=True, verify=self.ctx) as c:
            r = c.post(f"https://127.0.0.1:{self.doh[1]}/dns-query", content=q.to_wire(),
                       headers={"content-type": "application/dns-message"})  # fmt: skip
            return r.status_code == 200 and bool(dns.message.from_wire(r.content).answer)


@pytest.fixture(scope="module")
def lst(tmp_path_factory) -> Iterator[Listeners]:
    listeners = Listeners(tmp_path_factory.mktemp("enc"))
    yield listeners
    listeners.proxy.stop()


def test_dot_slowloris_closed_despite_trickle(lst: Listeners):
    data = frame(dns.message.make_query("slow.example.test", "A").to_wire())
    with lst.tls() as s:
        closed, took = trickle(s, data, OSError)
    assert closed and took < 3 * IDLE
    assert alive(lst.proxy.addr) and lst.dot_answers()


def test_dot_pipeline_flood_and_oversize_garbage_frames(lst: Listeners):
    flood = b"".join(
        frame(dns.message.make_query(f"p{i}.example.test", "A", id=i).to_wire())
        for i in range(5000)
    )
    with lst.tls() as s:
        s.sendall(flood)
    assert alive(lst.proxy.addr)
    good = dns.message.make_query("after.example.test", "A", id=4242)
    with lst.tls() as s:
        s.sendall(frame(random.Random(7).randbytes(65533)) + frame(good.to_wire()))
        seen = []
        for _ in range(2):
            m = read_frame(s)
            if m is None:
                break
            seen.append(m)
        assert any(len(m) >= 12 and m[:2] == b"\x10\x92" for m in seen)
    assert alive(lst.proxy.addr) and lst.dot_answers()


def test_tls_handshake_flood_keeps_plain_listeners_answering(lst: Listeners):
    """Half-open handshakes from one host fill the table; they are evicted as idle and time
    out after tls_handshake_timeout, and plain UDP/TCP answers other hosts throughout. (The
    flood comes from 127.0.0.2: the flooding host itself is held to max_tcp_per_client, and
    whether its own next query is refused would depend on when its handshakes time out.)"""
    hogs = []
    try:
        for i in range(3 * MAX_CONNS):
            s = socket.create_connection(lst.dot, timeout=2, source_address=("127.0.0.2", 0))
            hogs.append(s)
            if i % 2:
                with contextlib.suppress(OSError):  # evicted already: the flood goes on
                    s.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        assert alive(lst.proxy.addr)
        assert wait_until(lst.dot_answers, 5 * HANDSHAKE)
    finally:
        for s in hogs:
            s.close()
    assert alive(lst.proxy.addr)


def test_doh_slowloris_closed_and_oversize_refused(lst: Listeners):
    raw = socket.create_connection(lst.doh, timeout=5)
    with lst.ctx.wrap_socket(raw, server_hostname="dns.example") as s:
        s.send(b"POST /dns-query HTTP/1.1\r\nHost: x\r\n")
        took = None
        for _ in range(20):
            s.send(b"X: y\r\n")
            took = closed_within(s, 0.5)
            if took is not None:
                break
    assert took is not None
    # 413 once 65535 octets are in; a client that keeps sending after it loses the
    # connection (hypercorn's HTTP/2 drops DATA for an answered stream)
    with httpx.Client(http2=True, verify=lst.ctx) as c:
        try:
            r = c.post(f"https://127.0.0.1:{lst.doh[1]}/dns-query", content=b"\x00" * 1_000_000,
                       headers={"content-type": "application/dns-message"})  # fmt: skip
            assert r.status_code == 413
        except httpx.RemoteProtocolError:
            pass
    assert alive(lst.proxy.addr) and lst.doh_answers()


def test_doh_request_flood_then_close(lst: Listeners):
    q = dns.message.make_query("f.example.test", "A").to_wire()
    path = "/dns-query?dns=" + base64.urlsafe_b64encode(q).rstrip(b"=").decode()
    req = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    raw = socket.create_connection(lst.doh, timeout=5)
    # More than the socket buffers hold while the answers go unread: the server may close
    # the connection (its handshake, keep-alive or read timeout) before all of it is sent.
    with (
        lst.ctx.wrap_socket(raw, server_hostname="dns.example") as s,
        contextlib.suppress(OSError),
    ):
        s.sendall(req * 2000)
    assert alive(lst.proxy.addr) and lst.doh_answers() and lst.dot_answers()
