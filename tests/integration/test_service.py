"""Running as a service: the wheel installed alone, port 53 as ``nobody`` after binding as
root, systemd's notify protocol and socket activation, the unit file, journal logging."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import pytest

from dnsproxy import service
from dnsproxy.errors import ConfigError
from tests.conftest import IN_CI, ROOT, Proxy, free_port, terminate

HOSTS = """
[[chain]]
plugin = "hosts"
entries = ["{ip} printer.lan"]
"""

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
""" + HOSTS.replace("{ip}", "192.0.2.50")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 and not IN_CI, reason="binds port 53 and drops privileges: needs root"
)


def ask(host: str, port: int, name: str = "printer.lan", tcp: bool = False) -> str:
    q = dns.message.make_query(name, "A")
    query = dns.query.tcp if tcp else dns.query.udp
    return query(q, host, port=port, timeout=5).answer[0][0].address


def until(what, timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, message()
        time.sleep(0.05)


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory ``nobody`` can read (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dnsproxy-service-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def free_loopback_53() -> str:
    """A 127.0.0.x address whose port 53 is free (UDP and TCP)."""
    for last in range(53, 80):
        host = f"127.0.0.{last}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind((host, 53))
        except OSError:
            continue
        return host
    pytest.fail("no 127.0.0.x address with port 53 free")


def spawn(argv: list[str], workdir: Path, **kw) -> tuple[subprocess.Popen[bytes], Path]:
    log = workdir / "proxy.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, **kw)
    return proc, log


def wait_log(proc: subprocess.Popen[bytes], log: Path, text: str, times: int = 1) -> None:
    def seen() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}:\n{log.read_text()}")
        return log.read_text().count(text) >= times

    until(seen, 30, lambda: log.read_text())


# --- the wheel, installed alone, serving port 53 as nobody ----------------------------------


def packages_in_checkout() -> set[str]:
    """Every package the wheel must carry: dnsproxy/ and plugins/ (as dnsproxy.plugins)."""
    out = set()
    for top, name in ((ROOT / "dnsproxy", "dnsproxy"), (ROOT / "plugins", "dnsproxy/plugins")):
        for init in top.rglob("__init__.py"):
            out.add(f"{name}/{init.parent.relative_to(top)}".removesuffix("/."))
    return out


@pytest.fixture(scope="module")
def wheel() -> Iterator[Path]:
    """``python -m build`` (sdist, then the wheel from the sdist) into a directory."""
    out = Path(tempfile.mkdtemp(prefix="dnsproxy-dist-"))
    out.chmod(0o755)
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    yield next(out.glob("dnsproxy-*.whl"))
    shutil.rmtree(out, ignore_errors=True)


def test_wheel_carries_every_package_and_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    dirs = {n.rpartition("/")[0] for n in names if n.endswith("/__init__.py")}
    assert packages_in_checkout() <= dirs, packages_in_checkout() - dirs
    for readme in (ROOT / "plugins").glob("*/README.md"):
        assert f"dnsproxy/plugins/{readme.parent.name}/README.md" in names
    http = ROOT / "plugins" / "http"
    for f in [*http.glob("templates/**/*"), *http.glob("static/**/*")]:
        if f.is_file():
            assert f"dnsproxy/plugins/http/{f.relative_to(http)}" in names
    assert "dnsproxy/plugins/dnssec/root-anchors.xml" in names
    sdist = next(wheel.parent.glob("dnsproxy-*.tar.gz"))
    assert sdist.stat().st_size > 0


WHO = """
import logging
import os

logging.getLogger("dnsproxy").warning("plugin file imported as uid %d", os.getuid())
"""


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_installed_wheel_serves_port_53_as_nobody_and_reloads(wheel, world_dir, workers):
    """The wheel in a fresh venv (dependencies from this one, no checkout on the path)
    binds 127.0.0.x:53 as root, then serves, imports its plugin file and reloads as nobody
    (with workers = 2: the supervisor binds both workers' sockets as root; all run as
    nobody and all reload)."""
    venv = world_dir / "venv"
    base = base_python_for_nobody()
    subprocess.run([base, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         "--no-index", str(wheel)],
        check=True,
        timeout=120,
    )  # fmt: skip
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies: this venv's site-packages as a plain path entry (its .pth files,
    # the editable checkout among them, are not run from there).
    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = subprocess.run(
        [py, "-c", "import dnsproxy.plugins.http as h; print(h.__file__)"],
        check=True, capture_output=True, text=True, cwd=world_dir,
        env={"PATH": os.environ["PATH"]},
    ).stdout.strip()  # fmt: skip
    assert where.startswith(site), where
    assert Path(where).with_name("templates").is_dir()

    if workers > 1 and not IN_CI and in_child_as_nobody(lambda _: os.access(py, os.X_OK)) != 1:
        pytest.skip(f"nobody cannot run {py} (an interpreter under a private directory)")
    host = free_loopback_53()
    etc = world_dir / "etc"
    etc.mkdir()
    (etc / "who.py").write_text(WHO)
    state = world_dir / "state"
    head = f"""
plugins = ["who.py"]
[server]
listen = ["{host}:53"]
user = "nobody"
state_dir = "{state}"
workers = {workers}
"""
    config = etc / "config.toml"
    config.write_text(head + HOSTS.replace("{ip}", "192.0.2.50"))
    env = {"PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    proc, log = spawn([str(venv / "bin" / "dnsproxy"), "run", "-c", str(config)], world_dir,
                      env=env)  # fmt: skip
    try:
        wait_log(proc, log, "listening on tcp" if workers == 1 else "workers: 2 serving")
        nobody = pwd.getpwnam("nobody")
        tasks = Path(f"/proc/{proc.pid}/task").iterdir()  # trio starts processes in a thread
        children = [c for task in tasks for c in (task / "children").read_text().split()]
        assert len(children) == (0 if workers == 1 else 2)
        for pid in (proc.pid, *map(int, children)):
            status = Path(f"/proc/{pid}/status").read_text()
            fields = dict(line.split(":", 1) for line in status.splitlines())
            assert fields["Uid"].split() == [str(nobody.pw_uid)] * 4, status
            assert fields["Gid"].split() == [str(nobody.pw_gid)] * 4, status
            assert fields["Groups"].split() == [str(nobody.pw_gid)], status
        assert f"plugin file imported as uid {nobody.pw_uid}" in log.read_text()
        assert state.stat().st_uid == nobody.pw_uid
        assert ask(host, 53) == "192.0.2.50"
        assert ask(host, 53, tcp=True) == "192.0.2.50"

        config.write_text(head + HOSTS.replace("{ip}", "192.0.2.51"))
        proc.send_signal(signal.SIGHUP)
        wait_log(proc, log, "reloaded ", 1 + (workers if workers > 1 else 0))
        assert ask(host, 53) == "192.0.2.51"
        assert terminate(proc, 10) == 0
    finally:
        terminate(proc, 5)
    assert "Traceback" not in log.read_text()


@needs_root
def test_state_dir_not_writable_by_the_user_stops_start_up(world_dir):
    state = world_dir / "state"
    state.mkdir(mode=0o755)  # root's, and nobody may not write there
    config = world_dir / "config.toml"
    port = free_port()
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nuser = "nobody"\nstate_dir = "{state}"\n'
        + HOSTS.replace("{ip}", "192.0.2.50")
    )
    run = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "run", "-c", str(config)],
        capture_output=True, text=True, timeout=30, cwd=world_dir,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert f"state_dir: {state} is not a directory writable by user 'nobody'" in run.stderr


