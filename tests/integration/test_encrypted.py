"""DoT and DoH upstreams through the real proxy, against real servers on loopback.

DoT: knot-resolver (kresd) with a certificate from a trustme CA made for the test,
forwarding (policy.STUB) to the nsd fixture.

DoH: Debian's kresd 5.6 ``doh2`` endpoint answers httpx only by luck: it fails a POST whose
END_STREAM comes in a DATA frame of its own ("invalid dnsmsg size: -2", HTTP 400), which is
how httpcore ends every request body, and drops the connection with FRAME_SIZE_ERROR on a
second GET. So the DoH server here is hypercorn (HTTP/2 over TLS, same trustme CA) with a
small RFC 8484 app relaying to nsd, which can also misbehave on request.
"""

from __future__ import annotations

import base64
import concurrent.futures
import socket
import ssl
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
import trio
import trustme
from dnsproxy.plugins import dot
from hypercorn.config import Config
from hypercorn.trio import serve

from dnsproxy import wire
from dnsproxy.testing import make_setup
from dnsproxy.upstream import Request, UpstreamSpec
from tests.conftest import Nsd, free_port, need, terminate, wait_port


class Kresd:
    """knot-resolver listening for DoT and DoH on 127.0.0.1, forwarding to nsd."""

    def __init__(self, workdir: Path, upstream: Nsd, ca: trustme.CA) -> None:
        self.dir = workdir
        self.dir.mkdir()
        self.dot_port = free_port()
        self.doh_port = free_port()
        cert = ca.issue_cert("localhost", "127.0.0.1")
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
        (workdir / "kresd.conf").write_text(
            f"net.listen('127.0.0.1', {self.dot_port}, {{kind='tls'}})\n"
            f"net.listen('127.0.0.1', {self.doh_port}, {{kind='doh2'}})\n"
            f"net.tls('{workdir}/cert.pem', '{workdir}/key.pem')\n"
            f"policy.add(policy.all(policy.STUB({{'{upstream.host}@{upstream.port}'}})))\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Kresd:
        (self.dir / "cache").mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [
                need("kresd"),
                "-n",
                "-q",
                "-c",
                str(self.dir / "kresd.conf"),
                str(self.dir / "cache"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.dot_port)
        wait_port("127.0.0.1", self.doh_port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None


class DohServer:
    """hypercorn serving RFC 8484 on 127.0.0.1 in a thread, relaying to nsd over UDP.

    ``mode`` makes it misbehave: "status" (HTTP 500), "type" (text/plain), "question"
    (answers another question), "big" (a 70000-byte body), "slow" (answers after 3 s);
    ``max_age`` adds Cache-Control.
    """

    def __init__(self, workdir: Path, upstream: Nsd, ca: trustme.CA) -> None:
        self.upstream = (upstream.host, upstream.port)
        self.port = free_port()
        self.mode = ""
        self.max_age: int | None = None
        self.requests: list[tuple[str, bytes]] = []
        cert = ca.issue_cert("localhost", "127.0.0.1")
        workdir.mkdir()
        cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
        self.config = Config()
        self.config.bind = [f"127.0.0.1:{self.port}"]
        self.config.certfile = str(workdir / "cert.pem")
        self.config.keyfile = str(workdir / "key.pem")
        self.config.alpn_protocols = ["h2"]
        self.config.accesslog = None
        self.config.errorlog = None
        self._stop: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        await serve(self._app, self.config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

    async def _relay(self, query: bytes) -> bytes:
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(self.upstream)
            await sock.send(query)
            with trio.fail_after(3):
                return await sock.recv(65535)

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                event = await receive()
                kind = event["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        while True:
            event = await receive()
            body += event.get("body", b"")
            if not event.get("more_body"):
                break
        if scope["method"] == "GET":
            param = urllib.parse.parse_qs(scope["query_string"].decode())["dns"][0]
            body = base64.urlsafe_b64decode(param + "=" * (-len(param) % 4))
        self.requests.append((scope["method"], body))
        if self.mode == "slow":
            await trio.sleep(3)
        reply = await self._relay(body)
        ctype = b"application/dns-message"
        status = 200
        if self.mode == "status":
            status = 500
        elif self.mode == "type":
            ctype = b"text/plain"
        elif self.mode == "question":
            msg = dns.message.from_wire(body)
            msg.question[0].name = dns.name.from_text("other.example.test")
            reply = await self._relay(msg.to_wire())
        elif self.mode == "big":
            reply += b"\x00" * 70000
        headers = [(b"content-type", ctype)]
        if self.max_age is not None:
            headers.append((b"cache-control", b"max-age=%d" % self.max_age))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    def start(self) -> DohServer:
        self._thread.start()
        wait_port("127.0.0.1", self.port)
        return self

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(5)


@pytest.fixture
def doh_server(tmp_path: Path, nsd: Nsd, ca: trustme.CA) -> Iterator[DohServer]:
    server = DohServer(tmp_path / "doh", nsd, ca).start()
    yield server
    server.stop()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def kresd(tmp_path: Path, nsd: Nsd, ca: trustme.CA) -> Iterator[Kresd]:
    server = Kresd(tmp_path / "kresd", nsd, ca).start()
    yield server
    server.stop()


@pytest.fixture
def ca_file(tmp_path: Path, ca: trustme.CA) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def config(upstream: str) -> str:
    return f"""
[server]
listen = ["127.0.0.1:{{port}}"]

[[chain]]
plugin = "forward"
upstreams = [{upstream}]
timeout = 1.5
"""


def dot_upstream(kresd: Kresd, ca_file: Path, **extra: str) -> str:
    keys = {"url": f"tls://127.0.0.1:{kresd.dot_port}", "server_name": "localhost"}
    keys.update({"ca_file": str(ca_file)}, **extra)
    return "{" + ", ".join(f'{k} = "{v}"' for k, v in keys.items()) + "}"


def doh_upstream(server: DohServer, ca_file: Path, **extra: str) -> str:
    """The proxy reaches "localhost" only through bootstrap; 127.0.0.2 refuses first."""
    keys = {"url": f"https://localhost:{server.port}/dns-query", "ca_file": str(ca_file)}
    keys.update(extra)
    body = ", ".join(f'{k} = "{v}"' for k, v in keys.items())
    return "{" + body + ', bootstrap = ["127.0.0.2", "127.0.0.1"]}'


def addresses(resp: dns.message.Message) -> set[str]:
    return {rr.address for rrset in resp.answer for rr in rrset}


def established(port: int) -> int:
    """Client-side TCP connections to ``port`` on loopback."""
    out = subprocess.run(
        ["ss", "-Htn", "state", "established", f"dport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(out.splitlines())


def ttls(resp: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in resp.answer}


@pytest.mark.parametrize("method", ["post", "get"])
def test_doh_answers(make_proxy, doh_server, ca_file, method):
    proxy = make_proxy(config(doh_upstream(doh_server, ca_file, method=method)))
    resp = proxy.ask(id=4321)  # the client's ID comes back, not the 0 of the DoH wire
    assert resp.rcode() == dns.rcode.NOERROR and addresses(resp) == {"192.0.2.10"}
    assert resp.id == 4321 and ttls(resp) == {300}
    assert addresses(proxy.ask("mail.example.test")) == {"192.0.2.25"}
    assert proxy.ask("nope.example.test").rcode() == dns.rcode.NXDOMAIN
    assert established(doh_server.port) == 1  # every query on one HTTP/2 connection
    assert {m for m, _ in doh_server.requests} == {method.upper()}
    wires = [body for _, body in doh_server.requests]
    assert all(w[:2] == b"\x00\x00" and len(w) % 128 == 0 for w in wires)


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("status", "HTTP status 500"),
        ("type", "content type"),
        ("question", "does not answer the question"),
        ("big", "body over 65535"),
    ],
)
def test_doh_bad_replies_fail_the_upstream(make_proxy, doh_server, ca_file, mode, reason):
    doh_server.mode = mode
    proxy = make_proxy(config(doh_upstream(doh_server, ca_file)))
    resp = proxy.ask()
    assert resp.rcode() == dns.rcode.SERVFAIL
    ede = [o for o in resp.options if isinstance(o, dns.edns.EDEOption)]
    assert ede and reason in (ede[0].text or "")


def test_doh_timeout_leaves_the_connection_usable(make_proxy, doh_server, ca_file):
    doh_server.mode = "slow"
    proxy = make_proxy(config(doh_upstream(doh_server, ca_file)))
    resp = proxy.ask()
    assert resp.rcode() == dns.rcode.SERVFAIL  # forward gave up after its 1.5 s timeout
    ede = [o for o in resp.options if isinstance(o, dns.edns.EDEOption)]
    assert ede and ede[0].code == dns.edns.EDECode.NO_REACHABLE_AUTHORITY
    doh_server.mode = ""
    assert addresses(proxy.ask("mail.example.test")) == {"192.0.2.25"}
    assert established(doh_server.port) == 1


def test_doh_cache_control_caps_ttls(make_proxy, doh_server, ca_file):
    doh_server.max_age = 42
    proxy = make_proxy(config(doh_upstream(doh_server, ca_file)))
    resp = proxy.ask()
    assert addresses(resp) == {"192.0.2.10"} and ttls(resp) == {42}


def test_dot_answers_and_pipelines(make_proxy, kresd, ca_file):
    proxy = make_proxy(config(dot_upstream(kresd, ca_file)))
    resp = proxy.ask(id=4321)  # the client's ID comes back
    assert resp.rcode() == dns.rcode.NOERROR and addresses(resp) == {"192.0.2.10"}
    assert resp.id == 4321
    names = [f"n{i}.example.test" for i in range(40)] + ["www.example.test", "mail.example.test"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda n: proxy.ask(n), names))
    assert [r.rcode() for r in results[:40]] == [dns.rcode.NXDOMAIN] * 40
    assert addresses(results[-1]) == {"192.0.2.25"}
    assert established(kresd.dot_port) == 1


@pytest.mark.parametrize("scheme", ["tls", "https"])
@pytest.mark.parametrize("problem", ["wrong name", "untrusted CA"])
def test_certificate_failure_fails_the_upstream(
    make_proxy, kresd, doh_server, ca_file, tmp_path, scheme, problem
):
    extra = {"server_name": "wrong.example"} if problem == "wrong name" else {}
    if problem == "untrusted CA":
        ca_file = tmp_path / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(ca_file))
    if scheme == "tls":
        upstream = dot_upstream(kresd, ca_file, **extra)
    else:
        upstream = doh_upstream(doh_server, ca_file, **extra)
    proxy = make_proxy(config(upstream))
    resp = proxy.ask()
    assert resp.rcode() == dns.rcode.SERVFAIL
    ede = [o for o in resp.options if isinstance(o, dns.edns.EDEOption)]
    assert ede and ede[0].code == dns.edns.EDECode.NETWORK_ERROR
    assert "certificate" in (ede[0].text or "")
    assert not doh_server.requests  # nothing was sent over an unauthenticated connection


def test_failover_from_bad_certificate_to_good(make_proxy, kresd, ca_file):
    bad = dot_upstream(kresd, ca_file, server_name="wrong.example")
    proxy = make_proxy(config(f"{bad}, {dot_upstream(kresd, ca_file)}"))
    assert addresses(proxy.ask()) == {"192.0.2.10"}


def test_restarted_dot_server_is_reconnected(make_proxy, kresd, ca_file):
    proxy = make_proxy(config(dot_upstream(kresd, ca_file)))
    assert addresses(proxy.ask()) == {"192.0.2.10"}
    kresd.stop()
    kresd.start()
    # The old connection died with the server; the very next query must not be lost.
    assert addresses(proxy.ask("mail.example.test")) == {"192.0.2.25"}
    assert established(kresd.dot_port) == 1


def _request(name: str) -> Request:
    key = wire.name_to_key(name)
    return Request(key + b"\x00\x01\x00\x01", key, 1, 1)


async def test_one_dot_connection_carries_concurrent_queries(kresd, ca_file):
    spec = {
        "url": f"tls://127.0.0.1:{kresd.dot_port}",
        "server_name": "localhost",
        "ca_file": str(ca_file),
    }
    up = dot.make_dot(UpstreamSpec.parse(spec), make_setup("forward"))
    replies: list[bytes] = []

    async def one(i: int) -> None:
        replies.append(await up.exchange(_request(f"p{i}.example.test")))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
    assert len(replies) == 50 and all(r[3] & 0xF == dns.rcode.NXDOMAIN for r in replies)
    assert up.connects == 1
    up.close()


def test_spki_pin(make_proxy, kresd, ca_file):
    pem = (kresd.dir / "cert.pem").read_bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    good = base64.b64encode(dot.spki_digest(der)).decode()
    wrong = base64.b64encode(bytes(32)).decode()
    proxy = make_proxy(config(dot_upstream(kresd, ca_file, spki_pin=good)))
    assert addresses(proxy.ask()) == {"192.0.2.10"}
    proxy = make_proxy(config(dot_upstream(kresd, ca_file, spki_pin=wrong)))
    resp = proxy.ask()
    assert resp.rcode() == dns.rcode.SERVFAIL
    ede = [o for o in resp.options if isinstance(o, dns.edns.EDEOption)]
    assert "spki_pin" in (ede[0].text or "")


def test_doh_server_ending_the_connection_costs_no_query(tmp_path, nsd, ca, ca_file, make_proxy):
    """hypercorn sends GOAWAY after its request limit: the query in flight is retried on a
    fresh connection instead of failing."""
    server = DohServer(tmp_path / "doh-limited", nsd, ca)
    server.config.keep_alive_max_requests = 3
    server.start()
    try:
        proxy = make_proxy(config(doh_upstream(server, ca_file)))
        for i in range(8):
            name = ("www", "mail")[i % 2] + ".example.test"
            assert proxy.ask(name).rcode() == dns.rcode.NOERROR, i
    finally:
        server.stop()
