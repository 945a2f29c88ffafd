"""A pipelined DNS client over one persistent byte stream (TCP, or TLS for DoT).

RFC 7766 §6.2 and RFC 7858 §3.4 ask clients to reuse connections and to pipeline: many
queries are written on one connection without waiting, and the server may answer them in
any order. `StreamClient` keeps at most one connection per upstream:

* Replies are matched by ID *and* question (RFC 7766 §7); an ID is never reused while a
  query with it is in flight on the connection, and anything that matches nothing is
  dropped.
* At most ``max_inflight`` queries are outstanding; further callers wait for a slot
  (bounded by forward's timeout).
* The connection is closed after ``idle_timeout`` seconds with nothing in flight, when the
  server closes it, and when a query times out without the server sending anything at all
  since it was written (a dead peer). A query lost because its connection went away is
  retried once on a new connection, so a restarted server costs at most the queries that
  were in flight when it died.
* A failed connect blocks new attempts for a backoff that doubles from ``backoff_min`` to
  ``backoff_max``; meanwhile exchanges fail at once, so forward fails over without waiting.

The connection's reader and writer run as a Trio system task, because an `Upstream` has no
nursery of its own; `close()` cancels it. Callers own the timeout, as for every upstream.
"""

from __future__ import annotations

import logging
import math
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from dnsproxy.errors import UpstreamError
from dnsproxy.upstream import Request, matches, new_id, read_frame
from dnsproxy.wire import hostport

log = logging.getLogger("dnsproxy.streamclient")

Connector = Callable[[], Awaitable[trio.abc.Stream]]


class _Pending:
    """A query waiting for its reply on a connection."""

    __slots__ = ("done", "reply", "req")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.reply: bytes | None = None
        self.done = trio.Event()


class _Connection:
    """One open stream with the queries in flight on it."""

    def __init__(self, stream: trio.abc.Stream, queue_size: int) -> None:
        self.stream = stream
        self.pending: dict[int, _Pending] = {}
        self.send, self.outbox = trio.open_memory_channel[bytes](queue_size)
        self.scope = trio.CancelScope()  # the whole connection; cancelled to close it
        self.idle = trio.CancelScope()  # the reader's; its deadline is the idle close
        self.alive = True
        self.frames = 0  # messages received, to tell a silent peer from a slow answer
        self.error = "connection closed"

    @property
    def usable(self) -> bool:
        """Alive and not being closed (its task may not have noticed the kill yet)."""
        return self.alive and not self.scope.cancel_called

    def kill(self, reason: str) -> None:
        if self.usable:
            self.error = reason
        self.scope.cancel()


def tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (libraries wrap it in their own exceptions), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe(exc: BaseException) -> str:
    """A one-line reason for a connect or TLS failure, naming certificate problems."""
    tls = tls_error(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {tls.verify_message or tls.reason}"
    if tls is not None:
        return f"TLS error: {tls.reason or tls}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc) or type(exc).__name__


class StreamClient:
    """An `Upstream` that pipelines queries over one reconnecting stream.

    ``connect`` opens the stream (and finishes any handshake); it may raise OSError,
    trio.BrokenResourceError or UpstreamError. ``connects`` counts connections opened.
    """

    def __init__(
        self,
        name: str,
        connect: Connector,
        *,
        pad_block: int = 0,
        max_inflight: int = 100,
        idle_timeout: float = 10.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
    ) -> None:
        self.name = name
        self._connect_fn = connect
        self.pad_block = pad_block
        self.max_inflight = max_inflight
        self.idle_timeout = idle_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._slots = trio.Semaphore(max_inflight)
        self._lock = trio.Lock()
        self._conn: _Connection | None = None
        self._backoff = 0.0
        self._retry_at = -math.inf
        self._last_error = ""
        self.connects = 0
        self.closed = False

    async def exchange(self, req: Request) -> bytes:
        async with self._slots:
            conn = await self._connection()
            reply = await self._ask(conn, req)
            if reply is None:  # the connection went away under us: once more, on a new one
                conn = await self._connection()
                reply = await self._ask(conn, req)
            if reply is None:
                raise UpstreamError(conn.error)
            return reply

    async def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.usable:
            return conn
        async with self._lock:
            conn = self._conn
            if conn is not None and conn.usable:
                return conn
            if self.closed:
                raise UpstreamError("closed")
            now = trio.current_time()
            if now < self._retry_at:
                raise UpstreamError(
                    f"{self._last_error} (next attempt in {self._retry_at - now:.1f}s)"
                )
            try:
                stream = await self._connect_fn()
            except (OSError, trio.BrokenResourceError, UpstreamError) as exc:
                self._last_error = describe(exc)
                self._backoff = min(max(self._backoff * 2, self.backoff_min), self.backoff_max)
                self._retry_at = trio.current_time() + self._backoff
                raise UpstreamError(self._last_error) from exc
            self._backoff = 0.0
            self._retry_at = -math.inf
            self.connects += 1
            conn = self._conn = _Connection(stream, self.max_inflight)
            conn.idle.deadline = trio.current_time() + self.idle_timeout
            trio.lowlevel.spawn_system_task(self._serve, conn, name=f"dnsproxy {self.name}")
            return conn

    async def _ask(self, conn: _Connection, req: Request) -> bytes | None:
        """Send ``req`` on ``conn``; None if the connection closed before the reply."""
        msg_id = new_id()
        while msg_id in conn.pending:
            msg_id = new_id()
        data = req.to_wire(msg_id, pad_block=self.pad_block)
        pending = conn.pending[msg_id] = _Pending(req)
        conn.idle.deadline = math.inf
        seen = conn.frames
        try:
            try:
                conn.send.send_nowait(struct.pack("!H", len(data)) + data)
            except trio.WouldBlock:
                conn.kill("write queue full (the server is not reading)")
                return None
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            await pending.done.wait()
        finally:
            del conn.pending[msg_id]
            if pending.reply is None and conn.usable and conn.frames == seen:
                conn.kill("no reply before the timeout")
            elif not conn.pending:
                conn.idle.deadline = trio.current_time() + self.idle_timeout
        return pending.reply

    async def _serve(self, conn: _Connection) -> None:
        """The connection's system task: write queued queries, dispatch replies."""
        with conn.scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._guard, conn, self._write_loop)
                    await self._guard(conn, self._read_loop)
            finally:
                conn.alive = False
                if self._conn is conn:
                    self._conn = None
                conn.send.close()
                for pending in conn.pending.values():
                    pending.done.set()
                await trio.aclose_forcefully(conn.stream)

    async def _guard(
        self, conn: _Connection, loop: Callable[[_Connection], Awaitable[None]]
    ) -> None:
        try:
            await loop(conn)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, UpstreamError) as exc:
            conn.kill(describe(exc))
        except Exception as exc:  # a system task must not raise: it would end the process
            log.exception("%s: connection task failed", self.name)
            conn.kill(f"internal error: {exc!r}")
        conn.scope.cancel()  # either loop ending ends the connection

    async def _write_loop(self, conn: _Connection) -> None:
        async for frame in conn.outbox:
            batch = [frame]
            while True:  # everything queued meanwhile goes out in one write
                try:
                    batch.append(conn.outbox.receive_nowait())
                except trio.WouldBlock:
                    break
            await conn.stream.send_all(b"".join(batch))

    async def _read_loop(self, conn: _Connection) -> None:
        buf = bytearray()
        with conn.idle:
            while True:
                frame = await read_frame(conn.stream, buf)
                if frame is None:
                    conn.kill("closed by the server")
                    return
                conn.frames += 1
                if len(frame) < 12:
                    continue
                msg_id = (frame[0] << 8) | frame[1]
                pending = conn.pending.get(msg_id)
                if (
                    pending is not None
                    and not pending.reply
                    and matches(frame, msg_id, pending.req)
                ):
                    pending.reply = frame
                    pending.done.set()
        conn.kill("idle")

    def drop(self) -> None:
        """Close the connection (its queries are retried on a new one): the upstream's
        addresses changed, and the next connection goes to the new ones."""
        if self._conn is not None:
            self._conn.kill("addresses changed")
        self._retry_at = -math.inf

    def close(self) -> None:
        self.closed = True
        if self._conn is not None:
            self._conn.kill("closed")


def tcp_connector(host: str, port: int) -> Connector:
    """Open plain TCP to ``host``:``port`` (an IP address)."""

    async def connect() -> trio.abc.Stream:
        return await trio.open_tcp_stream(host, port)

    return connect


class PipelinedTcpUpstream(StreamClient):
    """Plain DNS over one reused, pipelined TCP connection (RFC 7766 §6.2.1)."""

    def __init__(self, host: str, port: int = 53, **kw: Any) -> None:
        super().__init__(hostport(host, port, "tcp"), tcp_connector(host, port), **kw)
