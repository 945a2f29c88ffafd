"""Helpers of the conformance suite: configs, raw message building, raw clients."""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections.abc import Callable

import dns.exception
import dns.message
import dns.query

from tests.conftest import Proxy, free_port, need

__all__ = ["Proxy", "free_port", "need"]

TIMEOUT = 3.0
DEFAULT_FORWARD = "timeout = 1.0\nbudget = 2.0"


def forward_config(upstream: str, *, server: str = "", before: str = "", forward: str = "") -> str:
    """A config listening on {port}: optional steps, then forward to ``upstream``.

    ``forward`` replaces the default forward options (timeout 1 s, budget 2 s).
    """
    return (
        "[server]\n"
        'listen = ["127.0.0.1:{port}"]\n'
        f"{server}\n"
        f"{before}\n"
        "[[chain]]\n"
        'plugin = "forward"\n'
        f'upstreams = ["{upstream}"]\n'
        f"{forward or DEFAULT_FORWARD}\n"
    )


def udp_raw(addr: tuple[str, int], data: bytes, timeout: float = TIMEOUT) -> bytes | None:
    """Send one datagram and return the reply, or None if nothing came back in time."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, addr)
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


def tcp_raw(addr: tuple[str, int], data: bytes, timeout: float = TIMEOUT) -> bytes | None:
    """Send bytes on a new TCP connection and return the first framed reply (None at EOF)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(data)
        return read_frame(s)


def read_frame(s: socket.socket) -> bytes | None:
    head = _recv_exact(s, 2)
    if head is None:
        return None
    return _recv_exact(s, struct.unpack("!H", head)[0])


def _recv_exact(s: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``s`` (EOF or reset; TLS too), or None if it stayed open."""
    start = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            if s.recv(65535) == b"":
                return time.monotonic() - start
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except (ConnectionResetError, ssl.SSLError):
            return time.monotonic() - start
    return None


def trickle(
    s: socket.socket,
    data: bytes,
    errors: tuple[type[OSError], ...] = (BrokenPipeError, ConnectionResetError),
) -> tuple[bool, float]:
    """Send ``data`` a byte every 0.2 s (slowloris) until the peer closes: (closed, seconds)."""
    start = time.monotonic()
    for byte in data:
        try:
            s.send(bytes([byte]))
        except errors:
            return True, time.monotonic() - start
        if closed_within(s, 0.2) is not None:
            return True, time.monotonic() - start
    return False, time.monotonic() - start


def frame(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


def ask(
    addr: tuple[str, int], name: str, rdtype: str = "A", *, tcp: bool = False, **kw: object
) -> dns.message.Message:
    """A well-formed query over UDP or TCP through dnspython, with an absolute timeout."""
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    if tcp:
        return dns.query.tcp(q, addr[0], port=addr[1], timeout=TIMEOUT)
    return dns.query.udp(q, addr[0], port=addr[1], timeout=TIMEOUT)


def alive(addr: tuple[str, int]) -> bool:
    """Whether the proxy still answers a normal query over UDP and TCP."""
    return (
        ask(addr, "alive.example.test").rcode() == 0
        and ask(addr, "alive.example.test", tcp=True).rcode() == 0
    )


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``cond`` until true; network errors while the proxy catches up count as false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except (OSError, dns.exception.DNSException):
            pass
        time.sleep(0.02)
    return cond()


def qname_wire(name: str) -> bytes:
    """A name in uncompressed wire form, case preserved."""
    out = b""
    for label in name.rstrip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\x00"


def opt_rr(
    *,
    payload: int = 1232,
    version: int = 0,
    do: bool = False,
    flags: int = 0,
    options: tuple[tuple[int, bytes], ...] = (),
    owner: bytes = b"\x00",
) -> bytes:
    """An OPT record: the EDNS knobs genreport and the malformed cases turn."""
    rdata = b"".join(struct.pack("!HH", c, len(d)) + d for c, d in options)
    ttl = (version << 16) | (0x8000 if do else 0) | flags
    return owner + struct.pack("!HHIH", 41, payload, ttl, len(rdata)) + rdata


def message(
    question: bytes | None = None,
    *,
    msg_id: int = 0x1234,
    flags: int = 0x0100,
    qd: int | None = None,
    an: int = 0,
    ns: int = 0,
    ar: int | None = None,
    opt: bytes = b"",
    body: bytes = b"",
) -> bytes:
    """A raw DNS message; counts default to what is actually present."""
    if question is None:
        question = qname_wire("www.example.test") + struct.pack("!HH", 1, 1)
    qd = (1 if question else 0) if qd is None else qd
    ar = (1 if opt else 0) if ar is None else ar
    return struct.pack("!HHHHHH", msg_id, flags, qd, an, ns, ar) + question + body + opt


def parse(data: bytes | None) -> dns.message.Message:
    assert data is not None, "no reply"
    return dns.message.from_wire(data)


def blast(
    addr: tuple[str, int],
    names: list[str],
    *,
    rdtype: int = 1,
    window: int = 200,
    timeout: float = 30.0,
    source: str = "127.0.0.1",
) -> dict[int, bytes]:
    """Send a query per name over one UDP socket, ``window`` outstanding at a time.

    Returns the replies by index (the query ID is the index, so at most 65536 names).
    Queries still unanswered when the window stalls for 2 s are given up on.
    """
    assert len(names) <= 65536
    replies: dict[int, bytes] = {}
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((source, 0))
        s.settimeout(2.0)
        sent = 0
        outstanding = 0
        while (sent < len(names) or outstanding) and time.monotonic() < deadline:
            while sent < len(names) and outstanding < window:
                data = message(qname_wire(names[sent]) + struct.pack("!HH", rdtype, 1), msg_id=sent)
                s.sendto(data, addr)
                sent += 1
                outstanding += 1
            try:
                data = s.recv(65535)
            except TimeoutError:
                outstanding = 0  # lost: move on
                continue
            msg_id = struct.unpack_from("!H", data)[0]
            if msg_id not in replies:
                replies[msg_id] = data
                outstanding -= 1
    return replies


def rss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")
