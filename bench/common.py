"""Benchmark harness: peers and dnsproxy pinned to CPUs like DESIGN.md §5, driven by dnsperf.

The server under test runs on CPU 0 and dnsperf on CPU 1, so numbers from one run compare
servers fairly; absolute numbers depend on the machine. Everything listens on loopback.

Used by the scripts beside it (``python bench/forward.py``); not part of the test suite.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The tests' free_port draws below the ephemeral range, so a port handed out here is not
# taken by some client socket before the server meant to bind it has started.
from tests.conftest import BLOCKLISTS, free_port  # noqa: E402

SERVER_CPU = 0
CLIENT_CPU = 1


def which(binary: str) -> str:
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if not path:
        sys.exit(f"{binary} is not installed (apt-get install it; see .ci/run)")
    return path


def pinned(cmd: Sequence[str], cpu: int | None) -> list[str]:
    """``cmd`` run on ``cpu`` (None: wherever the scheduler puts it)."""
    return list(cmd) if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def wait_udp(port: int, timeout: float = 30.0) -> None:
    """Wait until something answers a DNS query on 127.0.0.1:port."""
    query = bytes.fromhex("abcd01000001000000000000") + b"\x04wait\x04test\x00\x00\x01\x00\x01"
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        while time.monotonic() < deadline:
            s.sendto(query, ("127.0.0.1", port))
            try:
                s.recv(4096)
                return
            except OSError:
                time.sleep(0.05)
    raise TimeoutError(f"nothing answers on 127.0.0.1:{port}")


class Process:
    """A started server: its port, pid and how to stop it."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], port: int) -> None:
        self.name = name
        self.proc = proc
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (from /proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def launch(
    name: str,
    cmd: Sequence[str],
    port: int,
    cpu: int | None = SERVER_CPU,
    timeout: float = 30.0,
    **popen: Any,
) -> Process:
    """Start a server pinned to ``cpu`` and wait until it answers on 127.0.0.1:port
    (killed, and TimeoutError raised, if it does not within ``timeout`` seconds)."""
    proc = subprocess.Popen(pinned(cmd, cpu), **popen)
    try:
        wait_udp(port, timeout)
    except TimeoutError:
        proc.kill()
        raise
    return Process(name, proc, port)


@contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dnsproxy-bench-") as d:
        yield Path(d)


def names_zone(origin: str, count: int, ttl: int = 86400) -> str:
    """A zone with ``count`` A records h0..h{count-1} under ``origin``."""
    lines = [
        f"$ORIGIN {origin}.",
        f"$TTL {ttl}",
        f"@ IN SOA ns.{origin}. admin.{origin}. 1 3600 600 86400 {ttl}",
        "@ IN NS ns",
        "ns IN A 127.0.0.1",
    ]
    lines += [f"h{i} IN A 192.0.2.{i % 250 + 1}" for i in range(count)]
    return "\n".join(lines) + "\n"


def start_nsd(d: Path, zones: dict[str, str], cpu: int = CLIENT_CPU) -> Process:
    """nsd on 127.0.0.1 serving ``zones`` (name -> zone text); pinned to ``cpu``."""
    port = free_port()
    conf = [
        "server:",
        f"  ip-address: 127.0.0.1@{port}",
        '  username: ""',
        '  chroot: ""',
        f'  zonesdir: "{d}"',
        f'  pidfile: "{d}/nsd.pid"',
        '  database: ""',
        f'  xfrdfile: "{d}/xfrd.state"',
        f'  zonelistfile: "{d}/zone.list"',
        f'  logfile: "{d}/nsd.log"',
        "  server-count: 1",
        "  rrl-ratelimit: 0",
        "remote-control:",
        "  control-enable: no",
    ]
    for name, text in zones.items():
        (d / f"{name}.zone").write_text(text)
        conf += ["zone:", f"  name: {name}", f"  zonefile: {name}.zone"]
    (d / "nsd.conf").write_text("\n".join(conf) + "\n")
    cmd = [which("nsd"), "-d", "-c", str(d / "nsd.conf")]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return launch("nsd", cmd, port, cpu, **quiet)


def start_dnsmasq(d: Path, args: Sequence[str], cpu: int = SERVER_CPU) -> Process:
    """dnsmasq on 127.0.0.1 (no /etc/hosts, no resolv.conf) with extra ``args``."""
    port = free_port()
    cmd = [
        which("dnsmasq"),
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--user=root",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        f"--port={port}",
        f"--pid-file={d}/dnsmasq.pid",
        "--log-facility=-",
        *args,
    ]
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    return launch("dnsmasq", cmd, port, cpu, **quiet)


FULL_CHAIN = ["ratelimit", "hosts", "blocklist", "cache", "forward"]


def chain_config(upstream: str, steps: Sequence[str]) -> str:
    """A dnsproxy config (``{port}`` left to `start_proxy`) running ``steps`` in order.

    The benchmarks' default chain is `FULL_CHAIN`: ratelimit first (it must see every
    response), hosts, blocklist (basic.hosts, 76k domains), cache, forward. The rate limit
    is set far above dnsperf's rate, so the accounting runs on every response without
    limiting any (a real 20/s would limit dnsperf's one client).
    """
    tables = {
        "querylog": 'plugin = "querylog"',
        "ratelimit": 'plugin = "ratelimit"\nresponses_per_second = 1000000',
        "hosts": 'plugin = "hosts"\nentries = ["192.0.2.200 printer.lan"]',
        "blocklist": f'plugin = "blocklist"\nlists = ["{BLOCKLISTS / "basic.hosts"}"]',
        "cache": 'plugin = "cache"',
        "forward": f'plugin = "forward"\nupstreams = ["{upstream}"]',
    }
    body = "\n".join(f"[[chain]]\n{tables[s]}" for s in steps)
    return f'[server]\nlisten = ["127.0.0.1:{{port}}"]\nlog_level = "warning"\n{body}\n'


def start_proxy(d: Path, config: str, cpu: int | None = SERVER_CPU) -> Process:
    """dnsproxy on a config text; ``{port}`` is replaced by a free port.

    Ready when it answers a query (whatever the rcode), so any log level works.
    """
    port = free_port()
    path = d / "dnsproxy.toml"
    path.write_text(textwrap.dedent(config).replace("{port}", str(port)))
    log = (d / "dnsproxy.log").open("wb")
    cmd = [sys.executable, "-m", "dnsproxy", "run", "-c", str(path)]
    try:
        return launch("dnsproxy", cmd, port, cpu, 60, stdout=log, stderr=subprocess.STDOUT, cwd=d)
    except TimeoutError:
        raise RuntimeError("dnsproxy did not start:\n" + (d / "dnsproxy.log").read_text()) from None


@dataclass
class Perf:
    qps: float
    avg_ms: float
    lost: float  # fraction of queries lost

    def __str__(self) -> str:
        return f"{self.qps:,.0f} q/s, mean {self.avg_ms:.3f} ms, lost {self.lost:.2%}"


def dnsperf(
    port: int,
    queries: Sequence[str],
    seconds: float = 10,
    *,
    cpu: int | None = CLIENT_CPU,
    max_qps: int | None = None,
    clients: int = 1,
    outstanding: int = 200,
    mode: str = "udp",
    doh_path: str = "/dns-query",
    doh_method: str = "POST",
    source: str | None = None,
) -> Perf:
    """Run dnsperf against 127.0.0.1:port with ``queries`` ("name TYPE" lines), cycled.

    ``mode`` is dnsperf's transport: udp, tcp, dot or doh (dnsperf does not verify the
    server's certificate); for doh, ``doh_path`` and ``doh_method`` (GET or POST).
    ``cpu`` None: not pinned; ``source``: the address to send from (dnsperf -a).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("\n".join(queries) + "\n")
        qfile = f.name
    cmd = [
        which("dnsperf"),
        "-s", "127.0.0.1",
        "-p", str(port),
        "-d", qfile,
        "-l", str(seconds),
        "-c", str(clients),
        "-q", str(outstanding),
        "-t", "2",
    ]  # fmt: skip
    if max_qps:
        cmd += ["-Q", str(max_qps)]
    if source:
        cmd += ["-a", source]
    cmd += ["-m", mode]
    if mode == "doh":
        cmd += [
            "-O",
            f"doh-uri=https://127.0.0.1:{port}{doh_path}",
            "-O",
            f"doh-method={doh_method}",
        ]
    try:
        out = subprocess.run(pinned(cmd, cpu), capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(qfile)
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))
    avg = float(re.search(r"Average Latency \(s\):\s+([\d.]+)", out).group(1)) * 1000
    sent = int(re.search(r"Queries sent:\s+(\d+)", out).group(1))
    lost_m = re.search(r"Queries lost:\s+(\d+)", out)
    lost = int(lost_m.group(1)) / sent if lost_m and sent else 0.0
    return Perf(qps, avg, lost)


def cpu_per_query(
    server: Process, queries: Sequence[str], seconds: float
) -> tuple[Perf, float, float]:
    """One dnsperf run against ``server`` and the server's own user and kernel CPU time
    per query over it, in µs (from /proc: it moves less than queries/s on a shared
    machine)."""
    user0, sys0 = cpu_seconds(server.pid)
    perf = dnsperf(server.port, queries, seconds)
    user1, sys1 = cpu_seconds(server.pid)
    n = max(perf.qps * seconds, 1)
    return perf, (user1 - user0) / n * 1e6, (sys1 - sys0) / n * 1e6


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