def base_python_for_nobody() -> str:
    """An interpreter of this Python version that user nobody can run, as the base of the
    wheel's venv: this one, or Debian's when this one lives in a private directory (pyenv
    under /root), since with workers the supervisor starts its workers as nobody. The
    dependencies come from this venv, so the version (and with it the ABI) must match."""
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, "/usr/bin/python3"):

        def same_version(_nobody, python: str = candidate) -> bool:
            if not os.access(python, os.X_OK):
                return False
            code = "import sys; print(f'{sys.version_info.major}.{sys.version_info.minor}')"
            run = subprocess.run([python, "-c", code], capture_output=True, text=True)
            return run.stdout.strip() == mine

        if in_child_as_nobody(same_version) == 1:
            return candidate
    return sys.executable


def in_child_as_nobody(check) -> int:
    """Run ``check`` in a forked child that became nobody first; its exit status."""
    nobody = pwd.getpwnam("nobody")
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        code = 2
        try:
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            code = check(nobody)
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@needs_root
def test_drop_refuses_when_it_cannot_switch_user():
    """Not root and ``user`` names someone else: a ConfigError, never serving as is; already
    that user (systemd ``User=``): nothing to do."""

    def check(nobody) -> int:
        try:
            service.drop_privileges(0, 0, "config.toml: server")
        except ConfigError as exc:
            if "dropping privileges to uid 0 needs root" not in str(exc):
                return 3
        else:
            return 4
        service.drop_privileges(nobody.pw_uid, nobody.pw_gid, "config.toml: server")
        return 0 if os.getuid() == nobody.pw_uid else 5

    assert in_child_as_nobody(check) == 0


# --- systemd: notify, watchdog, socket activation, the unit, the journal --------------------


