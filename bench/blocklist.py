"""A 1M-domain blocklist: dnsproxy vs dnsmasq, load time, memory and blocked answers/s.

    python bench/blocklist.py [--names 1000000] [--seconds 10] [--sample 10000]

The list is every domain of ../shared/blocklists plus generated names up to ``--names``,
written as a hosts file for dnsproxy and as ``address=/d/0.0.0.0`` lines for dnsmasq.
Reported per server:

* time to first blocked answer: from process start until a query for a listed name is
  answered with 0.0.0.0 (dnsproxy answers earlier than that, unblocked, while it loads);
* RSS once the list is loaded;
* blocked answers per second (dnsperf, ``--sample`` listed names cycled), once the
  server is idle after loading and after a 1 s warm-up run;
* dnsproxy again with a 10k list, the same names queried: lookup cost should not depend
  on the size of the list.

Then, in this process, without the network: parse time and the cost of one lookup in a
10k and a 1M set. Servers run on CPU 0, dnsperf on CPU 1.
"""

from __future__ import annotations

import argparse
import functools
import random
import socket
import struct
import subprocess
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BLOCKLISTS,
    SERVER_CPU,
    Process,
    cpu_seconds,
    dnsperf,
    free_port,
    pinned,
    rss_mb,
    table,
    which,
    workdir,
)
from dnsproxy.plugins.blocklist.domainset import merge
from dnsproxy.plugins.blocklist.parse import parse_list

from dnsproxy.wire import name_to_key

WORDS = ["ads", "track", "pixel", "stat", "metric", "cdn", "img", "beacon", "log", "tag"]
TLDS = ["com", "net", "org", "io", "xyz", "info", "biz", "de", "fr", "co"]


def build_names(count: int, seed: int = 1) -> list[str]:
    """The shared lists' domains, then generated ones, ``count`` in all (distinct)."""
    names: dict[str, None] = {}
    for path in sorted(BLOCKLISTS.glob("*")):
        if path.suffix == ".md":
            continue
        for line in path.read_text().splitlines():
            if not line or line[0] in "#!":
                continue
            name = line.split()[-1].strip("|^/").removeprefix("server=/")
            if name and "/" not in name:
                names[name.lower()] = None
    rng = random.Random(seed)
    i = 0
    while len(names) < count:
        label = f"{rng.choice(WORDS)}{rng.randrange(10**6)}-{i}"
        names[f"{label}.{rng.choice(WORDS)}{rng.randrange(1000)}.{rng.choice(TLDS)}"] = None
        i += 1
    return list(names)[:count]


def query_wire(name: str) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"


def first_blocked(cmd: list[str], port: int, name: str, cwd: Path) -> tuple[Process, float]:
    """Start ``cmd``; seconds until ``name`` is answered with 0.0.0.0."""
    query = query_wire(name)
    start = time.monotonic()
    log = (cwd / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cwd)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.005)
        while time.monotonic() - start < 120:
            s.sendto(query, ("127.0.0.1", port))
            try:
                reply = s.recv(4096)
            except OSError:
                if proc.poll() is not None:
                    sys.exit(f"{cmd[3]} exited:\n{(cwd / 'server.log').read_text()}")
                continue
            # an answer (ANCOUNT > 0) whose last record is 0.0.0.0 (no OPT: none was asked)
            if reply[6:8] != b"\0\0" and reply.endswith(b"\x00\x04\x00\x00\x00\x00"):
                return Process(cmd[3], proc, port), time.monotonic() - start
            time.sleep(0.002)
    proc.kill()
    sys.exit("no blocked answer within 120 s")


