"""Cache misses of a signed zone through dnsproxy, with and without the dnssec step.

    python bench/dnssec.py [--seconds 10]

The signed hierarchy of the tests (tests/dnssec_hierarchy.py: nsd behind a non-validating
unbound) is the upstream. dnsproxy runs without a cache, so every query is a miss for it:
``forward`` alone, then ``dnssec`` + ``forward`` (DNSKEY/DS sets stay in the step's store,
so what is measured is the per-answer work: DO/CD query, parse, RRSIG verification, AD).
Queries cycle through names of the NSEC zone (algorithm 13), the NSEC3 zone (algorithm 15)
and a wildcard, which unbound answers from its own cache.
Reported: the highest rate dnsperf reaches and its mean latency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

from common import dnsperf, start_proxy, table, workdir  # noqa: E402

from tests.dnssec_hierarchy import Hierarchy  # noqa: E402

QUERIES = [
    "www.example.test A",
    "www.example.test TXT",
    "a.wild.example.test A",
    "www.nsec3.test A",
    "nx.example.test A",
]


def config(upstream: str, anchor: Path, validate: bool) -> str:
    dnssec = f'[[chain]]\nplugin = "dnssec"\ntrust_anchors = ["{anchor}"]\n' if validate else ""
    return (
        '[server]\nlisten = ["127.0.0.1:{port}"]\n'
        + dnssec
        + f'[[chain]]\nplugin = "forward"\nupstreams = ["{upstream}"]\n'
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    rows = []
    with workdir() as d:
        h = Hierarchy(d / "hierarchy").start()
        try:
            assert h.resolver is not None
            for label, validate in (("forward", False), ("dnssec + forward", True)):
                sub = d / label.replace(" ", "")
                sub.mkdir()
                proxy = start_proxy(sub, config(h.resolver.addr, h.anchor, validate))
                try:
                    dnsperf(proxy.port, QUERIES, 1)  # warm-up: keys validated and kept
                    perf = dnsperf(proxy.port, QUERIES, args.seconds)
                    rows.append(
                        [label, f"{perf.qps:,.0f}", f"{perf.avg_ms:.3f}", f"{perf.lost:.2%}"]
                    )
                finally:
                    proxy.stop()
        finally:
            h.stop()
    print(table(rows, ["chain", "misses/s", "mean ms", "lost"]))


if __name__ == "__main__":
    main()
