"""DoT and DoH listeners in the real process, with clients no one here wrote (kdig, dig,
dnspython, httpx) and a trustme certificate made for each test."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.svcbbase
import httpx
import pytest
import trustme

from tests.conftest import Proxy, free_port, need

CT = {"content-type": "application/dns-message"}
NAMES = ["dns.example", "*.dns.example", "127.0.0.1"]


def write_cert(ca: trustme.CA, workdir: Path) -> None:
    cert = ca.issue_cert(*NAMES)
    cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))


class Encrypted:
    """The proxy with plain, tls:// and https:// listeners and a query log."""

    def __init__(self, tmp_path: Path, make_proxy, chain: str = "", server: str = "") -> None:
        self.ca = trustme.CA()
        self.dir = tmp_path
        self.ca_file = tmp_path / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        write_cert(self.ca, tmp_path)
        self.dot = free_port()
        self.doh = free_port()
        self.proxy: Proxy = make_proxy(
            "[server]\n"
            f'listen = ["127.0.0.1:{{port}}", "tls://127.0.0.1:{self.dot}",'
            f' "https://127.0.0.1:{self.doh}/dns-query"]\n'
            f'tls_cert = "{tmp_path}/cert.pem"\n'
            f'tls_key = "{tmp_path}/key.pem"\n'
            'tls_server_name = "dns.example"\n'
            'tls_reload_interval = "0.5s"\n'
            f"{server}\n"
            '[[chain]]\nplugin = "querylog"\nsqlite = false\njsonl = "q.jsonl"\n'
            'flush_interval = "0.2s"\n'
            f"{chain}\n"
            '[[chain]]\nplugin = "hosts"\nttl = 600\n'
            'entries = ["192.0.2.10 www.example.test", "192.0.2.11 two.example.test"]\n',
            wait_for="listening on https",
        )

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        ctx.check_hostname = False
        return ctx

    def url(self, suffix: str = "") -> str:
        return f"https://127.0.0.1:{self.doh}/dns-query{suffix}"

    def log_rows(self) -> list[dict]:
        path = self.proxy.dir / "q.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def enc(tmp_path: Path, make_proxy) -> Encrypted:
    return Encrypted(tmp_path, make_proxy)


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    return done.stdout + done.stderr


def tls_frames(enc: Encrypted, messages: list[bytes], sni: str = "dns.example") -> list[bytes]:
    """Send ``messages`` back to back on one DoT connection; read as many answers."""
    raw = socket.create_connection(("127.0.0.1", enc.dot), timeout=5)
    with enc.context().wrap_socket(raw, server_hostname=sni) as s:
        s.sendall(b"".join(struct.pack("!H", len(m)) + m for m in messages))
        out = []
        for _ in messages:
            size = struct.unpack("!H", recv_exact(s, 2))[0]
            out.append(recv_exact(s, size))
        return out


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


def test_kdig_and_dig_over_tls_and_https(enc: Encrypted):
    kdig, dig = need("kdig"), need("dig")
    tls = [f"+tls-ca={enc.ca_file}", "+tls-hostname=dns.example"]
    outs = [
        run(kdig, "@127.0.0.1", "-p", str(enc.dot), *tls, "+short", "www.example.test"),
        run(kdig, "@127.0.0.1", "-p", str(enc.doh), "+https", *tls, "+short", "www.example.test"),
        run(
            dig,
            "@127.0.0.1",
            "-p",
            str(enc.dot),
            "+tls-ca=" + str(enc.ca_file),
            "+tls-hostname=dns.example",
            "+short",
            "www.example.test",
        ),
        run(
            dig,
            "@127.0.0.1",
            "-p",
            str(enc.doh),
            "+https",
            "+tls-ca=" + str(enc.ca_file),
            "+tls-hostname=dns.example",
            "+short",
            "www.example.test",
        ),
    ]
    for out in outs:
        assert out.strip() == "192.0.2.10", outs


