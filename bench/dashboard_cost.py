"""What serving the dashboard costs the DNS path: cache hits with [http] off, on, and open.

    python bench/dashboard_cost.py [--seconds 5] [--repeat 3] [--names 1000]

Three dnsproxy configurations, each running the default chain with a querylog step in
front (querylog, ratelimit, hosts, blocklist, cache, forward) in front of nsd:

* ``off``: no ``[http]`` table;
* ``on``: ``[http]`` on loopback (no password, so the pages are open), nobody looking;
* ``open``: the same while a client plays a browser with the overview and the live query
  log open: it loads ``/``, ``/log`` and the chart data once, then every ``--poll``
  seconds GETs the fragments those pages poll (``/ui/log/rows``, ``/ui/overview``,
  ``/ui/blocking``), as often as the log page polls its rows (the overview: 15 s and 5 s).

dnsperf sends cache hits (1000 names cycled after a warm-up) for ``--seconds``; the
configurations alternate within each repetition (off, on, open; then open, on, off; ...),
each on a fresh process, then at a fixed ``--rate`` (dnsperf -Q) for the mean latency at
a load the server keeps up with. Reported: queries/s and the mean latency per run, their
ratio to ``off`` in the same repetition, and the HTTP requests the browser made (all must
be 200) with their mean time. The servers run on CPU 0; dnsperf, nsd and the polling
client on CPU 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    CLIENT_CPU,
    FULL_CHAIN,
    chain_config,
    dnsperf,
    free_port,
    names_zone,
    start_nsd,
    start_proxy,
    table,
    workdir,
)

VARIANTS = ["off", "on", "open"]
PAGES = ["/", "/log", "/ui/overview/chart"]  # loaded once when the pages open
POLLED = ["/ui/log/rows", "/ui/overview", "/ui/blocking"]  # then polled


class Browser(threading.Thread):
    """GETs the pages, then the polled fragments every ``period`` seconds until stopped."""

    def __init__(self, base: str, period: float) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.period = period
        self.done = threading.Event()
        self.times: list[float] = []
        self.failures: list[str] = []

    def get(self, client: httpx.Client, path: str) -> None:
        start = time.perf_counter()
        try:
            status = client.get(path).status_code
        except httpx.HTTPError as exc:
            self.failures.append(f"{path}: {exc!r}")
            return
        self.times.append(time.perf_counter() - start)
        if status != 200:
            self.failures.append(f"{path}: HTTP {status}")

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=10) as client:
            for path in PAGES:
                self.get(client, path)
            while not self.done.wait(self.period):
                for path in POLLED:
                    self.get(client, path)


def config(upstream: str, variant: str) -> str:
    text = chain_config(upstream, ["querylog", *FULL_CHAIN])
    if variant == "off":
        return text
    return text + f'[http]\nlisten = "127.0.0.1:{free_port()}"\n'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--names", type=int, default=1000)
    ap.add_argument("--poll", type=float, default=1.0, help="seconds between polls")
    ap.add_argument("--rate", type=int, default=10_000, help="fixed rate for the latency run")
    args = ap.parse_args()
    os.sched_setaffinity(0, {CLIENT_CPU})  # the polling client shares dnsperf's CPU
    queries = [f"h{i}.bench.test A" for i in range(args.names)]
    qps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    paced_ms: dict[str, list[float]] = {v: [] for v in VARIANTS}
    http_times: list[float] = []
    failures: list[str] = []
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", args.names)})
        upstream = f"127.0.0.1:{nsd.port}"
        try:
            for rep in range(args.repeat):
                order = VARIANTS if rep % 2 == 0 else list(reversed(VARIANTS))
                for variant in order:
                    w = d / f"{variant}{rep}"
                    w.mkdir()
                    text = config(upstream, variant)
                    proxy = start_proxy(w, text)
                    browser = None
                    try:
                        dnsperf(proxy.port, queries, 1)  # warm-up: every name cached
                        if variant == "open":
                            listen = text.rpartition('listen = "')[2].partition('"')[0]
                            browser = Browser(f"http://{listen}", args.poll)
                            browser.start()
                        perf = dnsperf(proxy.port, queries, args.seconds)
                        paced = dnsperf(proxy.port, queries, args.seconds, max_qps=args.rate)
                    finally:
                        if browser is not None:
                            browser.done.set()
                            browser.join()
                            http_times += browser.times
                            failures += browser.failures
                        proxy.stop()
                    if perf.lost or paced.lost:
                        lost = max(perf.lost, paced.lost)
                        failures.append(f"{variant}, repetition {rep + 1}: DNS lost {lost:.2%}")
                    qps[variant].append(perf.qps)
                    paced_ms[variant].append(paced.avg_ms)
                    print(f"repetition {rep + 1}, {variant}: {perf}; {paced}", file=sys.stderr)
        finally:
            nsd.stop()
    rows = [
        [
            variant,
            " / ".join(f"{q:,.0f}" for q in qps[variant]),
            " / ".join(f"{q / o:.2f}" for q, o in zip(qps[variant], qps["off"], strict=True)),
            " / ".join(f"{m:.3f}" for m in paced_ms[variant]),
            " / ".join(
                f"{m / o:.2f}" for m, o in zip(paced_ms[variant], paced_ms["off"], strict=True)
            ),
        ]
        for variant in VARIANTS
    ]
    header = [
        "[http]",
        "queries/s per repetition",
        "/ off",
        f"mean ms at {args.rate:,} q/s",
        "/ off",
    ]
    print(table(rows, header))
    if http_times:
        print(
            f"\nbrowser: {len(http_times)} requests answered, mean "
            f"{statistics.mean(http_times) * 1000:.1f} ms, max {max(http_times) * 1000:.1f} ms"
        )
    print("failures: " + ("; ".join(failures) if failures else "none"))


if __name__ == "__main__":
    main()