def settle(pid: int, limit: float = 60.0) -> None:
    """Wait until the server is idle (under 5 % of a CPU over 0.5 s): the first blocked
    answer can come while loading still goes on (the rest of the list, merging, freeing),
    which would otherwise share the CPU with the measured run."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = sum(cpu_seconds(pid))
        time.sleep(0.5)
        if sum(cpu_seconds(pid)) - before < 0.025:
            return


def run_dnsproxy(d: Path, hosts: Path, probe: str) -> tuple[Process, float]:
    port = free_port()
    config = d / "dnsproxy.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nlog_level = "warning"\n'
        f'[[chain]]\nplugin = "blocklist"\nlists = ["{hosts}"]\n'
    )
    cmd = pinned([sys.executable, "-m", "dnsproxy", "run", "-c", str(config)], SERVER_CPU)
    return first_blocked(cmd, port, probe, d)


def run_dnsmasq(d: Path, conf: Path, probe: str) -> tuple[Process, float]:
    port = free_port()
    cmd = [
        which("dnsmasq"), "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
        "--user=root", "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={port}",
        f"--pid-file={d}/dnsmasq.pid", "--log-facility=-", f"--conf-file={conf}",
    ]  # fmt: skip
    return first_blocked(pinned(cmd, SERVER_CPU), port, probe, d)


def in_process(names: list[str], sample: list[str]) -> list[list[str]]:
    """Parse time, set size and lookup cost without the network, for 10k and all names."""
    rows = []
    keys = [name_to_key(n) for n in sample]
    for subset in (names[:10_000], names):
        data = "".join(f"0.0.0.0 {n}\n" for n in subset).encode()
        start = time.perf_counter()
        parsed = parse_list(data)
        parse_s = time.perf_counter() - start
        ds = merge([(0, parsed.hashes, parsed.kinds, parsed.patterns)])
        lookups = [k for k in keys if ds.verdict(k) >= 0]  # listed names: a hit each
        n = max(1, len(lookups))
        run = functools.partial(list, map(ds.verdict, lookups * 20))
        per = timeit.timeit(run, number=1) / (20 * n)
        rows.append(
            [f"{len(subset):,}", f"{parse_s:.2f}", f"{ds.nbytes / 2**20:.1f}", f"{per * 1e6:.2f}"]
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--names", type=int, default=1_000_000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--sample", type=int, default=10_000, help="listed names dnsperf cycles")
    ap.add_argument("--only", choices=["dnsproxy", "dnsmasq"], help="run one server only")
    args = ap.parse_args()
    names = build_names(args.names)
    small = names[:10_000]
    sample = random.Random(2).sample(small, min(args.sample, len(small)))
    queries = [f"{n} A" for n in sample]
    rows = []
    with workdir() as d:
        big_hosts = d / "big.hosts"
        big_hosts.write_text("".join(f"0.0.0.0 {n}\n" for n in names))
        small_hosts = d / "small.hosts"
        small_hosts.write_text("".join(f"0.0.0.0 {n}\n" for n in small))
        dnsmasq_conf = d / "big.dnsmasq.conf"
        dnsmasq_conf.write_text("".join(f"address=/{n}/0.0.0.0\n" for n in names))
        runs = []
        if args.only != "dnsmasq":
            runs.append((f"dnsproxy, {len(names):,} names", run_dnsproxy, big_hosts))
            runs.append((f"dnsproxy, {len(small):,} names", run_dnsproxy, small_hosts))
        if args.only != "dnsproxy":
            runs.append((f"dnsmasq, {len(names):,} names", run_dnsmasq, dnsmasq_conf))
        for label, start, path in runs:
            sub = d / label.split(",")[0] / str(len(rows))
            sub.mkdir(parents=True)
            server, ready = start(sub, path, names[-1] if path != small_hosts else small[-1])
            try:
                settle(server.pid)
                rss = rss_mb(server.pid)
                dnsperf(server.port, queries, 1)  # warm-up: what a server keeps, it keeps now
                perf = dnsperf(server.port, queries, args.seconds)
            finally:
                server.stop()
            rows.append(
                [label, f"{ready:.2f}", f"{rss:.0f}", f"{perf.qps:,.0f}", f"{perf.lost:.2%}"]
            )
    print(table(rows, ["server", "first blocked answer (s)", "RSS (MB)", "blocked q/s", "lost"]))
    print()
    print(
        table(
            in_process(names, sample),
            ["names", "parse (s)", "set (MB)", "lookup of a listed name (µs)"],
        )
    )


if __name__ == "__main__":
    main()
