"""Soak run: 10 minutes of mixed load against dnsproxy, reporting memory and latency drift.

    python bench/soak.py [--seconds 600] [--qps 400] [--json out.json]

Not part of the test suite. Starts the fake upstream (``tests/fakeupstream.py``, as a
subprocess) and dnsproxy with cache → blocklist (``../shared/blocklists/tracking.domains``,
used in place) → forward, then drives a mix through it:

    hit 40 %       a small set of names, answered from the cache
    miss 25 %      unique random names (cache churn, upstream traffic)
    blocked 15 %   names from the blocklist
    tcp 10 %       cache hits over fresh TCP connections
    slow 5 %       names the upstream answers after 300 ms (in-flight build-up)
    malformed 5 %  garbage datagrams (no answer expected)

Every 10 s it samples the proxy's RSS and open file descriptors and the latency
percentiles of each class over the interval, and at the end reports the drift between
the first and last minute (memory growth, p50/p99 change, loss).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from common import BLOCKLISTS, ROOT, free_port, rss_mb, wait_udp, workdir

INTERVAL = 10.0
MIX = [
    ("hit", 40),
    ("miss", 25),
    ("blocked", 15),
    ("tcp", 10),
    ("slow", 5),
    ("malformed", 5),
]
BLOCKLIST = BLOCKLISTS / "tracking.domains"


def wire_query(name: str, msg_id: int) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return struct.pack("!HHHHHH", msg_id, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", 1, 1)


def blocked_names(count: int) -> list[str]:
    names = []
    with BLOCKLIST.open(errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "." in line and " " not in line:
                names.append(line)
                if len(names) >= count:
                    break
    return names


class Stats:
    """Latencies and losses per class, swapped out at each sample."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lat: dict[str, list[float]] = defaultdict(list)
        self.lost: dict[str, int] = defaultdict(int)

    def add(self, kind: str, seconds: float | None) -> None:
        with self.lock:
            if seconds is None:
                self.lost[kind] += 1
            else:
                self.lat[kind].append(seconds)

    def take(self) -> tuple[dict[str, list[float]], dict[str, int]]:
        with self.lock:
            lat, lost = self.lat, self.lost
            self.lat, self.lost = defaultdict(list), defaultdict(int)
        return lat, lost


def one_query(addr: tuple[str, int], kind: str, name: str, stats: Stats) -> None:
    msg_id = random.getrandbits(16)
    data = wire_query(name, msg_id)
    start = time.monotonic()
    try:
        if kind == "tcp":
            with socket.create_connection(addr, timeout=3) as s:
                s.sendall(struct.pack("!H", len(data)) + data)
                head = s.recv(2, socket.MSG_WAITALL)
                s.recv(struct.unpack("!H", head)[0], socket.MSG_WAITALL)
        else:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                if kind == "malformed":
                    s.sendto(os.urandom(random.randint(0, 40)), addr)
                    return
                s.sendto(data, addr)
                while s.recv(65535)[:2] != data[:2]:
                    pass
    except OSError:
        stats.add(kind, None)
        return
    stats.add(kind, time.monotonic() - start)


def driver(addr: tuple[str, int], qps: float, stop: threading.Event, stats: Stats) -> None:
    """Open-loop load: one thread per worker, each sending at ``qps`` on average."""
    hot = [f"h{i}.soak.test" for i in range(200)]
    blocked = blocked_names(5000)
    kinds = [k for k, w in MIX for _ in range(w)]
    interval = 1.0 / qps
    next_at = time.monotonic()
    while not stop.is_set():
        kind = random.choice(kinds)
        if kind in ("hit", "tcp"):
            name = random.choice(hot)
        elif kind == "blocked":
            name = random.choice(blocked)
        elif kind == "slow":
            name = f"{random.getrandbits(40):x}.slow.soak.test"
        else:
            name = f"{random.getrandbits(64):x}.miss.soak.test"
        one_query(addr, kind, name, stats)
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_at = time.monotonic()  # behind: do not build a burst


