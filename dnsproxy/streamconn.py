"""The client side of a stream connection (TCP, DoT): non-blocking socket I/O and the
answers waiting to be written.

The listeners read and write the socket directly, as the UDP loop does, instead of
through trio streams: a read that finds bytes and a write the socket takes cost no
scheduler round, so answers made at once (cache hits) leave in the same turn as the
queries that asked them, and a task only waits when the socket is empty or full. DoT
uses `ssl.SSLSocket` in non-blocking mode the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import ssl
import struct
import sys
import termios
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from dnsproxy.server import TcpConn

U16 = struct.Struct("!H")
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close sends a reset
U64 = struct.Struct("=Q")
BYTES_ACKED = 120  # the offset of tcpi_bytes_acked in struct tcp_info (Linux 4.1+)
TCP_INFO_SIZE = BYTES_ACKED + U64.size


class Plain:
    """A connected non-blocking TCP socket."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv(self, size: int) -> bytes | None:
        """Up to ``size`` bytes; None if none are there yet, b"" at EOF or on an error."""
        try:
            return self.sock.recv(size)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def send(self, data: bytes) -> int:
        """How many bytes of ``data`` the socket took (0: it is full); OSError if broken."""
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    async def writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    def unsent(self) -> int:
        """Bytes the kernel holds that the client has not acknowledged yet."""
        try:
            queued = fcntl.ioctl(self.sock, termios.TIOCOUTQ, bytes(4))
            return int.from_bytes(queued, sys.byteorder)
        except OSError:
            return 0

    def acked(self) -> int:
        """Bytes the client has acknowledged so far (TCP_INFO's tcpi_bytes_acked); -1 if
        the kernel does not say."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        except OSError:
            return -1
        return U64.unpack_from(info, BYTES_ACKED)[0] if len(info) == TCP_INFO_SIZE else -1

    def close(self, abort: bool = False) -> None:
        """Close; ``abort``: with a reset, dropping what is unsent."""
        _close(self.sock, abort)


class Tls(Plain):
    """A DoT connection after its handshake: an `ssl.SSLSocket` over a non-blocking one.

    OpenSSL may hold decrypted bytes the socket no longer shows as readable, so a reader
    waits only after `recv` said None. A write the socket cannot take whole is retried
    with the same bytes (OpenSSL's rule), which `Answers` does.
    """

    __slots__ = ()

    sock: ssl.SSLSocket

    def recv(self, size: int) -> bytes | None:
        """As `Plain.recv`, reading every TLS record there is (one per query, often)."""
        sock = self.sock
        try:
            data = sock.recv(size)
        except ssl.SSLWantReadError:
            return None
        except OSError:  # SSLError too; a renegotiation wanting a write included
            return b""
        if not data:
            return data
        parts = [data]
        left = size - len(data)
        while left > 0:
            try:
                more = sock.recv(left)
            except OSError:  # no more for now; an error shows again on the next call
                break
            if not more:
                break
            parts.append(more)
            left -= len(more)
        return b"".join(parts) if len(parts) > 1 else data

    def send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except ssl.SSLWantWriteError:
            return 0

    def close(self, abort: bool = False) -> None:
        """Close, with a close_notify first if the socket takes it now (never waiting on
        the peer); ``abort``: with a reset instead."""
        sock: socket.socket = self.sock
        if not abort:
            with contextlib.suppress(OSError, ValueError):
                sock = self.sock.unwrap()  # the plain socket, unless that failed
        _close(sock, abort)


def _close(sock: socket.socket, abort: bool) -> None:
    if abort:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    trio.lowlevel.notify_closing(sock)
    sock.close()


class Answers:
    """A connection's answers not yet written, and its queries outstanding.

    `send` is the `Sender` of every query read on the connection: it frames the answer
    into ``pending`` and writes what the socket takes at once, unless the reader is
    handling a batch of queries (``batching``: it flushes once after them, so answers
    ready together leave in one segment) or the socket is full (the writer task waits
    for it, for at most ``stall`` seconds). A query holds one of the connection's
    ``pipeline`` slots (`TcpConn.outstanding`) until its answer is written.
    """

    __slots__ = (
        "batching",
        "chunk",
        "chunk_answers",
        "closed",
        "conn",
        "drained",
        "io",
        "pending",
        "pipeline",
        "reading",
        "slot_free",
        "stalled",
        "unsent",
        "wake",
    )

    def __init__(self, io: Plain, conn: TcpConn, pipeline: int) -> None:
        self.io = io
        self.conn = conn
        self.pipeline = pipeline
        self.pending = bytearray()  # framed answers not yet handed to the socket
        self.unsent = 0  # answers in ``pending``
        self.chunk = b""  # bytes handed to the socket in part (TLS: retried as they are)
        self.chunk_answers = 0  # answers in ``chunk``
        self.batching = False
        self.stalled = False  # the socket is full: the writer has the pending bytes
        self.closed = False  # answers from now on go nowhere
        self.reading = True
        self.wake = trio.Event()  # the writer's: the socket was full
        self.drained = trio.Event()  # set when nothing is outstanding after reading ended
        self.slot_free: trio.Event | None = None  # the reader waits on a full pipeline

    def send(self, out: bytes | None) -> None:
        if out is None or self.closed:
            self.finished(1)  # a closed connection's answers go nowhere, quietly
            return
        pending = self.pending
        pending += U16.pack(len(out))
        pending += out
        self.unsent += 1
        if not self.batching and not self.stalled:
            self.flush()

    def flush(self) -> None:
        """Write what the socket takes now; if it is full, wake the writer for the rest."""
        io = self.io
        try:
            while True:
                chunk = self.chunk
                if not chunk:
                    if not self.pending:
                        return
                    chunk = self.chunk = bytes(self.pending)
                    self.chunk_answers = self.unsent
                    self.pending.clear()
                    self.unsent = 0
                sent = io.send(chunk)
                if not sent:
                    self.stalled = True
                    self.wake.set()
                    return
                if sent < len(chunk):  # plain TCP only: TLS writes all or nothing
                    self.chunk = chunk[sent:]
                    continue
                self.chunk = b""
                self.finished(self.chunk_answers)
        except OSError:
            self.broken()

    def finished(self, n: int) -> None:
        conn = self.conn
        conn.outstanding -= n
        free = self.slot_free
        if free is not None and conn.outstanding < self.pipeline:
            free.set()
        if not conn.outstanding and not self.reading:
            self.drained.set()

    def broken(self) -> None:
        """The client is gone or does not read: drop what is unwritten, stop reading."""
        if self.closed:
            return
        self.closed = True
        lost = self.unsent + (self.chunk_answers if self.chunk else 0)
        self.pending.clear()
        self.chunk = b""
        self.unsent = 0
        self.finished(lost)
        self.conn.scope.cancel()

    async def slot(self) -> None:
        """Wait until the connection has a free pipeline slot."""
        while self.conn.outstanding >= self.pipeline:
            self.slot_free = trio.Event()
            await self.slot_free.wait()
        self.slot_free = None

    async def writer(self, stall: float) -> None:
        """Write what the socket did not take at once, giving up after ``stall`` seconds
        of a socket that stays full (a client that does not read)."""
        while True:
            await self.wake.wait()
            self.wake = trio.Event()
            with trio.move_on_after(stall) as cs:
                while self.stalled:
                    await self.io.writable()
                    self.stalled = False
                    self.flush()
            if cs.cancelled_caught:
                self.broken()
                return