class Manager:
    """The systemd side of ``Type=notify``: a datagram socket in the abstract namespace."""

    def __init__(self) -> None:
        self.name = f"@dnsproxy-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.name[1:])
        self.sock.settimeout(15)

    def expect(self, field: str, *, skip_watchdog: bool = True) -> list[str]:
        """The next message carrying ``field`` (watchdog pings in between are skipped)."""
        while True:
            msg = self.sock.recv(4096).decode().split("\n")
            if field in msg:
                return msg
            assert skip_watchdog and msg == ["WATCHDOG=1"], f"{msg} before {field}"


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    yield m
    m.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sd_notify_ready_reload_stop_and_watchdog(make_proxy, manager, workers):
    """With workers = 2 the supervisor notifies, READY=1 once both workers serve."""
    config = CONFIG.replace("[server]\n", f"[server]\nworkers = {workers}\n")
    env = {"NOTIFY_SOCKET": manager.name, "WATCHDOG_USEC": "200000"}
    proxy = make_proxy(config, env=env)
    ready = manager.expect("READY=1")
    status = "STATUS=serving on 127.0.0.1:" if workers == 1 else "STATUS=2 workers serving on"
    assert any(f.startswith(status) for f in ready), ready
    for _ in range(3):  # every 100 ms: half of WATCHDOG_USEC
        manager.expect("WATCHDOG=1", skip_watchdog=False)
    assert ask(*proxy.addr) == "192.0.2.50"

    proxy.config_path.write_text(proxy.config_path.read_text().replace("192.0.2.50", "192.0.2.7"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proxy.signal(signal.SIGHUP)
    reloading = manager.expect("RELOADING=1")
    usec = [int(f.partition("=")[2]) for f in reloading if f.startswith("MONOTONIC_USEC=")]
    assert usec and before <= usec[0] <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    manager.expect("READY=1")
    assert ask(*proxy.addr) == "192.0.2.7"

    proxy.signal(signal.SIGTERM)
    manager.expect("STOPPING=1")
    assert proxy.proc.wait(10) == 0


def test_socket_activation_serves_on_the_passed_sockets(tmp_path):
    """Sockets bound by "systemd" (this test) and passed as fds 3 and 4 are served; the
    process binds nothing itself (the port is taken, without SO_REUSEADDR)."""
    port = free_port()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", port))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", port))
    tcp.listen(16)
    config = tmp_path / "config.toml"
    config.write_text(CONFIG.replace("{port}", str(port)))
    wrapper = (
        "import fcntl, os, sys\n"
        "fds = [fcntl.fcntl(int(a), fcntl.F_DUPFD, 100) for a in sys.argv[1:3]]\n"
        "for i, fd in enumerate(fds):\n"
        "    os.dup2(fd, 3 + i)\n"
        "    os.close(fd)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'dnsproxy', *sys.argv[3:]])\n"
    )
    argv = [sys.executable, "-c", wrapper, str(udp.fileno()), str(tcp.fileno()),
            "run", "-c", str(config)]  # fmt: skip
    env = {**os.environ, "LISTEN_FDS": "2", "LISTEN_FDNAMES": "dns-udp:dns-tcp"}
    proc, log = spawn(argv, tmp_path, env=env, pass_fds=(udp.fileno(), tcp.fileno()))
    udp.close()
    tcp.close()
    try:
        wait_log(proc, log, "listening on tcp")
        assert "socket activation: 2 socket(s) passed" in log.read_text()
        assert ask("127.0.0.1", port) == "192.0.2.50"
        assert ask("127.0.0.1", port, tcp=True) == "192.0.2.50"
        assert terminate(proc, 10) == 0
    finally:
        terminate(proc, 5)


def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        assert not IN_CI, "systemd-analyze is missing (Debian package systemd)"
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "contrib" / "systemd" / "dnsproxy.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    exe = tmp_path / "dnsproxy"  # verify wants ExecStart's binary to exist
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    (tmp_path / "dnsproxy.service").write_text(unit.replace("/usr/local/bin/dnsproxy", str(exe)))
    run = subprocess.run(
        [analyze, "verify", str(tmp_path / "dnsproxy.service")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0 and "dnsproxy.service" not in run.stderr, run.stderr


def test_journal_stderr_gets_priorities_and_no_timestamps(tmp_path):
    """With JOURNAL_STREAM naming stderr (the dev:ino of the file the proxy writes to, as
    journald's stream would), lines are ``<N>logger: message`` without timestamps."""
    config = CONFIG + '[[chain]]\nplugin = "forward"\nupstreams = ["udp://127.0.0.1:9"]\n'
    plain = Proxy(tmp_path, config).start()
    assert plain.log().startswith("20")  # no journal: the text format has timestamps
    plain.stop()
    plain.log_path.unlink()
    journal = Proxy(tmp_path, config)
    journal.log_path.touch()
    st = journal.log_path.stat()
    journal.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    try:
        lines = journal.log().splitlines()
        assert lines and all(ln[0] == "<" and ln[2] == ">" for ln in lines), lines
        assert any(ln.startswith("<6>dnsproxy: listening on udp 127.0.0.1:") for ln in lines)
    finally:
        journal.stop()


def test_container_files_are_consistent():
    """The Containerfile cannot be built here (no registry): its config must load, and it
    must keep its promises (non-root, the DNS ports, a /health check)."""
    from dnsproxy.loader import load

    cfg, _, _ = load(ROOT / "contrib" / "container" / "config.toml")
    assert [str(a) for a in cfg.server.listen] == ["0.0.0.0:53"]
    assert [s.table for s in cfg.services] == ["http"]
    port = cfg.services[0].options.listen.port
    text = (ROOT / "Containerfile").read_text()
    assert "FROM python:3.12-slim-bookworm" in text
    assert "\nUSER dnsproxy\n" in text and "EXPOSE 53/udp 53/tcp" in text
    assert f"http://127.0.0.1:{port}/health" in text
