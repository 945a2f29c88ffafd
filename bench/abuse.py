"""Abuse run: what a hostile LAN client or web page can do to dnsproxy, phase by phase.

    python bench/abuse.py [--fuzz 200000] [--sources 65536] [--reloads 50] [--json out.json]

Not part of the test suite (the tests in tests/conformance/test_abuse.py check each
defence on its own, small); this drives them all at full size against one real process,
with a fake upstream (``tests/fakeupstream.py``) behind it:

    fuzz-udp      random and mutated datagrams from one host
    fuzz-tcp      connections sending random frames
    spoof-flood   one query from each of ``--sources`` /24s of 127/8 (a spoof-like flood)
    tcp-slots     idle connections from one host, then from many, until the table is full
    inflight-hog  one client floods names the upstream never answers
    qtype-sweep   one client asks every qtype, then /metrics is scraped
    http-stats    500 concurrent /api/stats requests, and a rebinding request
    reload-storm  ``--reloads`` SIGHUPs under load

Two probes run throughout: a cached name over UDP every 50 ms and over TCP every 500 ms,
from /24s no phase uses (RRL, the query limit and in-flight shares go by prefix), and a
cache miss every 100 ms from a third. Each phase
reports the probes answered and lost, their worst latency and the proxy's RSS.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import multiprocessing
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import BLOCKLISTS, ROOT, free_port, rss_mb, table, wait_udp, workdir

SLOW = "slow.abuse.test"


def wire_query(name: str, qtype: int = 1, msg_id: int | None = None) -> bytes:
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    rid = random.getrandbits(16) if msg_id is None else msg_id
    return struct.pack("!HHHHHH", rid, 0x0100, 1, 0, 0, 0) + q + struct.pack("!HH", qtype, 1)


def udp_from(src: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((src, 0))
    return s


def ask_udp(sock: socket.socket, addr: tuple[str, int], data: bytes, timeout: float) -> bytes:
    sock.settimeout(timeout)
    sock.sendto(data, addr)
    while True:
        reply = sock.recv(65535)
        if reply[:2] == data[:2]:
            return reply


def ask_tcp(src: str, addr: tuple[str, int], data: bytes, timeout: float) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        s.connect(addr)
        s.sendall(struct.pack("!H", len(data)) + data)
        size = struct.unpack("!H", s.recv(2, socket.MSG_WAITALL))[0]
        return s.recv(size, socket.MSG_WAITALL)


class Probes:
    """Well-behaved clients, counted per phase (``phase`` indexes ``names``; shared memory,
    since the probes run in a process of their own: the attacking loops of this one would
    starve threads of the interpreter lock, and the probes would measure that)."""

    def __init__(self, addr: tuple[str, int], phase: Any, names: list[str]) -> None:
        self.addr = addr
        self.phase_index = phase
        self.names = names
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, float]] = {}
        self.stop = threading.Event()

    def add(self, kind: str, seconds: float | None, rcode: int = 0) -> None:
        with self.lock:
            row = self.rows.setdefault(self.names[self.phase_index.value], {})
            if seconds is None:
                row[f"{kind}_lost"] = row.get(f"{kind}_lost", 0) + 1
                return
            row[f"{kind}_ok"] = row.get(f"{kind}_ok", 0) + 1
            row[f"{kind}_max_ms"] = max(row.get(f"{kind}_max_ms", 0.0), seconds * 1000)
            if rcode:
                row[f"{kind}_servfail"] = row.get(f"{kind}_servfail", 0) + 1

    def run(self, kind: str, every: float) -> None:
        sock = udp_from("127.0.11.1" if kind == "miss" else "127.0.9.1")
        n = 0
        while not self.stop.wait(every):
            n += 1
            name = (
                f"m{n}-{random.getrandbits(32):x}.abuse.test"
                if kind == "miss"
                else "probe.abuse.test"
            )
            data = wire_query(name)
            start = time.monotonic()
            try:
                if kind == "tcp":
                    reply = ask_tcp("127.0.10.1", self.addr, data, 2.0)
                else:
                    reply = ask_udp(sock, self.addr, data, 2.0)
            except OSError:
                self.add(kind, None)
                continue
            self.add(kind, time.monotonic() - start, reply[3] & 0xF)
        sock.close()


def probe_process(addr: tuple[str, int], phase: Any, names: list[str], stop: Any, out: Any) -> None:
    probes = Probes(addr, phase, names)
    threads = [
        threading.Thread(target=probes.run, args=(kind, every))
        for kind, every in (("udp", 0.05), ("tcp", 0.5), ("miss", 0.1))
    ]
    for t in threads:
        t.start()
    stop.wait()
    probes.stop.set()
    for t in threads:
        t.join(5)
    out.put(probes.rows)


def fuzz_udp(addr: tuple[str, int], count: int) -> str:
    base = wire_query("www.example.org")
    sock = udp_from("127.0.0.2")
    sock.setblocking(False)
    replies = 0
    for i in range(count):
        if i % 3 == 0:
            data = os.urandom(random.randint(0, 600))
        else:
            data = bytearray(base)
            for _ in range(random.randint(1, 6)):
                data[random.randrange(len(data))] = random.getrandbits(8)
            data = bytes(data[: random.randint(2, len(data))]) if i % 3 == 2 else bytes(data)
        try:
            sock.sendto(data, addr)
        except BlockingIOError:
            time.sleep(0.001)
        while True:
            try:
                sock.recv(65535)
                replies += 1
            except BlockingIOError:
                break
        if i % 2000 == 0:
            time.sleep(0.002)  # let the socket buffers drain
    sock.close()
    return f"{count} datagrams, {replies} replies read"


def fuzz_tcp(addr: tuple[str, int], connections: int) -> str:
    closed = 0
    for _ in range(connections):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            s.bind(("127.0.0.2", 0))
            try:
                s.connect(addr)
                for _ in range(random.randint(1, 20)):
                    body = os.urandom(random.randint(0, 300))
                    claim = random.choice([len(body), random.getrandbits(16)])
                    s.sendall(struct.pack("!H", claim) + body)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65535):
                    pass
            except OSError:
                closed += 1
    return f"{connections} connections of random frames, {closed} closed or reset by the proxy"


def spoof_flood(addr: tuple[str, int], sources: int) -> str:
    sent = 0
    for n in range(sources):
        a, b = divmod(n, 256)
        if a == 0:
            continue  # 127.0.x.x: the probes' and other phases' hosts
        with udp_from(f"127.{a}.{b}.1") as s:
            s.sendto(wire_query(f"s{n}.abuse.test"), addr)
            sent += 1
    return f"{sent} queries from {sent} /24s"


def tcp_slots(addr: tuple[str, int]) -> str:
    held: list[socket.socket] = []
    accepted = 0
    try:
        for host in ["127.0.0.2"] + [f"127.0.1.{i}" for i in range(1, 40)]:
            for _ in range(80 if host == "127.0.0.2" else 30):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                try:
                    s.connect(addr)
                except OSError:
                    s.close()
                    continue
                held.append(s)
        time.sleep(2.0)  # probes run meanwhile
        for s in held:  # which of them the proxy still keeps open
            s.setblocking(False)
            try:
                accepted += s.recv(1) != b""
            except BlockingIOError:
                accepted += 1
            except OSError:
                pass
    finally:
        for s in held:
            s.close()
    return (
        f"{len(held)} idle connections opened (one host: 80, 39 hosts: 30 each),"
        f" {accepted} still open after 2 s"
    )


def inflight_hog(addr: tuple[str, int], seconds: float, qps: int) -> str:
    sock = udp_from("127.0.0.2")
    sock.setblocking(False)
    end = time.monotonic() + seconds
    sent = servfail = 0
    while time.monotonic() < end:
        for _ in range(qps // 100):
            sock.sendto(wire_query(f"{random.getrandbits(48):x}.{SLOW}"), addr)
            sent += 1
        while True:
            try:
                servfail += sock.recv(65535)[3] & 0xF == 2
            except BlockingIOError:
                break
        time.sleep(0.01)
    sock.close()
    return f"{sent} slow names from one client, {servfail} SERVFAIL to it (its share)"


def get(port: int, path: str, host: str = "127.0.0.1", method: str = "GET") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def qtype_sweep(addr: tuple[str, int], http_port: int) -> str:
    sock = udp_from("127.0.0.2")
    sock.setblocking(False)
    for qtype in range(65536):
        sock.sendto(wire_query("sweep.abuse.test", qtype), addr)
        if qtype % 500 == 0:
            time.sleep(0.01)
        while True:
            try:
                sock.recv(65535)
            except BlockingIOError:
                break
    sock.close()
    start = time.monotonic()
    status, body = get(http_port, "/metrics")
    took = time.monotonic() - start
    series = sum(1 for ln in body.splitlines() if ln.startswith(b"dnsproxy_requests_total"))
    return (
        f"65536 qtypes; /metrics {status}: {len(body) / 1024:.0f} KiB, "
        f"{series} dnsproxy_requests_total series, {took * 1000:.0f} ms"
    )


def http_stats(http_port: int) -> str:
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        codes = list(pool.map(lambda _: get(http_port, "/api/stats")[0], range(500)))
    took = time.monotonic() - start
    rebind = get(http_port, "/api/blocking/disable?duration=60", "rebind.evil.example", "POST")[0]
    ok = codes.count(200)
    return (
        f"500 /api/stats in {took:.1f} s ({ok} x 200, {codes.count(503)} x 503); "
        f"rebinding POST: {rebind}"
    )


def reload_storm(addr: tuple[str, int], pid: int, count: int) -> str:
    stop = threading.Event()

    def load() -> None:
        sock = udp_from("127.0.0.3")
        n = 0
        while not stop.is_set():
            n += 1
            with contextlib.suppress(OSError):
                ask_udp(sock, addr, wire_query(f"r{n % 50}.abuse.test"), 1.0)
        sock.close()

    loader = threading.Thread(target=load)
    loader.start()
    for _ in range(count):
        os.kill(pid, signal.SIGHUP)
        time.sleep(0.05)
    time.sleep(1.0)
    stop.set()
    loader.join()
    return f"{count} SIGHUPs at 20/s under load"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fuzz", type=int, default=200_000, help="fuzzed datagrams")
    ap.add_argument("--sources", type=int, default=65_536, help="/24s of the spoof-like flood")
    ap.add_argument("--reloads", type=int, default=50)
    ap.add_argument("--json", type=Path, help="write the per-phase rows here")
    args = ap.parse_args()

    with workdir() as d:
        up_port, port, http_port = free_port(), free_port(), free_port()
        script = d / "upstream.json"
        script.write_text(json.dumps([{"match": {"qname": f"*.{SLOW}."}, "drop": True}]))
        upstream = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "fakeupstream.py"), "--port", str(up_port),
             "--script", str(script)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        config = d / "config.toml"
        config.write_text(
            f'[server]\nlisten = ["127.0.0.1:{port}"]\nallow = ["127.0.0.0/8"]\n'
            f'log_level = "warning"\n[http]\nlisten = "127.0.0.1:{http_port}"\n'
            '[[chain]]\nplugin = "querylog"\nmax_size_mb = 5\n'
            '[[chain]]\nplugin = "ratelimit"\nresponses_per_second = 50\n'
            '[[chain]]\nplugin = "cache"\nmax_entries = 20000\n'
            f'[[chain]]\nplugin = "blocklist"\nlists = ["{BLOCKLISTS / "tracking.domains"}"]\n'
            f'[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:{up_port}"]\n'
            "timeout = 1.0\n"
        )
        log = (d / "dnsproxy.log").open("wb")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "dnsproxy", "run", "-c", str(config)],
            cwd=d, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            wait_udp(up_port)
            wait_udp(port, timeout=120)
            rows = attack(("127.0.0.1", port), http_port, proxy, args)
        finally:
            for p in (proxy, upstream):
                p.terminate()
                p.wait(10)
        errors = [ln for ln in (d / "dnsproxy.log").read_text().splitlines() if "Traceback" in ln]
    print(table(rows, ["phase", "what", "udp probes ok/lost (max ms)", "tcp probes ok/lost",
                       "miss probes ok/lost/servfail", "rss MB"]))  # fmt: skip
    print(f"proxy alive at the end: {rows[-1][1]}; tracebacks in its log: {len(errors)}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


def attack(
    addr: tuple[str, int], http_port: int, proxy: subprocess.Popen[bytes], args: argparse.Namespace
) -> list[list[object]]:
    phases = [
        ("fuzz-udp", lambda: fuzz_udp(addr, args.fuzz)),
        ("fuzz-tcp", lambda: fuzz_tcp(addr, 2000)),
        ("spoof-flood", lambda: spoof_flood(addr, args.sources)),
        ("tcp-slots", lambda: tcp_slots(addr)),
        ("inflight-hog", lambda: inflight_hog(addr, 4.0, 3000)),
        ("qtype-sweep", lambda: qtype_sweep(addr, http_port)),
        ("http-stats", lambda: http_stats(http_port)),
        ("reload-storm", lambda: reload_storm(addr, proxy.pid, args.reloads)),
    ]
    names = [name for name, _ in phases]
    phase, stop = multiprocessing.Value("i", 0), multiprocessing.Event()
    out: multiprocessing.Queue[dict[str, dict[str, float]]] = multiprocessing.Queue()
    prober = multiprocessing.Process(target=probe_process, args=(addr, phase, names, stop, out))
    prober.start()
    done: list[tuple[str, str, float]] = []
    try:
        for i, (name, run) in enumerate(phases):
            phase.value = i
            began = time.monotonic()
            what = f"{run()} ({time.monotonic() - began:.1f} s)"
            time.sleep(1.0)  # let the probes see the aftermath
            done.append((name, what, rss_mb(proxy.pid)))
            print(f"{name}: {what}", flush=True)
    finally:
        stop.set()
        seen = out.get(timeout=30)
        prober.join(10)
    rows: list[list[object]] = []
    for name, what, rss in done:
        r = seen.get(name, {})

        def n(key: str, r: dict[str, float] = r) -> str:
            return f"{r.get(key, 0):.0f}"

        rows.append([
            name,
            what,
            f"{n('udp_ok')}/{n('udp_lost')} ({n('udp_max_ms')})",
            f"{n('tcp_ok')}/{n('tcp_lost')}",
            f"{n('miss_ok')}/{n('miss_lost')}/{n('miss_servfail')}",
            f"{rss:.0f}",
        ])  # fmt: skip
    rows.append(["end", str(proxy.poll() is None), "", "", "", f"{rss_mb(proxy.pid):.0f}"])
    return rows


if __name__ == "__main__":
    sys.exit(main())
