"""Plain DNS over UDP with no Trio task per query: one reader for every exchange in flight.

Each exchange gets a new socket, connected to the upstream, on a port the kernel picks at
random: RFC 5452 §9.2 asks for an unpredictable source port per query and different ports
for concurrent queries, and a connected socket makes the kernel drop datagrams from any
other source (SAD DNS). The ID is random too (`new_id`), and a datagram counts only if ID
and question match (`matches`); anything else is read and ignored, and the wait goes on.

What makes this cheap is how the reply is waited for. The sockets are registered in one
private epoll (kqueue elsewhere) set, and one Trio system task per run waits until *that*
set is readable, drains the ready sockets and hands each reply to its exchange's callback,
synchronously. A forwarded query so costs no task, no cancel scope and no Trio I/O
registration of its own: those are most of the CPU a cache miss would otherwise take.
The same task enforces the deadlines, kept in a heap of (deadline, fd) pairs: an entry holds
no reference to its exchange, so a finished one is freed at once, and a stale entry (its
exchange finished, the fd maybe reused by a later one) is told apart by the deadline and
dropped from the top before the reader waits, so it never wakes for a finished exchange.
Sockets are the C-level `_socket.socket`: `socket.socket` adds Python-level constructor
and close wrappers that buy nothing here.
The reader exits when nothing is in flight and is started again by the next exchange.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import selectors
import socket
from _socket import socket as raw_socket
from collections.abc import Callable
from heapq import heapify, heappop, heappush

import trio

from dnsproxy.errors import UpstreamError
from dnsproxy.upstream import Request, Upstream, matches, new_id
from dnsproxy.wire import hostport

log = logging.getLogger("dnsproxy.udpclient")

Done = Callable[[bytes | None, str], None]
"""An exchange's callback: the matching reply and "", or None and why it failed."""

_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # Linux: no separate fcntl per socket
_DGRAM = socket.SOCK_DGRAM | _NONBLOCK
BATCH = 256  # ready sockets handled per wake-up


class EpollSet:
    """The waiting set on Linux: a raw epoll, so a closed socket leaves it by itself."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self.fd = self._epoll.fileno()

    def add(self, fd: int) -> None:
        self._epoll.register(fd, select.EPOLLIN)

    def discard(self, fd: int) -> None:
        """Nothing to do: closing the socket removes it from the epoll set."""

    def ready(self) -> list[int]:
        return [fd for fd, _ in self._epoll.poll(0, BATCH)]


class SelectorSet:
    """The waiting set elsewhere (kqueue on BSD and macOS): `selectors`, which needs an
    explicit unregister per exchange."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self.fd = self._sel.fileno()  # type: ignore[attr-defined]

    def add(self, fd: int) -> None:
        self._sel.register(fd, selectors.EVENT_READ)

    def discard(self, fd: int) -> None:
        self._sel.unregister(fd)

    def ready(self) -> list[int]:
        return [key.fd for key, _ in self._sel.select(0)[:BATCH]]


# An exchange in flight: (socket, message ID, request, deadline, callback). A tuple: one
# is made per forwarded query, and a tuple costs a fraction of a Python object's __init__.
_Exchange = tuple[raw_socket, int, Request, float, Done]
_DEADLINE = 3  # an `_Exchange`'s deadline