def test_dot_pipelines_queries_on_one_connection_and_dnspython_asks(enc: Encrypted):
    names = ["www.example.test", "two.example.test"] * 5  # distinct IDs: answers are told apart
    queries = [dns.message.make_query(n, "A", id=i + 1) for i, n in enumerate(names)]
    answers = [dns.message.from_wire(a) for a in tls_frames(enc, [q.to_wire() for q in queries])]
    by_id = {a.id: a for a in answers}
    assert len(by_id) == len(queries)
    for q in queries:
        a = by_id[q.id]
        want = "192.0.2.10" if q.question[0].name.labels[0] == b"www" else "192.0.2.11"
        assert [r.to_text() for r in a.answer[0]] == [want]
    r = dns.query.tls(queries[0], "127.0.0.1", port=enc.dot, ssl_context=enc.context(), timeout=5)
    assert r.answer[0][0].to_text() == "192.0.2.10"


def test_doh_get_and_post_over_one_http2_connection(enc: Encrypted):
    q = dns.message.make_query("www.example.test", "A")
    q.id = 0
    with httpx.Client(http2=True, verify=enc.context()) as client:
        dns_param = base64.urlsafe_b64encode(q.to_wire()).rstrip(b"=").decode()
        got = client.get(enc.url(), params={"dns": dns_param})
        posted = client.post(
            enc.url(), content=q.to_wire(), headers={"content-type": "application/dns-message"}
        )
        for r in (got, posted):
            assert r.status_code == 200 and r.http_version == "HTTP/2"
            assert r.headers["content-type"] == "application/dns-message"
            assert r.headers["cache-control"] == "max-age=600"
            assert dns.message.from_wire(r.content).answer[0][0].to_text() == "192.0.2.10"
        # one connection served both: httpx kept it in its pool
        assert len(client._transport._pool.connections) == 1
    with httpx.Client(http2=False, verify=enc.context()) as client:  # HTTP/1.1 too
        r = client.post(enc.url(), content=q.to_wire(), headers=CT)
        assert r.http_version == "HTTP/1.1"
        assert dns.message.from_wire(r.content).answer[0][0].to_text() == "192.0.2.10"


def padded_query(name: str, padding: bool, keepalive: bool = False) -> dns.message.Message:
    opts: list[dns.edns.Option] = []
    if padding:
        opts.append(dns.edns.GenericOption(dns.edns.PADDING, b"\x00" * 16))
    if keepalive:
        opts.append(dns.edns.GenericOption(dns.edns.KEEPALIVE, b""))
    return dns.message.make_query(name, "A", use_edns=0, options=opts)


def test_padding_and_keepalive_only_when_asked(enc: Encrypted):
    msgs = [
        padded_query("www.example.test", True),
        padded_query("www.example.test", False),
        padded_query("www.example.test", False, keepalive=True),
    ]
    padded, plain, kept = tls_frames(enc, [m.to_wire() for m in msgs])
    assert len(padded) % 468 == 0
    assert dns.edns.PADDING in {o.otype for o in dns.message.from_wire(padded).options}
    assert len(plain) % 468 != 0
    assert not dns.message.from_wire(plain).options
    ka = {o.otype: o for o in dns.message.from_wire(kept).options}
    assert ka[dns.edns.KEEPALIVE].to_wire() == struct.pack("!H", 100)  # 10 s in 100 ms units
    with httpx.Client(http2=True, verify=enc.context()) as client:
        r = client.post(
            enc.url(),
            content=msgs[0].to_wire(),
            headers={"content-type": "application/dns-message"},
        )
        assert len(r.content) % 468 == 0


def test_client_identifiers_reach_the_query_log(enc: Encrypted):
    kdig = need("kdig")
    out = run(kdig, "@127.0.0.1", "-p", str(enc.dot), f"+tls-ca={enc.ca_file}",
              "+tls-hostname=kids-tablet.dns.example", "+short", "www.example.test")  # fmt: skip
    assert out.strip() == "192.0.2.10"
    q = dns.message.make_query("two.example.test", "A")
    with httpx.Client(http2=True, verify=enc.context()) as client:
        assert client.post(enc.url("/living-room"), content=q.to_wire(), headers=CT).is_success
    tls_frames(enc, [dns.message.make_query("www.example.test", "A").to_wire()], "other.name")
    deadline = time.monotonic() + 10
    while len(enc.log_rows()) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    rows = enc.log_rows()
    ids = {(r["transport"], (r.get("notes") or {}).get("client_id")) for r in rows}
    assert ("tls", "kids-tablet") in ids and ("https", "living-room") in ids, rows
    assert ("tls", None) in ids  # an SNI outside tls_server_name names no client


