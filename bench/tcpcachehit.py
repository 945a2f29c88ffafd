"""Cache hits over dnsproxy's TCP, DoT and DoH listeners, next to UDP and to dnsmasq over TCP.

    python bench/tcpcachehit.py [--seconds 5] [--clients 20] [--outstanding 100]

dnsproxy runs cache and forward in front of nsd; after a warm-up every query is a hit, so
the figures are the per-answer cost of the stream listener (DoT runs the same handler
under TLS; DoH is hypercorn's). dnsmasq, in front of the same nsd with a cache big enough
for every name, is the same-run reference over UDP and TCP. Rows: the peak rate with
``--outstanding`` queries in flight over ``--clients`` connections (several queries
pipelined on each; DoH GET: one in flight on each of ``--doh-clients`` connections), and one
query at a time on one connection; then dnsproxy's peak rates as ratios to dnsmasq's TCP
and to dnsproxy's own UDP. Servers run on CPU 0; dnsperf and nsd on CPU 1.

dnsmasq forks a child per TCP connection (up to ``--max-tcp-connections``, default 20);
each child answers from its copy of the parent's cache, so ``--clients`` beyond that
limit wait for a free child.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Perf, dnsperf, names_zone, start_dnsmasq, start_nsd, table, workdir
from encrypted_listeners import make_cert, start_dnsproxy

FORMATS = ["{:,.0f}", "{:.3f}", "{:.2%}", "{:,.0f}", "{:.3f}"]  # the row's figures
MODES = {  # dnsproxy's rows: title, dnsperf mode, port key (DoH: GET, as dnsperf's POST
    "udp": ("udp", "udp"),  # waits ~40 ms per query on any server: bench/RESULTS.md)
    "tcp": ("tcp", "udp"),
    "DoT": ("dot", "dot"),
    "DoH GET": ("doh", "doh"),
}


def run(port: int, mode: str, queries: list[str], args: argparse.Namespace) -> tuple[Perf, Perf]:
    """The peak and the one-in-flight figures of one transport."""
    clients, outstanding = args.clients, args.outstanding
    if mode == "doh":
        clients = outstanding = args.doh_clients
    kw = {"mode": mode, "doh_method": "GET"}
    peak = dnsperf(port, queries, args.seconds, clients=clients, outstanding=outstanding, **kw)
    try:
        one = dnsperf(port, queries, args.seconds, outstanding=1, **kw)
    except subprocess.CalledProcessError:  # dnsmasq: its TCP children still busy, at times
        print(f"{mode} on port {port}: dnsperf failed one in flight", file=sys.stderr)
        one = Perf(0.0, 0.0, 1.0)
    return peak, one


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20, help="dnsperf -c for the peak run")
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q for the peak run")
    ap.add_argument(
        "--doh-clients", type=int, default=16, help="dnsperf -c and -q for the DoH peak run"
    )
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    results: dict[str, tuple[Perf, Perf]] = {}
    with workdir() as d:
        cert, key = make_cert(d)
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        (d / "p").mkdir()
        (d / "m").mkdir()
        try:
            server = start_dnsproxy(d / "p", f"127.0.0.1:{nsd.port}", cert, key)
            try:
                dnsperf(server.ports["udp"], queries, 1)  # warm-up: every name cached
                for title, (mode, port) in MODES.items():
                    results[f"dnsproxy {title}"] = run(server.ports[port], mode, queries, args)
            finally:
                server.proc.stop()
            size = f"--cache-size={max(10_000, 2 * args.names)}"
            dnsmasq = start_dnsmasq(d / "m", [f"--server=127.0.0.1#{nsd.port}", size])
            try:
                dnsperf(dnsmasq.port, queries, 1)  # warm-up: every name cached
                for mode in ("udp", "tcp"):
                    results[f"dnsmasq {mode}"] = run(dnsmasq.port, mode, queries, args)
            finally:
                dnsmasq.stop()
        finally:
            nsd.stop()
    rows = []
    for title, (peak, one) in results.items():
        figures = [peak.qps, peak.avg_ms, peak.lost, one.qps, one.avg_ms]
        rows.append([title, *(f.format(x) for f, x in zip(FORMATS, figures, strict=True))])
    header = [
        "server, transport (cache hits)",
        f"q/s, -c {args.clients} -q {args.outstanding}",
        "mean ms",
        "lost",
        "q/s, 1 in flight",
        "mean ms",
    ]
    print(table(rows, header))
    tcp, udp = results["dnsmasq tcp"][0].qps, results["dnsproxy udp"][0].qps
    ratios = [
        [title, f"{peak.qps / tcp:.2f}" if tcp else "-", f"{peak.qps / udp:.2f}" if udp else "-"]
        for title, (peak, _) in results.items()
        if title.startswith("dnsproxy")
    ]
    print()
    print(table(ratios, ["dnsproxy peak", "/ dnsmasq tcp", "/ dnsproxy udp"]))


if __name__ == "__main__":
    main()
