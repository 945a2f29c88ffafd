"""Latency per query over an established DoT and DoH upstream connection.

    python bench/encrypted.py [--queries 2000] [--names 500]

dnsproxy runs a forward-only chain (no cache) and a client sends one query at a time over
UDP, so each figure is one full round trip: client → dnsproxy → upstream → dnsproxy. The
upstream connection is opened and every name cached upstream during a warm-up pass, so the
timed pass measures the transport, not connection setup or recursion.

Upstreams: knot-resolver (kresd) over plain UDP and over TLS (DoT), and for DoH a hypercorn
HTTP/2 server relaying to nsd (this script run with ``--doh-server``): Debian's kresd 5.6
``doh2`` endpoint rejects httpx's requests (see tests/integration/test_encrypted.py), so
the DoH row has a different server behind it; the "udp → nsd" row is its baseline.
All servers use a trustme certificate made for the run.
"""

from __future__ import annotations

import argparse
import base64
import socket
import statistics
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_CPU,
    SERVER_CPU,
    Process,
    free_port,
    names_zone,
    pinned,
    start_nsd,
    start_proxy,
    table,
    which,
    workdir,
)


def wait_tcp(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def start_kresd(d: Path, nsd_port: int, cert: Path, key: Path) -> tuple[Process, int, int]:
    """kresd with plain UDP and DoT listeners, forwarding to nsd; (process, udp, dot)."""
    udp, dot = free_port(), free_port()
    (d / "cache").mkdir()
    (d / "kresd.conf").write_text(
        f"net.listen('127.0.0.1', {udp}, {{kind='dns'}})\n"
        f"net.listen('127.0.0.1', {dot}, {{kind='tls'}})\n"
        f"net.tls('{cert}', '{key}')\n"
        f"policy.add(policy.all(policy.STUB({{'127.0.0.1@{nsd_port}'}})))\n"
    )
    proc = subprocess.Popen(
        pinned([which("kresd"), "-n", "-q", "-c", str(d / "kresd.conf"), str(d / "cache")], 1),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_tcp(dot)
    return Process("kresd", proc, udp), udp, dot


def start_doh_server(cert: Path, key: Path, nsd_port: int) -> Process:
    port = free_port()
    cmd = [sys.executable, __file__, "--doh-server", str(port), str(cert), str(key)]
    proc = subprocess.Popen(
        pinned([*cmd, str(nsd_port)], CLIENT_CPU),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_tcp(port)
    return Process("hypercorn", proc, port)


def doh_server(port: int, cert: str, key: str, nsd_port: int) -> None:
    """RFC 8484 over HTTP/2 with hypercorn, relaying each query to nsd over UDP."""
    import trio
    from hypercorn.config import Config
    from hypercorn.trio import serve

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                kind = (await receive())["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        body = b""
        more = True
        while more:
            event = await receive()
            body += event.get("body", b"")
            more = event.get("more_body", False)
        if scope["method"] == "GET":
            param = urllib.parse.parse_qs(scope["query_string"].decode())["dns"][0]
            body = base64.urlsafe_b64decode(param + "=" * (-len(param) % 4))
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            await sock.connect(("127.0.0.1", nsd_port))
            await sock.send(body)
            reply = await sock.recv(65535)
        headers = [(b"content-type", b"application/dns-message")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.certfile, config.keyfile = cert, key
    config.alpn_protocols = ["h2"]
    config.accesslog = config.errorlog = None
    trio.run(serve, app, config)


def queries(names: int) -> list[bytes]:
    import dns.message

    return [
        dns.message.make_query(f"h{i}.bench.test", "A", use_edns=0).to_wire() for i in range(names)
    ]


def latencies(port: int, wires: list[bytes], count: int) -> list[float]:
    """Send ``count`` queries one at a time; the round-trip time of each, in ms."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    out = []
    try:
        for i in range(count):
            wire = wires[i % len(wires)]
            start = time.perf_counter()
            sock.send(wire)
            while True:
                reply = sock.recv(65535)
                if reply[:2] == wire[:2]:
                    break
            out.append((time.perf_counter() - start) * 1000)
            if reply[3] & 0xF:
                raise RuntimeError(f"rcode {reply[3] & 0xF} for query {i}")
    finally:
        sock.close()
    return out


def row(label: str, ms: list[float]) -> tuple[str, ...]:
    ms = sorted(ms)
    p99 = ms[int(len(ms) * 0.99) - 1]
    return (label, f"{statistics.fmean(ms):.3f}", f"{ms[len(ms) // 2]:.3f}", f"{p99:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--names", type=int, default=500)
    ap.add_argument("--doh-server", nargs=4, metavar=("PORT", "CERT", "KEY", "NSD_PORT"))
    args = ap.parse_args()
    if args.doh_server:
        port, cert, key, nsd_port = args.doh_server
        doh_server(int(port), cert, key, int(nsd_port))
        return
    import trustme

    wires = queries(args.names)
    rows = []
    with workdir() as d:
        ca = trustme.CA()
        issued = ca.issue_cert("localhost", "127.0.0.1")
        cert, key, ca_file = d / "cert.pem", d / "key.pem", d / "ca.pem"
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        ca.cert_pem.write_to_path(str(ca_file))
        (d / "nsd").mkdir()
        (d / "kresd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        servers = [nsd]
        try:
            kresd, kresd_udp, kresd_dot = start_kresd(d / "kresd", nsd.port, cert, key)
            servers.append(kresd)
            doh = start_doh_server(cert, key, nsd.port)
            servers.append(doh)
            tls = f'server_name = "localhost", ca_file = "{ca_file}"'
            upstreams = [
                ("udp → nsd", f'"127.0.0.1:{nsd.port}"'),
                ("udp → kresd", f'"127.0.0.1:{kresd_udp}"'),
                ("tls → kresd (DoT)", f'{{url = "tls://127.0.0.1:{kresd_dot}", {tls}}}'),
                (
                    "https → hypercorn → nsd (DoH, POST)",
                    f'{{url = "https://127.0.0.1:{doh.port}/dns-query", {tls}}}',
                ),
                (
                    "https → hypercorn → nsd (DoH, GET)",
                    f'{{url = "https://127.0.0.1:{doh.port}/dns-query", {tls}, method = "get"}}',
                ),
            ]
            for i, (label, upstream) in enumerate(upstreams):
                (d / f"p{i}").mkdir()
                config = f"""
                [server]
                listen = ["127.0.0.1:{{port}}"]
                log_level = "warning"
                [[chain]]
                plugin = "forward"
                upstreams = [{upstream}]
                """
                proxy = start_proxy(d / f"p{i}", config, cpu=SERVER_CPU)
                try:
                    print(f"measuring {label}", file=sys.stderr)
                    latencies(proxy.port, wires, len(wires))  # warm-up: connect, fill caches
                    rows.append(row(label, latencies(proxy.port, wires, args.queries)))
                finally:
                    proxy.stop()
        finally:
            for server in servers:
                server.stop()
    print(
        table(
            rows,
            [
                "dnsproxy upstream (forward only, one query at a time)",
                "mean ms",
                "p50 ms",
                "p99 ms",
            ],
        )
    )


if __name__ == "__main__":
    main()
