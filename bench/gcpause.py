"""Garbage-collector pauses of ``dnsproxy run`` under a load of cache misses.

    python bench/gcpause.py [--seconds 6] [--no-freeze]

Runs the proxy (forward only, to nsd) with a `gc.callbacks` probe, drives it with dnsperf
over 1000 names, and prints the time spent collecting and every full (generation 2)
collection's pause. ``--no-freeze`` turns off the start-up `gc.freeze` of
`Server(freeze_gc=True)` to show what it saves.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    chain_config,
    dnsperf,
    free_port,
    launch,
    names_zone,
    start_nsd,
    workdir,
)


def serve(config: str, report: str, freeze: bool) -> None:
    """``dnsproxy run -c config`` with a probe that writes its figures to ``report``."""
    from dnsproxy import cli, server

    if not freeze:
        server.refreeze_gc = lambda: None  # type: ignore[assignment]
    started = [0.0]
    pauses: list[float] = []
    total = [0.0]

    def probe(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        elapsed = time.perf_counter() - started[0]
        total[0] += elapsed
        if info["generation"] == 2:
            pauses.append(elapsed)

    gc.callbacks.append(probe)
    atexit.register(
        lambda: Path(report).write_text(json.dumps({"total": total[0], "full": pauses}))
    )
    sys.argv = ["dnsproxy", "run", "-c", config]
    sys.exit(cli.main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--no-freeze", action="store_true")
    ap.add_argument("--serve", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve[0], args.serve[1], not args.no_freeze)
        return
    queries = [f"h{i}.bench.test A" for i in range(1000)]
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", 1000)})
        try:
            port = free_port()
            config = d / "dnsproxy.toml"
            config.write_text(
                chain_config(f"127.0.0.1:{nsd.port}", ["forward"]).replace("{port}", str(port))
            )
            report = d / "gc.json"
            cmd = [sys.executable, __file__, "--serve", str(config), str(report)]
            if args.no_freeze:
                cmd.append("--no-freeze")
            proxy = launch("dnsproxy", cmd, port, cwd=d)
            try:
                perf = dnsperf(port, queries, args.seconds)
            finally:
                proxy.stop()
            found = json.loads(report.read_text())
        finally:
            nsd.stop()
    pauses = sorted(round(p * 1000, 1) for p in found["full"])
    print(f"freeze: {'off' if args.no_freeze else 'on'}; {perf}")
    print(f"collector time {found['total']:.3f} s in all (start-up included)")
    print(f"{len(pauses)} full collections, pauses in ms: {pauses}")


if __name__ == "__main__":
    main()
