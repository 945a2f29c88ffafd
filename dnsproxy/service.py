"""Running as a system service: systemd notifications, socket activation, dropping root,
journal-friendly logging.

No dependency on libsystemd: the notify protocol is one datagram to ``$NOTIFY_SOCKET`` and
socket activation is a few environment variables (sd_notify(3), sd_listen_fds(3)).
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import logging
import os
import pwd
import socket
import time
from pathlib import Path

import trio

from dnsproxy.config import Address
from dnsproxy.errors import ConfigError

log = logging.getLogger("dnsproxy")

LISTEN_FDS_START = 3  # the first descriptor systemd passes (SD_LISTEN_FDS_START)
KINDS = {socket.SOCK_DGRAM: "udp", socket.SOCK_STREAM: "tcp"}


class Notifier:
    """The sd_notify side of ``Type=notify``: READY, RELOADING, STOPPING and the watchdog.

    Built from the environment; without ``$NOTIFY_SOCKET`` every call does nothing.
    """

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog = watchdog_usec / 1e6 / 2 if watchdog_usec > 0 else 0.0  # ping interval
        self.sock: socket.socket | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        """Read (and unset, so children do not inherit them) NOTIFY_SOCKET and WATCHDOG_*."""
        address = os.environ.pop("NOTIFY_SOCKET", None) or None
        usec = os.environ.pop("WATCHDOG_USEC", "")
        pid = os.environ.pop("WATCHDOG_PID", "")
        watchdog = int(usec) if usec.isdigit() and (not pid or pid == str(os.getpid())) else 0
        return cls(address, watchdog)

    def send(self, *fields: str) -> None:
        """Send ``fields`` ("READY=1", ...) as one message; errors are logged, not raised
        (the manager going away must not stop DNS)."""
        if self.address is None:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), exc)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={now}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    async def run_watchdog(self) -> None:
        """Ping the watchdog every WATCHDOG_USEC / 2 while the event loop runs."""
        if not self.watchdog or self.address is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _key(kind: str, host: str, port: int) -> tuple[str, str, int]:
    try:
        host = str(ipaddress.ip_address(host.split("%", 1)[0]))
    except ValueError:
        host = host.lower()
    return (kind, host, port)


class Sockets:
    """Listening sockets opened before the server starts: passed by systemd (socket
    activation) or bound as root before the privilege drop. `Server.run` and the services
    take theirs by address and bind the rest themselves."""

    def __init__(self) -> None:
        self.pool: dict[tuple[str, str, int], socket.socket] = {}

    def add(self, kind: str, sock: socket.socket, addr: Address | None = None) -> None:
        """Keep ``sock`` for the listener of ``addr`` (default: the address it is bound to)."""
        host, port = (addr.host, addr.port) if addr else sock.getsockname()[:2]
        self.pool[_key(kind, host, port)] = sock

    def take(self, kind: str, addr: Address) -> socket.socket | None:
        """The open ``kind`` ("udp", "tcp") socket for ``addr``, or None."""
        return self.pool.pop(_key(kind, addr.host, addr.port), None)

    def __contains__(self, item: tuple[str, Address]) -> bool:
        kind, addr = item
        return _key(kind, addr.host, addr.port) in self.pool

    def close_unused(self) -> None:
        """Close what no listener took (a socket unit listing an address the config does
        not), saying so."""
        for (kind, host, port), sock in self.pool.items():
            log.warning("closing the passed %s socket %s:%d: no listen address names it",
                        kind, host, port)  # fmt: skip
            sock.close()
        self.pool.clear()

    def close_all(self) -> None:
        for sock in self.pool.values():
            sock.close()
        self.pool.clear()

    @classmethod
    def from_environment(cls) -> Sockets:
        """Adopt the sockets of systemd socket activation (``LISTEN_FDS`` for this pid),
        and unset its variables so children do not inherit them."""
        found = cls()
        pid = os.environ.pop("LISTEN_PID", "")
        count = os.environ.pop("LISTEN_FDS", "")
        os.environ.pop("LISTEN_FDNAMES", None)
        if pid != str(os.getpid()) or not count.isdigit():
            return found
        for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
            sock = socket.socket(fileno=fd)
            kind = KINDS.get(sock.type)
            if kind is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
                log.warning("ignoring passed descriptor %d: not an IP UDP/TCP socket", fd)
                sock.detach()
                continue
            os.set_inheritable(fd, False)
            sock.setblocking(False)
            found.add(kind, sock)
        if found.pool:
            log.info("socket activation: %d socket(s) passed", len(found.pool))
        return found


def service_user(user: str, group: str, where: str) -> tuple[int, int]:
    """The uid and gid of ``user`` and ``group`` (default: the user's primary group)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"{where}: user: no such user {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"{where}: group: no such group {group!r}") from None
    return pw.pw_uid, gid


def drop_privileges(uid: int, gid: int, where: str) -> None:
    """Become ``uid``/``gid`` for good: setgroups, setgid, setuid.

    Raises ConfigError when not root (unless already that user), when a call fails, or
    when root could be regained afterwards: never serve as root when a ``user`` is set.
    """
    if os.geteuid() != 0:
        if os.geteuid() == uid and os.getegid() == gid:
            return  # started as that user already (systemd User=, capabilities)
        raise ConfigError(
            f"{where}: user: dropping privileges to uid {uid} needs root, and this process"
            f" runs as uid {os.geteuid()}; start it as root or as that user"
        )
    try:
        os.setgroups([gid])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise ConfigError(f"{where}: user: cannot drop privileges: {exc}") from exc
    if uid != 0 and _can_regain_root():
        raise ConfigError(f"{where}: user: root could be regained after the drop; refusing to run")
    log.info("dropped privileges: running as uid %d, gid %d", uid, gid)


def _can_regain_root() -> bool:
    try:
        os.setuid(0)
    except OSError:
        return os.getuid() == 0 or os.geteuid() == 0
    return True


def prepare_state_dir(path: Path, uid: int, gid: int, where: str) -> None:
    """Create ``state_dir`` owned by the service user (as root, before the drop)."""
    if path.exists() or os.geteuid() != 0:
        return
    try:
        path.mkdir(parents=True, mode=0o750)
        os.chown(path, uid, gid)
    except OSError as exc:
        raise ConfigError(f"{where}: state_dir: cannot create {path}: {exc.strerror}") from exc


def check_state_dir(path: Path, user: str, where: str) -> None:
    """After the drop: ``state_dir`` must be a directory the service user can write."""
    with contextlib.suppress(OSError):  # reported below
        path.mkdir(parents=True, exist_ok=True)
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{where}: state_dir: {path} is not a directory writable by user {user!r}"
            f" (uid {os.getuid()}): chown it to {user!r} or set state_dir to one that user owns"
        )


def journal_stderr() -> bool:
    """Whether stderr is connected to the systemd journal (``$JOURNAL_STREAM`` names its
    device and inode)."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


SYSLOG_PRIORITY = {"CRITICAL": 2, "ERROR": 3, "WARNING": 4, "INFO": 6, "DEBUG": 7}


class JournalFormatter(logging.Formatter):
    """``<N>logger: message key=value`` — journald adds the time and reads the priority
    (sd-daemon(3)); every line of a traceback carries the prefix too."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{SYSLOG_PRIORITY.get(record.levelname, 6)}>"
        return "\n".join(prefix + part for part in event_text(self, record).split("\n"))


def event_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """``logger: message key=value ...``, then the traceback if there is one: what every
    text log line says after its time and level (or journal priority)."""
    line = f"{record.name}: {record.getMessage()}"
    fields = getattr(record, "fields", None)
    if fields:
        line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
    if record.exc_info:
        line += "\n" + formatter.formatException(record.exc_info)
    return line
