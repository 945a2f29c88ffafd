"""The server: UDP and TCP listeners, the query path, reloads and shutdown.

UDP listeners wait until the socket is readable and then drain it with non-blocking
calls, handling each datagram synchronously; only a query that reaches a step doing I/O
becomes a Trio task (DESIGN.md §3). TCP follows RFC 7766: length-prefixed frames, many
and pipelined queries per connection answered as they complete, an idle timeout reset
only by a complete message, and bounded connections, pipelines and write stalls.

No one client can take a shared resource from the others: each client prefix gets at
most `max_inflight_per_client` of the `max_inflight` slots (/24, /56) and
`max_tcp_per_client` of the TCP connections (/32, /64); idle timeouts shrink as the
connection table fills (RFC 7766 §6.2.3), and a full table closes its longest-idle
connection (no query outstanding) to admit a new one.

DNS over TLS (``tls://`` listeners, RFC 7858) runs the same connection handler over a
non-blocking `ssl.SSLSocket` (`streamconn`), under the same bounds; DNS over HTTPS
(``https://``) is `dnsproxy.doh`. Both share the query path, the chain and its caches
(the packet cache included) with the plain listeners.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import ipaddress
import logging
import math
import signal
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from dnsproxy import ddr, options, streamconn, tls, wire
from dnsproxy.blocking import Blocking
from dnsproxy.chain import (
    Chain,
    Metric,
    Setup,
    Step,
    Suspended,
    client_address,
    client_matcher,
)
from dnsproxy.clients import Clients
from dnsproxy.config import Address, Config, ServerConfig, ServiceConfig, StepConfig, worker_count
from dnsproxy.errors import ConfigError, Drop, Reject, StepFailed, StepTimeout
from dnsproxy.hookspecs import Observer
from dnsproxy.loader import Loaded, build_chain, load
from dnsproxy.packetcache import packet_cache
from dnsproxy.registry import build_registry, make_plugin_manager
from dnsproxy.reply import (
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_PROHIBITED,
    Reply,
    error_wire,
    finalize,
    respond,
)
from dnsproxy.service import Notifier, Sockets
from dnsproxy.shared import Shared
from dnsproxy.wire import Query, parse_query

log = logging.getLogger("dnsproxy")

UDP_BATCH = 64  # datagrams handled per wake-up before other tasks get a turn
UDP_RCVBUF = 4 << 20
SHUTDOWN_GRACE = 5.0
CLOSE_GRACE = 1.0  # seconds a closing TLS connection may take to send its close_notify
GC_REFREEZE = 600.0  # seconds between full collections when start-up objects are frozen
INFLIGHT_PREFIX = (24, 56)  # a client, for its share of max_inflight (IPv4, IPv6)
TCP_CLIENT_PREFIX = (32, 64)  # a client, for max_tcp_per_client
INFLIGHT_SHARE = 4  # max_inflight_per_client defaults to max_inflight / 4 ...
INFLIGHT_SHARE_MIN = 8  # ... but at least this many (or max_inflight if smaller)
LIMIT_LOG_INTERVAL = 60.0  # seconds between log lines about one kind of limit hit
ACCEPT_BATCH = 64  # connections accepted per wake-up
ACCEPT_PAUSE = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS))
ACCEPT_SKIP = frozenset((errno.ECONNABORTED, errno.EPROTO, errno.EPERM))  # one connection's
READ_SIZE = 65536  # bytes asked of a stream socket per read
STREAM_BATCH = 64  # queries one connection handles before other tasks get a turn

Sender = Callable[[bytes | None], Any]


@attrs.define(eq=False)
class Stats:
    """Counters the core keeps; plugins keep their own."""

    queries: int = 0
    dropped: int = 0
    formerr: int = 0
    refused_acl: int = 0
    servfail_overload: int = 0
    step_errors: int = 0
    step_timeouts: int = 0  # a step's I/O phase outlived its deadline: SERVFAIL
    internal_errors: int = 0
    tcp_connections: int = 0
    tcp_rejected: int = 0
    tcp_evicted: int = 0  # idle connections closed to admit a new one (table full)
    tls_handshake_failures: int = 0  # DoT handshakes that failed or timed out
    packet_hits: int = 0  # queries answered by the packet cache (packetcache.py)


class TcpConn:
    """A client TCP connection as the accept loop sees it: whose, and whether it is busy."""

    __slots__ = ("client", "handshake", "outstanding", "peer", "scope")

    def __init__(self, peer: tuple[str, int], client: str) -> None:
        self.peer = peer
        self.client = client  # its /32 or /64: the key of max_tcp_per_client
        self.scope = trio.CancelScope()  # cancelled to close it (shutdown, eviction)
        self.handshake = trio.CancelScope()  # a DoT handshake in progress (same reasons)
        self.outstanding = 0  # queries read and not answered yet; 0 = idle

    def close(self) -> None:
        self.scope.cancel()
        self.handshake.cancel()


def prefix_of(v4: int, v6: int) -> Callable[[str], str]:
    """A cached map from a client address to its network (/v4 or /v6) as text."""

    @functools.lru_cache(maxsize=4096)
    def prefix(host: str) -> str:
        addr = client_address(host)
        if addr is None:
            return host
        return str(ipaddress.ip_network((addr, v4 if addr.version == 4 else v6), strict=False))

    return prefix


def bind_socket(
    addr: Address, kind: socket.SocketKind, *, reuseport: bool = False
) -> socket.socket:
    """A non-blocking socket bound to a listen address (``reuseport``: one of a group
    sharing it, `workers.bind_group`)."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_DGRAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
        sock.bind((addr.host, addr.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def listen_socket(addr: Address, backlog: int = 512, *, reuseport: bool = False) -> socket.socket:
    """A listening TCP socket (`bind_socket`)."""
    tcp = bind_socket(addr, socket.SOCK_STREAM, reuseport=reuseport)
    try:
        tcp.listen(backlog)
    except OSError:
        tcp.close()
        raise
    return tcp


def prebind(path: Path, doc: dict[str, Any], sc: ServerConfig, sockets: Sockets) -> None:
    """Bind every listener not passed by systemd into ``sockets``: the DNS listeners and
    the ``listen`` address of each service table (``[http]``), for `dnsproxy run` to do
    as root before it drops privileges (so ports below 1024 work).

    Only built-in and installed (entry-point) plugins are imported to read the service
    tables; the plugin files a config names are imported after the drop. A table that
    does not validate is skipped here: loading the config reports it.
    """
    name = path.name
    todo: list[tuple[str, Address, int]] = []
    for addr in sc.listen if worker_count(sc.workers) == 1 else ():  # else: workers.bind_groups
        if not addr.encrypted:  # DoT and DoH listen on TCP only
            todo.append(("udp", addr, 0))
        todo.append(("tcp", addr, 512))
    registry = build_registry(make_plugin_manager())
    for table, cls in registry.services.items():
        raw = doc.get(table)
        if not isinstance(raw, dict):
            continue
        try:
            listen = getattr(options.build(cls.Options, raw, f"{name}: {table}"), "listen", None)
        except ConfigError:
            continue
        if isinstance(listen, Address):
            todo.append(("tcp", listen, 128))
    for kind, addr, backlog in todo:
        if (kind, addr) in sockets:
            continue
        try:
            sock = (
                bind_socket(addr, socket.SOCK_DGRAM)
                if kind == "udp"
                else listen_socket(addr, backlog)
            )
        except OSError as exc:
            sockets.close_all()
            raise ConfigError(f"{name}: cannot bind {kind} {addr}: {exc.strerror}") from exc
        sockets.add(kind, sock, addr)


class Server:
    """One dnsproxy process: listeners plus the current chain."""

    worker_index: int | None = None  # `Setup.worker` of its steps (`workers.Worker`)

    def __init__(
        self,
        path: Path,
        *,
        handle_signals: bool = True,
        freeze_gc: bool = False,
        loaded: Loaded | None = None,
        sockets: Sockets | None = None,
        notifier: Notifier | None = None,
        secret: bytes | None = None,
    ) -> None:
        """``sockets``: listeners opened before (socket activation, or bound as root
        before the privilege drop: `prebind`); ``run`` binds the others itself.
        ``notifier``: where to report READY/RELOADING/STOPPING (systemd ``Type=notify``).
        ``secret``: the server's secret (`Shared.secret`; random if not given), which a
        worker process is given by its supervisor: one secret for the whole instance.

        ``freeze_gc``: exempt long-lived objects from the garbage collector
        (`gc.freeze`), for a process that is nothing but this server (``dnsproxy run``).

        Why: under load, queries in flight reach the oldest generation, so full
        collections come often and each walks every module, plugin and config object,
        stalling the event loop (figures: bench/RESULTS.md, session 3). Frozen objects
        are still freed by reference counting; a frozen *cycle* is freed by the next
        `refreeze_gc`: after each reload (the old chain holds cycles) and every
        `GC_REFREEZE` seconds.
        """
        self.path = Path(path)
        self.handle_signals = handle_signals
        self.freeze_gc = freeze_gc
        self.sockets = sockets or Sockets()
        self.notifier = notifier or Notifier(None)
        self.config, self.registry, self.pm = loaded or load(self.path)
        self.blocking = Blocking()  # user intent, not config: survives reloads
        self.shared = Shared(secret)  # long-lived objects (parsed lists), secret: survive reloads
        self.clients = Clients(self.config.clients)  # names and groups; PTR cache survives reloads
        self.services: list[Any] = []  # the services of [http]-like tables, built by run()
        self.chain = build_chain(
            self.config, self.registry, self.blocking, self.shared, self.clients, self.worker_index
        )
        self.bound: tuple[Address, ...] = ()  # the listen addresses run() bound
        self.stats = Stats()
        self.addresses: list[tuple[str, str, int]] = []  # (transport, host, port) as bound
        self._apply_server_config()
        self._inflight = 0
        self._client_inflight: dict[str, int] = {}  # by INFLIGHT_PREFIX, only while > 0
        self._inflight_client = prefix_of(*INFLIGHT_PREFIX)
        self._tcp_scopes: set[trio.CancelScope] = set()
        self._tcp_conns: OrderedDict[TcpConn, None] = OrderedDict()  # least recently active first
        self._tcp_clients: dict[str, int] = {}  # open connections by TCP_CLIENT_PREFIX
        self._tcp_client = prefix_of(*TCP_CLIENT_PREFIX)
        self.certs: tls.Certs | None = None  # the encrypted listeners' certificate, if any
        self._ddr: ddr.Answer | None = None  # _dns.resolver.arpa SVCB, once listeners are bound
        self._encrypted_bound: list[tuple[str, str, int, str]] = []  # (scheme, host, port, path)
        self._limit_log: dict[str, tuple[float, int]] = {}  # kind: (next log time, count)
        self._begun = _Deadlines()  # queries in a step's `begin`, timed out by `_expire`
        self._observers: tuple[Observer, ...] = ()
        self._stop = trio.Event()
        self._failed_once: set[tuple[str, str]] = set()
        self._nursery: trio.Nursery | None = None
        self._work: trio.Nursery | None = None
        self._chain_scopes: dict[int, tuple[trio.CancelScope, trio.Event]] = {}
        self.packets = packet_cache(self)  # replies replayed before the chain (packetcache.py)

    @property
    def inflight(self) -> int:
        """Queries waiting on a step's I/O now (each holds one of ``max_inflight``)."""
        return self._inflight

    def _apply_server_config(self) -> None:
        sc = self.config.server
        self.edns_udp_size = sc.edns_udp_size
        self.max_inflight = sc.max_inflight
        share = sc.max_inflight_per_client
        if share is None:
            share = max(sc.max_inflight // INFLIGHT_SHARE, INFLIGHT_SHARE_MIN)
        self.max_inflight_per_client = min(share, sc.max_inflight)
        self.allowed = client_matcher(sc.allow)
        self.trusted_proxy = client_matcher(sc.trusted_proxies)

    # --- the query path -----------------------------------------------------------------

    def handle(
        self,
        data: bytes,
        client: tuple[str, int],
        transport: str,
        send: Sender,
        client_id: str | None = None,
    ) -> None:
        """Handle one query message.

        ``send`` is called exactly once per message, synchronously or later from a task:
        with the response bytes, or with None when nothing is to be sent. ``client_id``
        is the DoT/DoH client identifier (`Query.client_id`).
        """
        packets = self.packets if client_id is None else None  # views know no client ids
        if packets is None or not packets.answer(data, client, transport, send):
            self.handle_chain(data, client, transport, send, client_id)

    def handle_chain(
        self,
        data: bytes,
        client: tuple[str, int],
        transport: str,
        send: Sender,
        client_id: str | None = None,
    ) -> None:
        """`handle` past the packet cache: parse ``data`` and run it through the chain."""
        try:
            q = parse_query(data, client, transport)
        except Drop:
            self.stats.dropped += 1
            send(None)
            return
        except Reject as rej:
            self.stats.formerr += 1
            send(error_wire(rej, self.edns_udp_size))
            return
        self.stats.queries += 1
        if client_id is not None:  # DoT/DoH only: Query starts with None
            q.client_id = client_id
        if self._observers:
            q.received = time.monotonic()
        if not self.allowed(client[0]):
            self.stats.refused_acl += 1
            self._send(q, self._acl_refusal(q), send)
            return
        if self._ddr is not None and q.key == ddr.KEY:
            self._send(q, self._ddr.reply(q), send)
            return
        chain = self.chain
        try:
            result = chain.start(q)
        except StepFailed as exc:
            result = self._step_failed(q, exc)
        if result.__class__ is Suspended:
            who = self._inflight_client(client[0])
            held = self._client_inflight.get(who, 0)
            if (
                self._inflight >= self.max_inflight
                or held >= self.max_inflight_per_client
                or self._work is None
            ):
                self.stats.servfail_overload += 1
                self._send(q, respond(q, wire.SERVFAIL, source="overload"), send)
                return
            self._client_inflight[who] = held + 1
            self._inflight += 1
            chain.inflight += 1
            self._dispatch(q, chain, result, send, who)  # type: ignore[arg-type]
            return
        out = self._send(q, result, send)  # type: ignore[arg-type]
        packets = self.packets
        if packets is not None and out is not None:  # packet cache: keep it to replay
            packets.store(q, result, out)  # type: ignore[arg-type]

    def _acl_refusal(self, q: Query) -> Reply:
        """The answer to a client outside ``[server] allow``: REFUSED with EDE 18."""
        q.explain(f"acl: {q.client[0]} is not in [server] allow: REFUSED")
        return respond(q, wire.REFUSED, ede=[(EDE_PROHIBITED, "client not allowed")], source="acl")

    def _dispatch(self, q: Query, chain: Chain, sus: Suspended, send: Sender, who: str) -> None:
        """Go on with a query that waits for I/O: by callback if the step has `begin`,
        else in a task. ``who`` is the client's in-flight key, released by `_complete`."""
        begin = sus.link.on_begin
        if begin is None:
            if self._work is None:  # stopping: no new tasks
                self._complete(q, chain, respond(q, wire.SERVFAIL, source="overload"), send, who)
            else:
                self._work.start_soon(self._finish, q, chain, sus, send, who)
            return

        waiting = _Begun(self, q, chain, sus, send, who)
        try:
            begin(q, waiting.done)
        except Exception as exc:
            if waiting.table.pop(waiting, None) is not None:
                failed = self._step_failed(q, StepFailed(sus.link.step, exc))
                self._complete(q, chain, failed, send, who)

    async def _finish(self, q: Query, chain: Chain, sus: Suspended, send: Sender, who: str) -> None:
        reply = None
        try:
            reply = await chain.resume(q, sus)
        except StepFailed as exc:
            reply = self._step_failed(q, exc)
        finally:  # also when cancelled: the client is told (TCP) and the counts stay right
            self._complete(q, chain, reply, send, who)

    def _complete(
        self, q: Query, chain: Chain, reply: Reply | None, send: Sender, who: str
    ) -> None:
        """Send the final reply of a query that waited for I/O, and count it done."""
        try:
            self._send(q, reply, send)
        except Exception as exc:
            self._internal_error("query completion", exc)
        finally:
            self._inflight -= 1
            held = self._client_inflight[who] - 1
            if held:
                self._client_inflight[who] = held
            else:
                del self._client_inflight[who]
            chain.inflight -= 1

    def _send(self, q: Query, reply: Reply | None, send: Sender) -> bytes | None:
        """Send ``reply`` fitted to ``q``, tell the observers; the bytes sent."""
        out = None
        if reply is not None:
            out = finalize(reply, q, self.edns_udp_size)
            if q.edns_options and q.transport in tls.ENCRYPTED:
                out = tls.stream_options(out, q, self._tcp_idle())
        send(out)
        if self._observers:
            elapsed = time.monotonic() - q.received
            for observe in self._observers:
                observe(q, reply, elapsed)
        return out

    def _collect_observers(self) -> None:
        found = self.pm.hook.dnsproxy_observers(server=self)
        self._observers = tuple(f for group in found if group for f in group)

    def _step_failed(self, q: Query, exc: StepFailed) -> Reply:
        if isinstance(exc, StepTimeout):
            self.stats.step_timeouts += 1
            where = exc.step.setup.where
            self._limit_hit(f"timeout {where}", f"{exc}: answered SERVFAIL")
            q.explain(f"{where}: timed out (deadline = {exc.step.setup.deadline:g} s)")
            ede = [(EDE_NO_REACHABLE_AUTHORITY, "step timed out")]
            return respond(q, wire.SERVFAIL, ede=ede, source="timeout")
        self.stats.step_errors += 1
        cause = exc.__cause__
        key = (exc.step.setup.where, type(cause).__name__)
        if key not in self._failed_once:
            self._failed_once.add(key)
            log.error("step failed, answering SERVFAIL: %s", exc, exc_info=cause)
        return respond(q, wire.SERVFAIL, source="error")

    async def query(self, q: Query) -> Reply | None:
        """Run one query through the current chain (``dnsproxy query``, the HTTP API).

        It takes the path `handle` takes (the ACL first), so a trace shows what the client
        named in ``q`` would get; it is not counted as traffic.
        """
        if not self.allowed(q.client[0]):
            return self._acl_refusal(q)
        chain = self.chain
        try:
            result = chain.start(q)
            if isinstance(result, Suspended):
                result = await chain.resume(q, result)
        except StepFailed as exc:
            result = self._step_failed(q, exc)
        return result

    # --- listeners ----------------------------------------------------------------------

    async def _udp_loop(self, sock: socket.socket) -> None:
        """Read datagrams while there are any (``UDP_BATCH`` at most, then other tasks get
        a turn) and answer each: from the packet cache at once, else through the chain."""
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        stats = self.stats
        chain = self.handle_chain
        v6 = sock.family == socket.AF_INET6  # (host, port, flowinfo, scope): the client is [:2]
        addr: Any = None

        def send_now(out: bytes | None) -> None:
            """`Sender` of the datagram being handled: the packet cache sends before
            `PacketCache.answer` returns, so no function per datagram is made for it."""
            if out is not None:
                try:
                    sendto(out, addr)
                except OSError:
                    stats.dropped += 1  # send buffer full: UDP may drop

        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(UDP_BATCH):
                try:
                    data, addr = recvfrom(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue
                client = addr[:2] if v6 else addr
                try:
                    # No local for the packet cache: it would keep a retired chain alive.
                    if self.packets is None or not self.packets.answer(
                        data, client, "udp", send_now
                    ):
                        chain(data, client, "udp", self._udp_sender(sendto, addr))
                except Exception as exc:  # a bug must cost one query, not the listener
                    self._internal_error("udp", exc)

    def _udp_sender(self, sendto: Callable[[bytes, Any], int], addr: Any) -> Sender:
        """The `Sender` of a datagram the chain answers, maybe after I/O: bound to its
        client address."""

        def send(out: bytes | None) -> None:
            if out is not None:
                try:
                    sendto(out, addr)
                except OSError:
                    self.stats.dropped += 1  # send buffer full: UDP may drop

        return send

    async def _tcp_accept(self, sock: socket.socket, ctx: ssl.SSLContext | None = None) -> None:
        """Accept TCP connections (DoT ones when ``ctx`` is given) into the one table."""
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BATCH):
                try:
                    client, peer = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in ACCEPT_PAUSE:
                        log.warning("tcp accept failed: %s; pausing 100 ms", exc.strerror)
                        await trio.sleep(0.1)
                        break
                    if exc.errno in ACCEPT_SKIP:  # that connection failed, not the listener
                        continue
                    raise
                conn = self._tcp_admit(peer[:2])
                if conn is None:
                    self.stats.tcp_rejected += 1
                    client.close()
                    continue
                client.setblocking(False)
                with contextlib.suppress(OSError):  # reset already: its handler finds out
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                assert self._work is not None
                self._work.start_soon(self._tcp_guarded, client, conn, ctx)

    def _tcp_admit(self, peer: tuple[str, int]) -> TcpConn | None:
        """Enter a new connection in the table, or None to refuse it.

        A client at `max_tcp_per_client` is refused. When the table is full, the connection
        idle the longest (none of its queries outstanding) is closed to make room, so idle
        connections cannot lock clients out; only a table of busy ones refuses newcomers.
        """
        sc = self.config.server
        client = self._tcp_client(peer[0])
        held = self._tcp_clients.get(client, 0)
        cap = min(sc.max_tcp_per_client, sc.max_tcp_connections)
        if held >= cap:
            self._limit_hit(
                "client",
                f"tcp: a client reached max_tcp_per_client ({cap}), its new connection refused;"
                f" the latest: {client}",
            )
            return None
        conns = self._tcp_conns
        if len(conns) >= sc.max_tcp_connections:
            idle = next((c for c in conns if not c.outstanding), None)
            full = f"connection table full (max_tcp_connections = {sc.max_tcp_connections})"
            if idle is None:
                self._limit_hit("busy", f"tcp: {full} and every connection busy: refused one")
                return None
            self._tcp_release(idle)
            idle.close()
            self.stats.tcp_evicted += 1
            self._limit_hit("full", f"tcp: {full}: closed the longest-idle one for a new one")
        conn = TcpConn(peer, client)
        conns[conn] = None
        self._tcp_clients[client] = held + 1
        self.stats.tcp_connections += 1
        return conn

    def _tcp_release(self, conn: TcpConn) -> None:
        """Take a connection out of the table (once: eviction, then its handler's end)."""
        if self._tcp_conns.pop(conn, False) is False:
            return
        self.stats.tcp_connections -= 1
        held = self._tcp_clients[conn.client] - 1
        if held:
            self._tcp_clients[conn.client] = held
        else:
            del self._tcp_clients[conn.client]

    def _limit_hit(self, kind: str, what: str) -> None:
        """Log a limit being hit: at once, then at most every LIMIT_LOG_INTERVAL per kind,
        with how many times it was hit since the last line (an attacker can trigger it)."""
        now = trio.current_time()
        next_at, count = self._limit_log.get(kind, (now, 0))
        count += 1
        if now < next_at:
            self._limit_log[kind] = (next_at, count)
            return
        self._limit_log[kind] = (now + LIMIT_LOG_INTERVAL, 0)
        log.warning("%s (%d time(s) since the last such line)", what, count)

    def _tcp_idle(self) -> float:
        """The idle timeout for a connection starting to wait now (RFC 7766 §6.2.3):
        `tcp_idle_timeout` up to a half-full table, then linearly down to
        `tcp_idle_timeout_min` at a full one."""
        sc = self.config.server
        idle = sc.tcp_idle_timeout
        fill = len(self._tcp_conns) / sc.max_tcp_connections
        if fill <= 0.5:
            return idle
        floor = min(sc.tcp_idle_timeout_min, idle)
        return floor + (idle - floor) * 2 * (1 - min(fill, 1.0))

    async def _tcp_guarded(
        self, sock: socket.socket, conn: TcpConn, ctx: ssl.SSLContext | None
    ) -> None:
        """A connection handler's bug must not take the server down (trio serve_listeners)."""
        try:
            if ctx is None:
                await self._tcp_conn(streamconn.Plain(sock), conn, "tcp")
            else:
                await self._tls_conn(sock, conn, ctx)
        except Exception as exc:
            self._internal_error("tcp connection", exc)
        finally:
            self._tcp_release(conn)
            if sock.fileno() != -1:  # not closed by the handler (or wrapped by TLS)
                sock.close()

    async def _tls_conn(self, raw: socket.socket, conn: TcpConn, ctx: ssl.SSLContext) -> None:
        """A DoT connection: the handshake (bounded by ``tls_handshake_timeout``; the
        connection counts as idle meanwhile, so a handshake flood is evicted first), then
        the TCP handler over the TLS socket."""
        ok = False
        try:
            sock = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except OSError:  # reset before we got to it
            self.stats.tls_handshake_failures += 1
            return
        self._tcp_scopes.add(conn.handshake)
        try:
            with conn.handshake, trio.move_on_after(self.config.server.tls_handshake_timeout):
                while True:
                    try:
                        sock.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        await trio.lowlevel.wait_readable(sock)
                    except ssl.SSLWantWriteError:
                        await trio.lowlevel.wait_writable(sock)
                ok = True
        except OSError:  # SSLError included
            pass
        finally:
            self._tcp_scopes.discard(conn.handshake)
        if not ok:
            self.stats.tls_handshake_failures += 1
            trio.lowlevel.notify_closing(sock)
            sock.close()
            return
        client_id = self._sni_client_id(tls.server_name(sock))
        await self._tcp_conn(streamconn.Tls(sock), conn, "tls", client_id)

    def _sni_client_id(self, sni: str | None) -> str | None:
        """The first label of ``<id>.<tls_server_name>``, else None (AdGuard Home's rule)."""
        suffix = self.config.server.tls_server_name
        if not sni or not suffix:
            return None
        head, dot, rest = sni.lower().partition(".")
        return head if dot and head and rest == suffix.lower().rstrip(".") else None

    def _internal_error(self, where: str, exc: Exception) -> None:
        self.stats.internal_errors += 1
        key = (where, type(exc).__name__)
        if key not in self._failed_once:
            self._failed_once.add(key)
            log.error("internal error in %s (reported once): %r", where, exc, exc_info=exc)

    async def _tcp_conn(
        self,
        io: streamconn.Plain,
        conn: TcpConn,
        transport: str,
        client_id: str | None = None,
    ) -> None:
        """RFC 7766 over a connected socket: plain TCP, or DoT (`streamconn.Tls`).

        The reader (`_tcp_read`) handles every complete message it has read in one go;
        answers go out through `streamconn.Answers`, whose writer task only runs when the
        socket is full.
        """
        sc = self.config.server
        answers = streamconn.Answers(io, conn, sc.max_tcp_pipeline)
        eof = False  # the client closed first (else: timeout, stall, eviction, shutdown)
        read_scope = conn.scope
        self._tcp_scopes.add(read_scope)
        try:
            async with trio.open_nursery() as writers:
                writers.start_soon(answers.writer, sc.tcp_idle_timeout)
                try:
                    with read_scope:
                        eof = await self._tcp_read(answers, transport, client_id)
                    answers.reading = False
                    if conn.outstanding:
                        await answers.drained.wait()
                finally:  # before the nursery closes: answers still to come must not use it
                    answers.closed = True
                    writers.cancel_scope.cancel()  # the writer has nothing left to send
        finally:
            self._tcp_scopes.discard(read_scope)
            # Closing on our own while the client has not taken all we sent (it does not
            # read): a reset, as a FIN would wait behind those bytes for as long as it.
            io.close(abort=not eof and io.unsent() > 0)

    async def _tcp_read(
        self, answers: streamconn.Answers, transport: str, client_id: str | None
    ) -> bool:
        """Read and handle queries: every complete message read at once (up to
        `STREAM_BATCH` before other tasks get a turn), then one flush of the answers made
        meanwhile; at ``max_tcp_pipeline`` queries outstanding, read no more. True at EOF,
        False when the connection was idle too long.

        The idle timer is one deadline, looked at only when it passes: the connection was
        idle if no complete message came for `_tcp_idle` seconds (partial ones do not
        count) and no answer is outstanding; else the deadline moves on. A client that
        acknowledged none of the bytes waiting for it since the deadline last passed is
        reset then: it does not read (the kernel may buffer megabytes for it before a
        write ever stalls).
        """
        io = answers.io
        conn = answers.conn
        peer = conn.peer
        conns = self._tcp_conns
        handle = self.handle
        send = answers.send
        pipeline = answers.pipeline
        data = b""  # read and not handled yet
        parts: list[bytes] = []  # read after ``data`` while its first message is not whole
        need = waiting = 0  # the bytes that make it whole; those read of them
        active = trio.current_time()  # when the last complete message came
        taken = io.acked()  # the bytes the client had acknowledged when the deadline passed
        deadline = active + self._tcp_idle()
        while True:
            with trio.CancelScope(deadline=deadline):
                while True:
                    have = len(data)
                    off = handled = 0
                    answers.batching = True
                    try:
                        while have - off >= 2 and handled < STREAM_BATCH:
                            if conn.outstanding >= pipeline:
                                break
                            end = off + 2 + (data[off] << 8 | data[off + 1])
                            if end > have:
                                break
                            frame = data[off + 2 : end]
                            off = end
                            conn.outstanding += 1
                            handled += 1
                            handle(frame, peer, transport, send, client_id)
                    finally:
                        answers.batching = False
                        if off:
                            data = data[off:]
                    if data and not parts:  # a message begun: read on until it is whole
                        need = 2 + (data[0] << 8 | data[1]) if len(data) >= 2 else 2
                        waiting = len(data)
                    if handled:
                        answers.flush()
                        active = trio.current_time()
                        if conn in conns:
                            conns.move_to_end(conn)
                        if handled == STREAM_BATCH:
                            await trio.lowlevel.checkpoint()
                            continue
                    if conn.outstanding >= pipeline:  # read no more until one is answered
                        await answers.slot()
                        continue
                    more = io.recv(READ_SIZE)
                    if more is None:
                        await io.readable()
                    elif not more:
                        return True
                    elif not data:
                        data = more
                    else:  # joined once the message is whole: a trickle costs no copies
                        parts.append(more)
                        waiting += len(more)
                        if waiting >= need:
                            data = b"".join((data, *parts))
                            parts.clear()
            acked = io.acked()
            if acked == taken >= 0 and io.unsent():
                answers.broken()  # the client took none of its answers for a whole period
                return False
            taken = acked
            now = trio.current_time()
            idle = self._tcp_idle()
            if conn.outstanding:  # not idle while answers are pending
                deadline = now + idle
            elif active + idle > now:
                deadline = active + idle
            else:
                return False

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, serve until stopped, then drain in-flight queries for up to 5 s."""
        socks = []
        opened = self.sockets
        try:
            for addr in self._dns_listeners():
                if not addr.encrypted:
                    udp = opened.take("udp", addr) or bind_socket(addr, socket.SOCK_DGRAM)
                    socks.append(("udp", addr, udp))
                tcp = opened.take("tcp", addr) or listen_socket(addr)
                socks.append((addr.scheme or "tcp", addr, tcp))
        except OSError as exc:
            for _, _, s in socks:
                s.close()
            raise ConfigError(
                f"{self.path.name}: server: listen: cannot bind {addr}: {exc.strerror}"
            ) from exc
        services = self.services
        try:  # services bind too before any listener is announced: all or nothing
            for svc in self._service_configs():
                service = self.registry.services[svc.table](svc.options, self)
                if callable(getattr(service, "bind", None)):
                    listen = getattr(svc.options, "listen", None)
                    passed = opened.take("tcp", listen) if isinstance(listen, Address) else None
                    if passed is None:
                        service.bind()
                    else:
                        service.bind(passed)
                services.append(service)
        except ConfigError:
            for _, _, s in socks:
                s.close()
            services.clear()
            raise
        opened.close_unused()
        self.bound = tuple(self.config.server.listen)
        if self.config.encrypted:
            self.certs = tls.Certs(*self.config.tls_files())
        try:
            async with trio.open_nursery() as root:
                self._nursery = root
                root.start_soon(self.blocking.run)
                root.start_soon(self.clients.run)
                root.start_soon(self._begun.run)
                root.start_soon(self.notifier.run_watchdog)
                self._start_chain(self.chain)
                async with trio.open_nursery() as work:
                    self._work = work
                    async with trio.open_nursery() as accept:
                        for kind, addr, s in socks:
                            host, port = s.getsockname()[:2]
                            self.addresses.append((kind, host, port))
                            if addr.encrypted:
                                self._encrypted_bound.append((kind, host, port, addr.path))
                            if kind == "https":
                                await accept.start(self._doh(addr, s).run)
                            elif kind == "tls":
                                assert self.certs is not None
                                ctx = self.certs.context(tls.ALPN_DOT)
                                accept.start_soon(self._tcp_accept, s, ctx)
                            else:
                                loop = self._udp_loop if kind == "udp" else self._tcp_accept
                                accept.start_soon(loop, s)
                            log.info("listening on %s %s", kind, wire.hostport(host, port))
                        if self.certs is not None:
                            interval = self.config.server.tls_reload_interval
                            accept.start_soon(self.certs.watch, interval)
                        self._ddr = self._ddr_answer()
                        for service in services:
                            await root.start(service.run)
                        if self.handle_signals:  # before READY=1: a reload may follow
                            await accept.start(self._signals)
                        self._collect_observers()
                        self.pm.hook.dnsproxy_startup(server=self)
                        if self.freeze_gc:
                            refreeze_gc()
                            accept.start_soon(_refreeze_every, GC_REFREEZE)
                        task_status.started(self.addresses)
                        self.notifier.ready(self._status())
                        await self._stop.wait()
                        self.notifier.stopping()
                        accept.cancel_scope.cancel()
                    log.info("stopping: finishing in-flight queries")
                    for scope in list(self._tcp_scopes):
                        scope.cancel()
                    work.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE
                    while self._inflight:  # queries waiting on I/O without a task of their own
                        await trio.sleep(0.01)
                self._work = None
                self.pm.hook.dnsproxy_shutdown(server=self)
                root.cancel_scope.cancel()
        finally:
            for _, _, s in socks:
                s.close()
            self.chain.close()
            self.notifier.close()
        log.info("stopped")

    def _dns_listeners(self) -> tuple[Address, ...]:
        """The DNS listeners `run` serves (a `workers.Supervisor` leaves them to workers)."""
        return self.config.server.listen

    def _service_configs(self) -> tuple[ServiceConfig, ...]:
        """The services `run` starts (a `workers.Worker` leaves them to its supervisor)."""
        return self.config.services

    async def gather_metrics(self) -> None:
        """Bring ``stats`` and `step_metrics` up to date before a scrape: nothing to do
        in one process (`workers.Supervisor` asks its workers)."""

    def step_metrics(self) -> list[tuple[Setup, list[Metric]]]:
        """Every step's setup and current `Step.metrics` (what /metrics exports)."""
        return [(s.setup, s.metrics()) for s in self.chain.steps]

    def _status(self) -> str:
        """The STATUS= line systemd shows: where this server serves, and its chain."""
        where = ", ".join(sorted({wire.hostport(h, p) for _, h, p in self.addresses}))
        return f"serving on {where}: {len(self.chain.steps)} steps"

    def _doh(self, addr: Address, sock: socket.socket) -> Any:
        from dnsproxy.doh import DohListener  # hypercorn is imported only when DoH is used

        assert self.certs is not None
        return DohListener(self, sock, self.certs.context(tls.ALPN_DOH), addr.path)

    def _ddr_answer(self) -> ddr.Answer | None:
        """The DDR answer for the bound encrypted listeners, or None (none, or ddr off)."""
        sc = self.config.server
        if not sc.ddr:
            return None
        endpoints = self._encrypted_bound
        return ddr.Answer(endpoints, sc.tls_server_name) if endpoints else None

    async def run_steps(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the chain's background work (list loading, refreshes) without listeners.

        For ``dnsproxy query`` and embedding: start it in a nursery, call `query`, cancel.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._start_chain(self.chain)
            task_status.started()
            await trio.sleep_forever()

    def stop(self) -> None:
        """Stop accepting queries; in-flight ones get up to 5 s to finish."""
        self._stop.set()

    def _start_chain(self, chain: Chain) -> None:
        assert self._nursery is not None
        scope = trio.CancelScope()
        ended = trio.Event()
        self._chain_scopes[id(chain)] = (scope, ended)

        async def background() -> None:
            try:
                with scope:
                    async with trio.open_nursery() as n:
                        for step in chain.steps:
                            n.start_soon(self._run_step, step)
            finally:
                ended.set()

        self._nursery.start_soon(background)

    async def _run_step(self, step: Step) -> None:
        """A step's background work; its failure is logged and must not stop the server."""
        try:
            await step.run()
        except Exception as exc:
            self.stats.internal_errors += 1
            log.error(
                "%s: background work failed, the step keeps serving what it has: %r",
                step.setup.where,
                exc,
                exc_info=exc,
            )

    async def reload(self) -> bool:
        """Load the config again and swap the new chain in; keep the old one on error.

        Steps unchanged by the reload take over the state of the steps they replace
        (`Step.inherit`); the blocking pause is the server's and is not touched.
        """
        start = time.monotonic()
        try:
            cfg, registry, pm = load(self.path)
            chain = build_chain(
                cfg, registry, self.blocking, self.shared, self.clients, self.worker_index
            )
        except ConfigError as exc:
            for line in exc.lines:
                log.error("reload failed, keeping the running config: %s", line)
            return False
        if self.bound and tuple(cfg.server.listen) != self.bound:
            log.warning("reload: listen addresses changed; restart to apply them")
        if self.certs is not None:
            self.certs.reload(*cfg.tls_files())
        old = self.chain
        _inherit(self.config, old, cfg, chain)
        self.config, self.registry, self.pm = cfg, registry, pm
        self.clients.configure(cfg.clients)
        self._apply_server_config()
        self._ddr = self._ddr_answer()
        self._start_chain(chain)
        self.chain = chain
        self.packets = packet_cache(self)
        self._collect_observers()
        log.info(
            "reloaded %s: %d steps serving in %.2f s",
            self.path.name,
            len(chain.steps),
            time.monotonic() - start,
        )
        self.pm.hook.dnsproxy_reload(server=self)
        assert self._nursery is not None
        self._nursery.start_soon(self._retire, old)
        return True

    async def _retire(self, chain: Chain) -> None:
        cid = id(chain)
        with trio.move_on_after(SHUTDOWN_GRACE):
            while chain.inflight > 0:
                await trio.sleep(0.05)
        scope, ended = self._chain_scopes.pop(cid)
        scope.cancel()
        await ended.wait()
        chain.close()
        if self.freeze_gc:
            del chain  # this frame's reference: the collection must be able to free it
            refreeze_gc()

    async def refresh_list(self, step: Any, index: int) -> str | None:
        """Read or download list ``index`` of blocklist ``step`` now (the dashboard's
        "refresh now"): the problem, or None. A `workers.Supervisor` has every worker's
        copy of the step do the same."""
        problem: str | None = await step.refresh_now(index)
        return problem

    def flush(self) -> None:
        self.chain.flush()
        if self.packets is not None:
            self.packets.clear()
        log.info("caches flushed")

    async def _signals(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(
            signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1
        ) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.notifier.reloading()
                    await self.reload()
                    self.notifier.ready(self._status())
                elif signum == signal.SIGUSR1:
                    self.flush()
                else:
                    self.stop()
                    return


def _inherit(old_cfg: Config, old: Chain, new_cfg: Config, new: Chain) -> None:
    """Hand each new step the old step it replaces unchanged: the first old step, in
    chain order, of the same plugin with equal options, scope and deadline not yet taken."""

    def same(sc: StepConfig, step: Step) -> tuple[object, ...]:
        return (sc.plugin, sc.options, step.setup.scope, step.setup.deadline)

    free = [(same(osc, ostep), ostep) for osc, ostep in zip(old_cfg.chain, old.steps, strict=True)]
    for sc, step in zip(new_cfg.chain, new.steps, strict=True):
        wanted = same(sc, step)
        for i, (was, ostep) in enumerate(free):
            if was == wanted:
                del free[i]
                step.inherit(ostep)
                break


def refreeze_gc() -> None:
    """Collect everything (frozen objects included), then freeze what is left alive
    (`Server` with ``freeze_gc``: after start-up, each reload, every GC_REFREEZE s)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


async def _refreeze_every(seconds: float) -> None:
    while True:
        await trio.sleep(seconds)
        refreeze_gc()


class _Begun:
    """A query waiting in a step's `begin`: called, it times out; `done` completes it.

    One object per forwarded query instead of two closures and their cells (fewer
    allocations per query, so fewer garbage-collector passes).
    """

    __slots__ = ("chain", "q", "send", "server", "sus", "table", "who")

    def __init__(
        self, server: Server, q: Query, chain: Chain, sus: Suspended, send: Sender, who: str
    ) -> None:
        self.server = server
        self.q = q
        self.chain = chain
        self.sus = sus
        self.send = send
        self.who = who
        self.table = server._begun.add(sus.link.deadline, self)  # where it waits, until popped

    def __call__(self) -> None:
        server, q = self.server, self.q
        failed = server._step_failed(q, StepTimeout(self.sus.link.step))
        server._complete(q, self.chain, failed, self.send, self.who)

    def done(self, reply: Reply | None) -> None:
        if self.table.pop(self, None) is None:
            return  # timed out (answered already), or called twice
        server, q, chain = self.server, self.q, self.chain
        try:
            result = chain.proceed(q, self.sus, reply)
        except StepFailed as exc:
            result = server._step_failed(q, exc)
        if result.__class__ is Suspended:
            server._dispatch(q, chain, result, self.send, self.who)  # type: ignore[arg-type]
        else:
            server._complete(q, chain, result, self.send, self.who)  # type: ignore[arg-type]


class _Deadlines:
    """Queries waiting in a step's `begin` (no task of their own to time out), each with
    the moment its deadline expires and what to do then.

    One insertion-ordered table per deadline length, so each table is in expiry order and
    `run` only looks at the heads; a query's ``done`` removes it with one dict pop.
    """

    def __init__(self) -> None:
        self.tables: dict[float, dict[Callable[[], None], float]] = {}
        self.wake: trio.CancelScope | None = None  # the sleep of `run`, set to the earliest
        self.wake_at = math.inf  # ``wake``'s deadline (a float read, not a property's)
        # The Trio clock: the run's own clock object while `run` runs (a direct read costs
        # half of `trio.current_time`'s), `trio.current_time` otherwise.
        self.now: Callable[[], float] = trio.current_time

    def add(self, length: float, expired: Callable[[], None]) -> dict[Callable[[], None], float]:
        """Call ``expired`` in ``length`` seconds unless it is popped from the returned
        table first."""
        at = self.now() + length
        table = self.tables.get(length)
        if table is None:
            table = self.tables[length] = {}
        table[expired] = at
        wake = self.wake
        if wake is not None and at < self.wake_at:
            wake.deadline = self.wake_at = at
        return table

    async def run(self) -> None:
        self.now = trio.lowlevel.current_clock().current_time
        try:
            while True:
                earliest = min((next(iter(t.values())) for t in self.tables.values() if t),
                               default=math.inf)  # fmt: skip
                self.wake_at = earliest
                with trio.CancelScope(deadline=earliest) as self.wake:
                    await trio.sleep_forever()
                self.wake = None
                self.wake_at = math.inf
                now = trio.current_time()
                for table in list(self.tables.values()):
                    while table:
                        expired, at = next(iter(table.items()))
                        if at > now:
                            break
                        del table[expired]
                        expired()
        finally:
            self.now = trio.current_time
            self.wake = None
            self.wake_at = math.inf
