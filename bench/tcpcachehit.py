"""Cache hits over dnsproxy's TCP and DoT listeners, with UDP as the reference.

    python bench/tcpcachehit.py [--seconds 5] [--clients 20] [--outstanding 100]

dnsproxy runs cache and forward in front of nsd; after a warm-up every query is a hit, so
the figures are the per-answer cost of the stream listener (DoT runs the same handler
under TLS). Rows: the peak rate with ``--outstanding`` queries in flight over
``--clients`` connections (several queries pipelined on each), and one query at a time
on one connection. Servers run on CPU 0; dnsperf and nsd on CPU 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dnsperf, names_zone, start_nsd, table, workdir
from encrypted_listeners import make_cert, start_dnsproxy

FORMATS = ["{:,.0f}", "{:.3f}", "{:.2%}", "{:,.0f}", "{:.3f}"]  # the row's figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=20, help="dnsperf -c for the peak run")
    ap.add_argument("--outstanding", type=int, default=100, help="dnsperf -q for the peak run")
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    rows = []
    with workdir() as d:
        cert, key = make_cert(d)
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        (d / "p").mkdir()
        try:
            server = start_dnsproxy(d / "p", f"127.0.0.1:{nsd.port}", cert, key)
            try:
                dnsperf(server.ports["udp"], queries, 1)  # warm-up: every name cached
                for mode in ("udp", "tcp", "dot"):
                    port = server.ports["udp" if mode == "tcp" else mode]
                    peak = dnsperf(
                        port,
                        queries,
                        args.seconds,
                        clients=args.clients,
                        outstanding=args.outstanding,
                        mode=mode,
                    )
                    one = dnsperf(port, queries, args.seconds, outstanding=1, mode=mode)
                    figures = [peak.qps, peak.avg_ms, peak.lost, one.qps, one.avg_ms]
                    rows.append(
                        [mode, *(f.format(x) for f, x in zip(FORMATS, figures, strict=True))]
                    )
            finally:
                server.proc.stop()
        finally:
            nsd.stop()
    header = [
        "transport (cache hits)",
        f"q/s, -c {args.clients} -q {args.outstanding}",
        "mean ms",
        "lost",
        "q/s, 1 in flight",
        "mean ms",
    ]
    print(table(rows, header))


if __name__ == "__main__":
    main()
