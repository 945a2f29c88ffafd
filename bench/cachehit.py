"""Cache hits through the full default chain: dnsproxy vs dnsmasq, both in front of nsd.

    python bench/cachehit.py [--seconds 10] [--names 1000] [--rate 10000]

1000 names (h0..h999 under bench.test, TTL 1 day) are cycled, so after a warm-up every
query is a cache hit. dnsproxy runs the default chain (ratelimit, hosts, blocklist, cache,
forward), then the same without ratelimit, with a querylog step in front, and cache +
forward alone. dnsmasq gets the same blocklist in its own format and a cache large
enough for every name.
Reported: the highest rate dnsperf reaches (200 queries outstanding), and the mean
latency at a fixed ``--rate`` (dnsperf -Q).
Servers run on CPU 0; dnsperf and nsd on CPU 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BLOCKLISTS,
    FULL_CHAIN,
    Process,
    chain_config,
    dnsperf,
    names_zone,
    start_dnsmasq,
    start_nsd,
    start_proxy,
    table,
    workdir,
)

VARIANTS = {  # dnsproxy's chains, the default (common.FULL_CHAIN) first
    "full chain": FULL_CHAIN,
    "without ratelimit": [s for s in FULL_CHAIN if s != "ratelimit"],
    "cache + forward": ["cache", "forward"],
    "full chain + querylog": ["querylog", *FULL_CHAIN],
}


def measure(server: Process, queries: list[str], seconds: float, rate: int) -> list[str]:
    dnsperf(server.port, queries, 1)  # warm-up: every name cached
    peak = dnsperf(server.port, queries, seconds)
    paced = dnsperf(server.port, queries, seconds, max_qps=rate)
    return [
        f"{peak.qps:,.0f}",
        f"{peak.avg_ms:.3f}",
        f"{peak.lost:.2%}",
        f"{paced.avg_ms:.3f}",
        f"{server.rss_mb():.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--rate", type=int, default=10_000, help="fixed rate for the latency run")
    ap.add_argument("--only", choices=["dnsproxy", "dnsmasq"], help="run one server only")
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    dnsmasq_list = BLOCKLISTS / "basic.dnsmasq.conf"
    rows = []
    qps = {}
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        upstream = f"127.0.0.1:{nsd.port}"
        try:
            if args.only != "dnsproxy":
                dm = start_dnsmasq(
                    d,
                    [
                        f"--cache-size={max(10_000, 2 * args.names)}",
                        f"--server=127.0.0.1#{nsd.port}",
                        f"--conf-file={dnsmasq_list}",
                    ],
                )
                try:
                    row = measure(dm, queries, args.seconds, args.rate)
                    rows.append(["dnsmasq (cache, 76k blocked domains)", *row])
                    qps["dnsmasq"] = float(row[0].replace(",", ""))
                finally:
                    dm.stop()
            if args.only != "dnsmasq":
                for n, (title, steps) in enumerate(VARIANTS.items()):
                    (d / f"p{n}").mkdir()
                    proxy = start_proxy(d / f"p{n}", chain_config(upstream, steps))
                    try:
                        row = measure(proxy, queries, args.seconds, args.rate)
                        rows.append([f"dnsproxy {title} ({', '.join(steps)})", *row])
                        qps[title] = float(row[0].replace(",", ""))
                    finally:
                        proxy.stop()
        finally:
            nsd.stop()
    header = [
        f"server (cache hits: {args.names} names cycled)",
        "queries/s",
        "mean ms",
        "lost",
        f"mean ms at {args.rate:,} q/s",
        "RSS MB",
    ]
    print(table(rows, header))
    if qps.get("dnsmasq"):
        print()
        for title in VARIANTS:
            if title in qps:
                print(f"dnsproxy ({title}) / dnsmasq = {qps[title] / qps['dnsmasq']:.2f}")


if __name__ == "__main__":
    main()