def _ms(row: dict[str, float], kind: str) -> float:
    return row.get(kind, float("nan"))


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(p * len(values)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--qps", type=float, default=400.0, help="total offered queries/s")
    ap.add_argument("--workers", type=int, default=16)
    ap.add_argument("--json", type=Path, help="write the samples here")
    args = ap.parse_args()

    with workdir() as d:
        up_port, port = free_port(), free_port()
        script = d / "upstream.json"
        script.write_text(json.dumps([{"match": {"qname": "*.slow.soak.test."}, "delay": 0.3}]))
        upstream = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "tests" / "fakeupstream.py"),
                "--port",
                str(up_port),
                "--script",
                str(script),
            ],
            stdout=subprocess.DEVNULL,
        )
        config = d / "config.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\nlog_level = "warning"\n'
            '[[chain]]\nplugin = "cache"\nmax_entries = 20000\n'
            f'[[chain]]\nplugin = "blocklist"\nlists = ["{BLOCKLIST}"]\n'
            f'[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:{up_port}"]\n'
            "timeout = 1.0\n"
        )
        proxy = subprocess.Popen(
            [sys.executable, "-m", "dnsproxy", "run", "-c", str(config)],
            cwd=d,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_udp(up_port)
            wait_udp(port, timeout=120)  # the blocklist loads first
            return soak(("127.0.0.1", port), proxy.pid, args)
        finally:
            for p in (proxy, upstream):
                p.terminate()
                p.wait(10)


def soak(addr: tuple[str, int], pid: int, args: argparse.Namespace) -> int:
    stats = Stats()
    stop = threading.Event()
    threads = [
        threading.Thread(target=driver, args=(addr, args.qps / args.workers, stop, stats))
        for _ in range(args.workers)
    ]
    for t in threads:
        t.start()
    samples = []
    start = time.monotonic()
    print(
        f"{'t':>5} {'rss MB':>7} {'fds':>4} {'qps':>6} {'lost':>5} "
        + " ".join(f"{k + ' p50/p99':>18}" for k, _ in MIX if k != "malformed")
    )
    try:
        while time.monotonic() - start < args.seconds:
            time.sleep(INTERVAL)
            lat, lost = stats.take()
            sample = {
                "t": round(time.monotonic() - start),
                "rss_mb": round(rss_mb(pid), 1),
                "fds": len(os.listdir(f"/proc/{pid}/fd")),
                "qps": round(sum(len(v) for v in lat.values()) / INTERVAL),
                "lost": sum(lost.values()),
                "p50_ms": {k: round(pct(v, 0.5), 2) for k, v in lat.items()},
                "p99_ms": {k: round(pct(v, 0.99), 2) for k, v in lat.items()},
            }
            samples.append(sample)
            cols = " ".join(
                f"{_ms(sample['p50_ms'], k):8.2f}/{_ms(sample['p99_ms'], k):<9.2f}"
                for k, _ in MIX
                if k != "malformed"
            )
            print(
                f"{sample['t']:>5} {sample['rss_mb']:>7} {sample['fds']:>4} "
                f"{sample['qps']:>6} {sample['lost']:>5} {cols}",
                flush=True,
            )
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    report(samples)
    if args.json:
        args.json.write_text(json.dumps(samples, indent=1))
    return 0


def report(samples: list[dict]) -> None:
    """Drift between the first and the last minute (or thirds of a shorter run)."""
    if len(samples) < 2:
        print("too short to report drift")
        return
    n = max(1, min(6, len(samples) // 3))
    first, last = samples[:n], samples[-n:]

    def mean(rows: list[dict], key: str, kind: str | None = None) -> float:
        vals = [r[key][kind] if kind else r[key] for r in rows if not kind or kind in r[key]]
        vals = [v for v in vals if v == v]  # drop NaN
        return statistics.fmean(vals) if vals else float("nan")

    print("\ndrift (first → last window):")
    print(f"  rss MB   {mean(first, 'rss_mb'):8.1f} → {mean(last, 'rss_mb'):8.1f}")
    print(f"  fds      {mean(first, 'fds'):8.1f} → {mean(last, 'fds'):8.1f}")
    print(f"  qps      {mean(first, 'qps'):8.1f} → {mean(last, 'qps'):8.1f}")
    print(f"  lost/10s {mean(first, 'lost'):8.1f} → {mean(last, 'lost'):8.1f}")
    for kind, _ in MIX:
        if kind == "malformed":
            continue
        p50 = f"{mean(first, 'p50_ms', kind):7.2f} → {mean(last, 'p50_ms', kind):7.2f}"
        p99 = f"{mean(first, 'p99_ms', kind):7.2f} → {mean(last, 'p99_ms', kind):7.2f}"
        print(f"  {kind:<8} p50 {p50} ms   p99 {p99} ms")


if __name__ == "__main__":
    sys.exit(main())
