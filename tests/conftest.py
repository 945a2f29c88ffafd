"""Shared fixtures: real peers (nsd) and the real proxy process, on loopback only."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
BLOCKLISTS = SHARED / "blocklists"
IN_CI = os.environ.get("CI") == "true"


def need(binary: str) -> str:
    """Path of a Debian binary the test needs: skip locally, fail under CI=true."""
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")
    if path is None:
        if IN_CI:
            pytest.fail(f"{binary} is required under CI=true (is it in .ci/run's apt list?)")
        pytest.skip(f"{binary} not installed")
    return path


def _ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


PORTS = range(10_000, max(_ephemeral_low(), 11_000))  # below the kernel's ephemeral range
_ports = random.Random()  # its own generator: tests that seed `random` get distinct ports


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ``host``, for a process that binds it later.

    Drawn from below the ephemeral range: a port the kernel handed out (``bind(0)``) could
    be handed out again, to any client socket (a proxy's fresh port per upstream query, a
    test's query), before the process that was meant to bind it has started.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(200):
        port = _ports.choice(PORTS)
        with (
            socket.socket(family, socket.SOCK_DGRAM) as u,
            socket.socket(family, socket.SOCK_STREAM) as t,
        ):
            try:
                u.bind((host, port))
                t.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def terminate(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """SIGTERM, then SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port}")


def until(what: Callable[[], object], timeout: float = 10.0, message: str = "") -> None:
    """Poll ``what`` every 50 ms until it is true; fail with ``message`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message
        time.sleep(0.05)


def csrf(html: str) -> str:
    """The CSRF token a dashboard page's forms carry."""
    return html.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def read_http_head(stream: trio.SocketStream) -> bytes | None:
    """What a fake HTTP server reads of a request: up to its blank line, or None if the
    client closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


class Nsd:
    """An nsd instance on 127.0.0.1 serving the zones it was given."""

    def __init__(self, workdir: Path, zones: dict[str, str], host: str = "127.0.0.1") -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = free_port(host)
        self.zones = zones
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def write(self) -> None:
        conf = [
            "server:",
            f"  ip-address: {self.host}@{self.port}",
            '  username: ""',
            '  chroot: ""',
            f'  zonesdir: "{self.dir}"',
            f'  pidfile: "{self.dir}/nsd.pid"',
            '  database: ""',
            f'  xfrdfile: "{self.dir}/xfrd.state"',
            f'  zonelistfile: "{self.dir}/zone.list"',
            f'  logfile: "{self.dir}/nsd.log"',
            "  server-count: 1",
            "  verbosity: 1",
            "  rrl-ratelimit: 0",  # nsd rate-limits by default; our load tests would trip it
            "remote-control:",
            "  control-enable: no",
        ]
        for name, body in self.zones.items():
            (self.dir / f"{name}.zone").write_text(textwrap.dedent(body))
            conf += ["zone:", f"  name: {name}", f"  zonefile: {name}.zone"]
        (self.dir / "nsd.conf").write_text("\n".join(conf) + "\n")

    def start(self) -> Nsd:
        self.write()
        self.proc = subprocess.Popen(
            [need("nsd"), "-d", "-c", str(self.dir / "nsd.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(self.host, self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def reload_zones(self, zones: dict[str, str]) -> None:
        """Restart with new zone contents (nsd re-reads on start)."""
        self.stop()
        self.zones = zones
        self.start()


ZONE = """\
$ORIGIN example.test.
$TTL 300
@      IN SOA ns.example.test. admin.example.test. 1 3600 600 86400 60
@      IN NS  ns
ns     IN A   127.0.0.1
www    IN A   192.0.2.10
www    IN AAAA 2001:db8::10
mail   IN A   192.0.2.25
@      IN MX  10 mail
txt    IN TXT "hello world"
alias  IN CNAME www
odd    IN TYPE65400 \\# 4 01020304
"""


def big_txt_zone() -> str:
    """TXT RRsets of about 1.5 kB (over 1232 bytes) and 750 bytes (over 512 only)."""
    lines = [f'big IN TXT "{i:02d}-' + "x" * 90 + '"' for i in range(16)]
    lines += [f'mid IN TXT "{i:02d}-' + "y" * 90 + '"' for i in range(7)]  # ~750 bytes
    return ZONE + "\n".join(lines) + "\n"


@pytest.fixture
def nsd(tmp_path: Path) -> Iterator[Nsd]:
    server = Nsd(tmp_path / "nsd", {"example.test": big_txt_zone()}).start()
    yield server
    server.stop()


@pytest.fixture
def make_nsd(tmp_path: Path) -> Iterator[Callable[..., Nsd]]:
    started: list[Nsd] = []

    def make(zones: dict[str, str], name: str = "nsd") -> Nsd:
        server = Nsd(tmp_path / name, zones).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


class Proxy:
    """The real ``python -m dnsproxy run`` process on a config the test writes."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.dir = workdir
        self.port = free_port()
        self.config_path = workdir / "config.toml"
        self.config_path.write_text(config.replace("{port}", str(self.port)))
        self.log_path = workdir / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, wait_for: str = "listening on tcp", env: dict[str, str] | None = None) -> Proxy:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dnsproxy", "run", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 20
        while wait_for not in self.log():
            if self.proc.poll() is not None:
                raise RuntimeError(f"proxy exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"proxy did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def ask(
        self,
        name: str = "www.example.test",
        rdtype: str = "A",
        *,
        tcp: bool = False,
        v6: bool = False,
        source: str | None = None,
        **kw: Any,
    ) -> dns.message.Message:
        """One query to this proxy with dnspython (EDNS on unless ``use_edns=False``)."""
        kw.setdefault("use_edns", 0)
        q = dns.message.make_query(name, rdtype, **kw)
        host = "::1" if v6 else "127.0.0.1"
        if tcp:
            return dns.query.tcp(q, host, port=self.port, timeout=5, source=source)
        return dns.query.udp(q, host, port=self.port, timeout=5, source=source)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, count: int = 1, timeout: float = 10.0) -> None:
        """Until ``text`` is in the log ``count`` times (a signal's effect is logged)."""
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            assert time.monotonic() < deadline, self.log()  # the log as it is at the failure
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self) -> int:
        if self.proc is None:
            return 0
        code = terminate(self.proc, 10)
        self.proc = None
        self._log.close()
        return code


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[Callable[[str], Proxy]]:
    """Start the proxy on a config; ``{port}`` in the text becomes its free port."""
    started: list[Proxy] = []

    def make(
        config: str, wait_for: str = "listening on tcp", env: dict[str, str] | None = None
    ) -> Proxy:
        workdir = tmp_path / f"proxy{len(started)}"
        workdir.mkdir()
        proxy = Proxy(workdir, config).start(wait_for, env)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
