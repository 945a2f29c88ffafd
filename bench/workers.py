"""``[server] workers``: cache hits with workers = 2 against workers = 1, nothing pinned.

    python bench/workers.py [--seconds 10] [--names 1000] [--clients 4] [--workers 1 2]

The chain is cache + forward (nsd behind it, for the warm-up misses), so every measured
query is a cache hit. The load comes from ``--clients`` dnsperf processes at once, each
sending from its own address (127.0.0.1, 127.0.0.2, ...): the workers are steered by
client address, so one address would keep one worker busy and the rest idle. Neither
the server nor dnsperf is pinned (the point is to let the scheduler use every core);
reported: the sum of the dnsperf rates, their mean latency and loss, and the supervisor
plus workers' RSS.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    Perf,
    chain_config,
    dnsperf,
    names_zone,
    rss_mb,
    start_nsd,
    start_proxy,
    table,
    workdir,
)

STEPS = ["cache", "forward"]


def load(port: int, queries: list[str], seconds: float, clients: int) -> list[Perf]:
    """``clients`` unpinned dnsperf runs at once, from 127.0.0.1, 127.0.0.2, ..."""
    with ThreadPoolExecutor(clients) as pool:
        runs = [pool.submit(dnsperf, port, queries, seconds, cpu=None, source=f"127.0.0.{i + 1}")
                for i in range(clients)]  # fmt: skip
        return [run.result() for run in runs]


def children_rss(pid: int) -> float:
    """RSS of ``pid`` and its direct children (the workers), in MB."""
    total = rss_mb(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += rss_mb(int(child))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4, help="dnsperf processes, one address each")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    rows = []
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        try:
            for n in args.workers:
                config = chain_config(f"127.0.0.1:{nsd.port}", STEPS)
                config = config.replace("[server]\n", f"[server]\nworkers = {n}\n", 1)
                (d / f"w{n}").mkdir()
                proxy = start_proxy(d / f"w{n}", config, cpu=None)
                try:
                    time.sleep(1)  # every worker up (the first answer may come from one)
                    load(proxy.port, queries, 1, args.clients)  # warm-up: every name cached
                    runs = load(proxy.port, queries, args.seconds, args.clients)
                    rows.append([
                        f"workers = {n}",
                        f"{sum(r.qps for r in runs):,.0f}",
                        f"{sum(r.avg_ms for r in runs) / len(runs):.3f}",
                        f"{sum(r.lost for r in runs) / len(runs):.2%}",
                        f"{children_rss(proxy.pid):.0f}",
                    ])  # fmt: skip
                finally:
                    proxy.stop()
        finally:
            nsd.stop()
    header = [
        f"dnsproxy {' + '.join(STEPS)}, cache hits, {args.clients} clients, unpinned",
        "queries/s (sum)",
        "mean ms",
        "lost",
        "RSS MB (all processes)",
    ]
    print(table(rows, header))


if __name__ == "__main__":
    main()