class UdpExchanges:
    """Every UDP exchange in flight in one Trio run, and the task that completes them."""

    def __init__(self, waiting: EpollSet | SelectorSet | None = None) -> None:
        self._set = waiting or (EpollSet() if hasattr(select, "epoll") else SelectorSet())
        self._pending: dict[int, _Exchange] = {}  # by socket fd
        # (deadline, fd), a heap; entries of finished exchanges may linger below live ones
        self._deadlines: list[tuple[float, int]] = []
        self._running = False
        self._closed = False  # the run is ending: no new exchanges
        self._wait: trio.CancelScope | None = None  # the reader's wait, up to the next deadline
        self._wait_until = math.inf  # ``_wait``'s deadline (a float read, not a property's)

    def send(
        self,
        addr: tuple[str, int],
        family: socket.AddressFamily,
        req: Request,
        deadline: float,
        done: Done,
    ) -> None:
        """Send ``req`` to ``addr``; ``done`` is called exactly once, maybe before this returns
        (a send error), else from the reader task: with the reply, an error, or "timeout" at
        ``deadline`` (Trio clock)."""
        if self._closed:
            done(None, "shutting down")
            return
        msg_id = new_id()
        try:
            sock = raw_socket(family, _DGRAM)
        except OSError as exc:
            done(None, exc.strerror or str(exc))
            return
        fd = sock.fileno()
        try:
            if not _NONBLOCK:
                sock.setblocking(False)
            sock.connect(addr)
            sock.send(req.to_wire(msg_id))
            self._set.add(fd)
        except OSError as exc:
            sock.close()
            done(None, exc.strerror or str(exc))
            return
        self._pending[fd] = (sock, msg_id, req, deadline, done)
        heappush(self._deadlines, (deadline, fd))
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._read, name="dnsproxy udp exchanges")
        elif self._wait is not None and deadline < self._wait_until:
            self._wait.deadline = self._wait_until = deadline

    async def _read(self) -> None:
        pending = self._pending
        try:
            while pending:
                # One cancel scope until a deadline passes, its deadline kept at the heap's
                # top: a new scope per wake-up would cost more than the rest of the wake-up.
                with trio.CancelScope() as wait:
                    self._wait = wait
                    while pending:
                        top = self._live_top()
                        if self._wait_until != top:
                            wait.deadline = self._wait_until = top
                        await trio.lowlevel.wait_readable(self._set.fd)
                        for fd in self._set.ready():
                            ex = pending.get(fd)
                            if ex is not None:
                                self._receive(fd, ex)
                self._wait = None
                self._wait_until = math.inf
                self._expire(trio.current_time())
            self._deadlines.clear()  # nothing in flight: every entry left is stale
        except BaseException:
            # Only the end of the run cancels a system task: every caller still hears back.
            self._closed = True
            for fd, ex in list(self._pending.items()):
                self._finish(fd, ex, None, "shutting down")
            raise
        finally:
            self._running = False
            self._wait = None
            self._wait_until = math.inf

    def _live_top(self) -> float:
        """The earliest deadline of an exchange in flight (there is one), the entries of
        finished ones above it dropped: the reader waits for a live deadline, not a stale
        one (answers come mostly in deadline order, so these are few per wake-up)."""
        heap = self._deadlines
        pending = self._pending
        while True:
            deadline, fd = heap[0]
            live = pending.get(fd)
            if live is not None and live[_DEADLINE] == deadline:
                return deadline
            heappop(heap)

    def _receive(self, fd: int, ex: _Exchange) -> None:
        sock, msg_id, req, _, _ = ex
        recv = sock.recv
        while True:
            try:
                data = recv(65535)
            except BlockingIOError:
                return
            except OSError as exc:
                reason = "connection refused" if exc.errno == errno.ECONNREFUSED else exc.strerror
                self._finish(fd, ex, None, reason or str(exc))
                return
            if matches(data, msg_id, req):
                self._finish(fd, ex, data, "")
                return

    def _expire(self, now: float) -> None:
        heap = self._deadlines
        pending = self._pending
        while heap and heap[0][0] <= now:
            deadline, fd = heap[0]
            ex = pending.get(fd)
            if ex is not None and ex[_DEADLINE] == deadline:
                self._finish(fd, ex, None, "timeout")  # its entry is stale now: popped next
            else:  # the entry of a finished exchange (its fd maybe reused since)
                heappop(heap)
        if len(heap) > 2 * len(pending) + 1024:  # drop the finished ones in one go
            self._deadlines = [(ex[_DEADLINE], fd) for fd, ex in pending.items()]
            heapify(self._deadlines)

    def _finish(self, fd: int, ex: _Exchange, data: bytes | None, err: str) -> None:
        sock, _, _, _, done = ex
        del self._pending[fd]
        self._set.discard(fd)
        sock.close()
        try:
            done(data, err)
        except Exception as exc:  # a caller's bug must not end the reader (and the run)
            log.error("udp exchange callback failed: %r", exc, exc_info=exc)


_EXCHANGES: trio.lowlevel.RunVar[UdpExchanges] = trio.lowlevel.RunVar("dnsproxy_udp_exchanges")


def exchanges() -> UdpExchanges:
    """The UDP exchanges of the current Trio run (one reader for every upstream)."""
    try:
        return _EXCHANGES.get()
    except LookupError:
        found = UdpExchanges()
        _EXCHANGES.set(found)
        return found


class UdpUpstream:
    """Plain DNS over UDP; ``tcp`` is the same server over TCP, for truncated answers.

    Besides the `Upstream` protocol's ``exchange`` it offers ``send``, the taskless form
    that ``forward`` uses.
    """

    def __init__(self, host: str, port: int, tcp: Upstream) -> None:
        self.addr = (host, port)
        self.family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.name = hostport(host, port, "udp")
        self.tcp = tcp

    def send(self, req: Request, deadline: float, done: Done) -> None:
        """Start an exchange; ``done(reply, "")`` or ``done(None, error)`` follows once."""
        try:
            table = _EXCHANGES.get()
        except LookupError:
            table = exchanges()
        table.send(self.addr, self.family, req, deadline, done)

    async def exchange(self, req: Request) -> bytes:
        result: list[tuple[bytes | None, str]] = []
        arrived = trio.Event()

        def done(data: bytes | None, err: str) -> None:
            result.append((data, err))
            arrived.set()

        # The caller's cancel scope bounds the wait, and the exchange with it.
        self.send(req, min(trio.current_effective_deadline(), trio.current_time() + 60), done)
        await arrived.wait()
        data, err = result[0]
        if data is None:
            raise UpstreamError(err)
        return data

    def close(self) -> None:
        self.tcp.close()
