"""Forwarding path (cache misses): dnsproxy vs dnsmasq, both forwarding to nsd.

    python bench/forward.py [--seconds 10] [--names 200000]

Every query name is unique within the run (h0..hN under bench.test), so neither server can
answer from cache: dnsmasq runs with --cache-size=0, and dnsproxy's chain is forward only.
nsd shares CPU 1 with dnsperf; the servers under test get CPU 0 to themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dnsperf, names_zone, start_dnsmasq, start_nsd, start_proxy, table, workdir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--names", type=int, default=200_000)
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    rows = []
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        try:
            upstream = f"127.0.0.1:{nsd.port}"
            direct = dnsperf(nsd.port, queries, args.seconds)
            rows.append(
                ("nsd direct (reference)", f"{direct.qps:,.0f}", f"{direct.avg_ms:.3f}", "")
            )
            dm = start_dnsmasq(
                d, ["--cache-size=0", f"--server=127.0.0.1#{nsd.port}", "--dns-forward-max=1000"]
            )
            try:
                r = dnsperf(dm.port, queries, args.seconds)
                rows.append(
                    ("dnsmasq --cache-size=0", f"{r.qps:,.0f}", f"{r.avg_ms:.3f}", f"{r.lost:.2%}")
                )
                base = r.qps
            finally:
                dm.stop()
            (d / "p").mkdir()
            proxy = start_proxy(
                d / "p",
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
                r = dnsperf(proxy.port, queries, args.seconds)
                rows.append(
                    ("dnsproxy forward", f"{r.qps:,.0f}", f"{r.avg_ms:.3f}", f"{r.lost:.2%}")
                )
                ratio = r.qps / base if base else 0
            finally:
                proxy.stop()
        finally:
            nsd.stop()
    print(table(rows, ["server (cache misses, forwarded to nsd)", "queries/s", "mean ms", "lost"]))
    print(f"\ndnsproxy / dnsmasq = {ratio:.2f}")


if __name__ == "__main__":
    main()
