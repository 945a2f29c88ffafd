"""Forwarding path (cache misses): dnsproxy vs dnsmasq, both forwarding to nsd.

    python bench/forward.py [--seconds 10] [--names 200000] [--runs 1] [--rates 1000,10000]

Every query name is unique within the run (h0..hN under bench.test), so neither server can
answer from cache: dnsmasq runs with --cache-size=0, and dnsproxy's chain is forward only.
nsd shares CPU 1 with dnsperf; the servers under test get CPU 0 to themselves.

Besides queries/s, each server's own CPU time per query (user and kernel, from /proc over
the dnsperf run), which moves less than queries/s when the machine is shared. ``--runs N``
measures dnsmasq and dnsproxy N times in turn, one ratio per pair. Then the mean latency
of misses at each fixed rate in ``--rates`` (dnsperf -Q), where a server waits for every
query instead of working through a backlog.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Process,
    cpu_per_query,
    dnsperf,
    names_zone,
    start_dnsmasq,
    start_nsd,
    start_proxy,
    table,
    workdir,
)


def measure(
    label: str, server: Process, queries: Sequence[str], seconds: float, rates: Sequence[int]
) -> list[str]:
    """One dnsperf run against ``server``, then one paced run per rate (fresh names: the
    latency of misses): its row, queries/s first (as a number)."""
    r, user, kernel = cpu_per_query(server, queries, seconds)
    row = [label, r.qps, f"{r.avg_ms:.3f}", f"{r.lost:.2%}", f"{user:.1f}", f"{kernel:.1f}"]
    for rate in rates:
        row.append(f"{dnsperf(server.port, queries[::-1], seconds, max_qps=rate).avg_ms:.3f}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--names", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--rates", default="1000,10000", help="fixed rates (q/s) for the latency runs, or ''"
    )
    args = ap.parse_args()
    rates = [int(r) for r in args.rates.split(",") if r]
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    rows = []
    ratios = []
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        try:
            upstream = f"127.0.0.1:{nsd.port}"
            direct = dnsperf(nsd.port, queries, args.seconds)
            reference = ["nsd direct (reference)", direct.qps, f"{direct.avg_ms:.3f}", "", "", ""]
            rows.append(reference + [""] * len(rates))
            for run in range(args.runs):
                dm = start_dnsmasq(
                    d,
                    ["--cache-size=0", f"--server=127.0.0.1#{nsd.port}", "--dns-forward-max=1000"],
                )
                try:
                    base = measure("dnsmasq --cache-size=0", dm, queries, args.seconds, rates)
                finally:
                    dm.stop()
                (d / f"p{run}").mkdir()
                proxy = start_proxy(
                    d / f"p{run}",
                    f"""
                    [server]
                    listen = ["127.0.0.1:{{port}}"]
                    log_level = "warning"
                    [[chain]]
                    plugin = "forward"
                    upstreams = ["{upstream}"]
                    """,
                )
                try:
                    ours = measure("dnsproxy forward", proxy, queries, args.seconds, rates)
                finally:
                    proxy.stop()
                rows += [base, ours]
                ratios.append(ours[1] / base[1] if base[1] else 0.0)
        finally:
            nsd.stop()
    for row in rows:
        row[1] = f"{row[1]:,.0f}"
    header = ["server (cache misses, forwarded to nsd)", "queries/s", "mean ms", "lost"]
    paced = [f"mean ms at {rate:,} q/s" for rate in rates]
    print(table(rows, [*header, "user µs/q", "kernel µs/q", *paced]))
    print(f"\ndnsproxy / dnsmasq = {', '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
