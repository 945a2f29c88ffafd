"""Our DoT and DoH listeners on cache hits, next to dnsdist's DoT/DoH frontends.

    python bench/encrypted_listeners.py [--seconds 5] [--repeat 2] [--names 1000]

Both servers sit in front of the same nsd and cache every answer (dnsproxy: cache and
forward steps; dnsdist 1.7: its packet cache), so after a warm-up every query is a hit and
the figures are the cost of the transport. Each server listens on plain UDP and TCP
(the reference rows), DoT and DoH (one trustme certificate made for the run). dnsperf
drives each transport with ``-m udp``, ``-m dot`` and ``-m doh`` (HTTP/2, POST and GET): the peak
rate with ``--outstanding`` queries in flight over ``--clients`` connections (DoH: one in
flight on each of ``--doh-clients`` connections, as dnsdist 1.7's DoH frontend times out
most queries when dnsperf 2.10 has more than one stream in flight on a connection), and
the mean latency of one query at a time over one connection. The plain TCP row is the
reference for DoT, which runs the TCP listener's code under TLS. Runs alternate between
the servers (repetition 1: dnsproxy then dnsdist, repetition 2: the reverse, ...).
Servers run on CPU 0; dnsperf and nsd on CPU 1.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Perf,
    Process,
    chain_config,
    dnsperf,
    free_port,
    launch,
    names_zone,
    start_nsd,
    start_proxy,
    table,
    which,
    workdir,
)

# (row title, dnsperf keyword arguments)
TRANSPORTS: list[tuple[str, dict[str, str]]] = [
    ("udp", {"mode": "udp"}),
    ("tcp", {"mode": "tcp"}),
    ("DoT", {"mode": "dot"}),
    ("DoH POST", {"mode": "doh", "doh_method": "POST"}),
    ("DoH GET", {"mode": "doh", "doh_method": "GET"}),
]


class Server:
    """A server under test: its process and its UDP, DoT and DoH ports."""

    def __init__(self, name: str, proc: Process, dot: int, doh: int) -> None:
        self.name = name
        self.proc = proc
        self.ports = {"udp": proc.port, "dot": dot, "doh": doh}


def make_cert(d: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost from a throwaway CA: (cert, key)."""
    cert, key = d / "cert.pem", d / "key.pem"
    leaf = trustme.CA().issue_cert("127.0.0.1", "localhost")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return cert, key


def start_dnsproxy(d: Path, upstream: str, cert: Path, key: Path) -> Server:
    dot, doh = free_port(), free_port()
    listen = f'listen = ["127.0.0.1:{{port}}", "tls://127.0.0.1:{dot}", "https://127.0.0.1:{doh}/dns-query"]'
    config = chain_config(upstream, ["cache", "forward"]).replace(
        'listen = ["127.0.0.1:{port}"]',
        f'{listen}\ntls_cert = "{cert}"\ntls_key = "{key}"',
    )
    return Server("dnsproxy", start_proxy(d, config), dot, doh)


def start_dnsdist(d: Path, upstream: str, cert: Path, key: Path, names: int) -> Server:
    udp, dot, doh = free_port(), free_port(), free_port()
    conf = d / "dnsdist.conf"
    conf.write_text(
        f'setLocal("127.0.0.1:{udp}")\n'
        f'addTLSLocal("127.0.0.1:{dot}", "{cert}", "{key}")\n'
        f'addDOHLocal("127.0.0.1:{doh}", "{cert}", "{key}", "/dns-query")\n'
        f'newServer({{address="{upstream}"}})\n'
        f"getPool(''):setCache(newPacketCache({max(10_000, 2 * names)}))\n"
        'setSecurityPollSuffix("")\n'
    )
    cmd = [which("dnsdist"), "--supervised", "--disable-syslog", "-C", str(conf)]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return Server("dnsdist", launch("dnsdist", cmd, udp, **quiet), dot, doh)


def peak_load(mode: str, args: argparse.Namespace) -> tuple[int, int]:
    """(dnsperf -c, -q) of the peak run: DoH gets one query in flight per connection."""
    return (
        (args.doh_clients, args.doh_clients) if mode == "doh" else (args.clients, args.outstanding)
    )


def measure(server: Server, queries: list[str], args: argparse.Namespace) -> dict[str, Perf]:
    """Peak and one-at-a-time figures per transport; keys ``"<title>"`` and ``"<title> 1"``."""
    dnsperf(server.ports["udp"], queries, 1)  # warm-up: every name cached
    out = {}
    for title, kw in TRANSPORTS:
        port = server.ports["udp" if kw["mode"] == "tcp" else kw["mode"]]
        load = peak_load(kw["mode"], args)
        out[title] = dnsperf(
            port, queries, args.seconds, clients=load[0], outstanding=load[1], **kw
        )
        out[f"{title} 1"] = dnsperf(port, queries, args.seconds, outstanding=1, **kw)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4, help="dnsperf -c for the peak run")
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q for the peak run")
    ap.add_argument(
        "--doh-clients", type=int, default=16, help="dnsperf -c and -q for the DoH peak run"
    )
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    results: dict[str, list[dict[str, Perf]]] = {"dnsproxy": [], "dnsdist": []}
    with workdir() as d:
        cert, key = make_cert(d)
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        upstream = f"127.0.0.1:{nsd.port}"
        starters: dict[str, Callable[[Path], Server]] = {
            "dnsproxy": lambda w: start_dnsproxy(w, upstream, cert, key),
            "dnsdist": lambda w: start_dnsdist(w, upstream, cert, key, args.names),
        }
        try:
            for rep in range(args.repeat):
                order = list(starters) if rep % 2 == 0 else list(reversed(starters))
                for name in order:
                    w = d / f"{name}{rep}"
                    w.mkdir()
                    server = starters[name](w)
                    try:
                        results[name].append(measure(server, queries, args))
                    finally:
                        server.proc.stop()
                    print(f"repetition {rep + 1}, {name} done", file=sys.stderr)
        finally:
            nsd.stop()
    rows = []
    for title, _ in TRANSPORTS:
        for name in starters:
            runs = results[name]
            rows.append(
                [
                    title,
                    name,
                    " / ".join(f"{r[title].qps:,.0f}" for r in runs),
                    " / ".join(f"{r[title].avg_ms:.2f}" for r in runs),
                    " / ".join(f"{r[title].lost:.1%}" for r in runs),
                    " / ".join(f"{r[f'{title} 1'].avg_ms:.2f}" for r in runs),
                ]
            )
        ratios = [
            p[title].qps / q[title].qps
            for p, q in zip(results["dnsproxy"], results["dnsdist"], strict=True)
            if q[title].qps
        ]
        rows.append(
            [title, "dnsproxy / dnsdist", " / ".join(f"{x:.2f}" for x in ratios), "", "", ""]
        )
    header = [
        "transport",
        "server",
        "q/s per repetition",
        "mean ms",
        "lost",
        "mean ms, 1 in flight",
    ]
    print(table(rows, header))


if __name__ == "__main__":
    main()