def test_malformed_doh_requests_get_4xx_and_the_server_keeps_serving(enc: Encrypted):
    ct = {"content-type": "application/dns-message"}
    with httpx.Client(http2=True, verify=enc.context()) as c:
        assert c.get(enc.url()).status_code == 400
        assert c.get(enc.url(), params={"dns": "!!not base64!!"}).status_code == 400
        assert c.get(enc.url(), params={"dns": "AAAA"}).status_code == 400  # 3 octets
        assert c.post(enc.url(), content=b"x" * 20, headers={"content-type": "text/plain"}
                      ).status_code == 415  # fmt: skip
        assert c.post(enc.url(), content=b"\x00" * 70000, headers=ct).status_code == 413
        assert c.put(enc.url(), content=b"", headers=ct).status_code == 405
        assert c.get(enc.url("/bad id")).status_code == 404
        q = dns.message.make_query("www.example.test", "A")
        r = c.post(enc.url(), content=q.to_wire(), headers=ct)
        assert r.status_code == 200
    assert enc.proxy.ask().answer[0][0].to_text() == "192.0.2.10"


def peer_cert(enc: Encrypted, ctx: ssl.SSLContext) -> bytes:
    raw = socket.create_connection(("127.0.0.1", enc.dot), timeout=5)
    with ctx.wrap_socket(raw, server_hostname="dns.example") as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_a_certificate_swapped_on_disk_serves_new_connections(enc: Encrypted):
    old = peer_cert(enc, enc.context())
    keep = socket.create_connection(("127.0.0.1", enc.dot), timeout=5)
    held = enc.context().wrap_socket(keep, server_hostname="dns.example")
    new_ca = trustme.CA()
    write_cert(new_ca, enc.dir)
    new_ctx = ssl.create_default_context()
    new_ca.configure_trust(new_ctx)
    new_ctx.check_hostname = False
    deadline = time.monotonic() + 10
    while "TLS certificate loaded" not in enc.proxy.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    new = peer_cert(enc, new_ctx)
    assert new != old
    with pytest.raises(ssl.SSLError):
        peer_cert(enc, enc.context())
    q = dns.message.make_query("www.example.test", "A").to_wire()
    held.sendall(struct.pack("!H", len(q)) + q)  # the connection opened before still serves
    size = struct.unpack("!H", recv_exact(held, 2))[0]
    assert dns.message.from_wire(recv_exact(held, size)).answer
    held.close()
    r = subprocess.run(
        [need("kdig"), "@127.0.0.1", "-p", str(enc.doh), "+https", "+short",
         f"+tls-ca={enc.dir / 'ca.pem'}", "+tls-hostname=dns.example", "www.example.test"],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert "192.0.2.10" not in r.stdout  # the old CA no longer verifies DoH either


def test_tls13_sessions_resume(enc: Encrypted):
    ctx = enc.context()
    q = dns.message.make_query("www.example.test", "A").to_wire()
    session = None
    for attempt in range(2):
        raw = socket.create_connection(("127.0.0.1", enc.dot), timeout=5)
        with ctx.wrap_socket(raw, server_hostname="dns.example", session=session) as s:
            s.sendall(struct.pack("!H", len(q)) + q)
            recv_exact(s, struct.unpack("!H", recv_exact(s, 2))[0])  # tickets came first
            assert s.version() == "TLSv1.3"
            assert s.session_reused == (attempt == 1)
            session = s.session


def test_ddr_names_the_encrypted_endpoints_and_kdig_follows_them(enc: Encrypted):
    r = enc.proxy.ask("_dns.resolver.arpa", "SVCB")
    records = sorted(r.answer[0], key=lambda rd: rd.priority)
    assert r.flags & dns.flags.AA
    texts = [rd.to_text() for rd in records]
    assert texts == [
        f'1 dns.example. alpn="dot" port="{enc.dot}" ipv4hint="127.0.0.1"',
        f'2 dns.example. alpn="h2,http/1.1" port="{enc.doh}" ipv4hint="127.0.0.1"'
        ' dohpath="/dns-query{?dns}"',
    ]
    kdig = need("kdig")
    for rd in records:
        port = str(rd.params[dns.rdtypes.svcbbase.ParamKey.PORT].port)  # type: ignore[attr-defined]
        hint = rd.params[dns.rdtypes.svcbbase.ParamKey.IPV4HINT].addresses[0]  # type: ignore[attr-defined]
        https = ["+https"] if b"h2" in rd.params[dns.rdtypes.svcbbase.ParamKey.ALPN].ids else []  # type: ignore[attr-defined]
        out = run(kdig, f"@{hint}", "-p", port, *https, f"+tls-ca={enc.ca_file}",
                  f"+tls-hostname={rd.target.to_text(omit_final_dot=True)}", "+short",
                  "www.example.test")  # fmt: skip
        assert out.strip() == "192.0.2.10", out


def test_ddr_off_passes_the_query_to_the_chain(tmp_path: Path, make_proxy):
    enc = Encrypted(tmp_path, make_proxy, server="ddr = false")
    r = enc.proxy.ask("_dns.resolver.arpa", "SVCB")
    assert not r.answer and r.rcode() == dns.rcode.REFUSED


def check(tmp_path: Path, cert: str, key: str) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[server]\nlisten = ["tls://127.0.0.1:8853"]\n'
        f'tls_cert = "{cert}"\ntls_key = "{key}"\n[[chain]]\nplugin = "hosts"\n'
        'entries = ["192.0.2.1 a.test"]\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(cfg)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_check_names_a_missing_key_and_a_key_that_does_not_match(tmp_path: Path):
    ca = trustme.CA()
    write_cert(ca, tmp_path)
    other = ca.issue_cert("x.example")
    other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    assert check(tmp_path, "cert.pem", "key.pem").returncode == 0
    missing = check(tmp_path, "cert.pem", "nope.pem")
    assert missing.returncode != 0
    assert (f"config.toml: server: tls_key: {tmp_path / 'nope.pem'}: cannot read: "
            "No such file or directory") in missing.stderr  # fmt: skip
    wrong = check(tmp_path, "cert.pem", "other.pem")
    assert wrong.returncode != 0
    assert (f"config.toml: server: tls_key: {tmp_path / 'other.pem'} does not match the "
            f"certificate {tmp_path / 'cert.pem'}") in wrong.stderr  # fmt: skip


@pytest.mark.parametrize("trusted", [False, True])
def test_forwarded_client_addresses_count_only_from_trusted_proxies(tmp_path, make_proxy, trusted):
    """The ACL judges the forwarded address only when the connection is from a proxy in
    ``trusted_proxies``; otherwise the connection's own address (here allowed) counts."""
    server = 'allow = ["127.0.0.0/8"]\n'
    if trusted:
        server += 'trusted_proxies = ["127.0.0.0/8"]\n'
    enc = Encrypted(tmp_path, make_proxy, server=server)
    q = dns.message.make_query("www.example.test", "A")
    cases = [
        ({"x-forwarded-for": "203.0.113.9"}, "REFUSED" if trusted else "NOERROR"),
        ({"forwarded": 'for="[2001:db8::1]:4711"'}, "REFUSED" if trusted else "NOERROR"),
        ({"x-forwarded-for": "203.0.113.9, 127.0.0.5"}, "REFUSED" if trusted else "NOERROR"),
        ({"x-forwarded-for": "127.0.0.7"}, "NOERROR"),
        ({"x-forwarded-for": "not-an-address"}, "NOERROR"),  # garbage: the connection's
    ]
    with httpx.Client(http2=True, verify=enc.context()) as client:
        for headers, rcode in cases:
            r = client.post(enc.url(), content=q.to_wire(), headers={**CT, **headers})
            assert r.status_code == 200, headers
            assert dns.rcode.to_text(dns.message.from_wire(r.content).rcode()) == rcode, headers
