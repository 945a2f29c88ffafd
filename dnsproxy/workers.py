"""``[server] workers = N``: N processes serve the DNS listeners, one supervisor runs the rest.

Listeners. For each DNS listener (UDP, TCP, ``tls://``, ``https://``) the supervisor binds N
sockets with SO_REUSEPORT, in order, and attaches one classic-BPF program to the group
(SO_ATTACH_REUSEPORT_CBPF). The kernel runs it for every datagram and every new
connection; it returns the client's source address modulo N, and that number is the
index of the socket in the group, i.e. its bind order. Worker ``i`` is handed socket
``i`` of every group, so one client address always reaches one worker: its ratelimit
accounts, in-flight share and connection count stay exact, as with one process. The
supervisor binds them (as root before the privilege drop, with ``user``) and keeps them
open for its whole life, so a restarted worker gets the same sockets and the same
clients, and datagrams for a worker being restarted wait in its socket's buffer.

Workers. Each worker is ``python -m dnsproxy.workers``: a full `Server` on the passed
sockets, without the ``[http]``-like services, whose observers are replaced by one that
batches a compact record of every query (`Record`) to the supervisor. Workers run in a
session of their own (a terminal's Ctrl-C and hang-up reach the supervisor only) and stop
when the supervisor's end of their channel closes.

Supervisor (`Supervisor`, a `Server` without DNS listeners): it loads the same config and
chain, so it owns what exists once:

- the services (``[http]``: dashboard, ``/metrics``, the API) and every observer: each
  worker record is replayed to them, so the one query-log writer (SQLite) and the HTTP
  counters see every query of every worker;
- merged metrics: before a scrape `gather_metrics` asks every worker for its core counters
  and step metrics and sums them with its own (counters per worker kept monotonic across a
  worker's restart; gauges summed too: each is a per-process quantity);
- reload: SIGHUP loads the config once here; only if it is valid is every worker told to
  reload (a bad config changes nothing anywhere), and READY=1 follows once they have;
- dashboard actions: blocking pauses (all and per group) are pushed to every worker as
  they change; a flush (also what follows a managed allow/block change) makes every
  worker re-read its managed lists and flush its caches;
- stop: SIGTERM (or SIGINT) forwards SIGTERM to the workers, waits up to
  `STOP_TIMEOUT` for them (then kills them), writes the last records and exits.

A worker that exits while the supervisor runs is logged and restarted after
`RESTART_DELAY` on the same sockets; one that fails before it ever served (a start-up
error) stops the whole service with a non-zero status, as one process would.

One instance, one secret (`Shared.secret`: the keys steps derive from it, such as the
forwarding-loop token, must be the same in every worker): the supervisor writes its
secret as the first `SECRET_SIZE` bytes on a worker's channel before it starts the
worker (not in argv or the environment, which other users can read in /proc), and the
worker reads them before anything else. A reload keeps it; a restarted worker is given
it again.

The channel is a Unix stream socketpair per worker: after the secret, length-prefixed
pickles (both ends are this program). Nothing the supervisor does waits on a worker
without a timeout, so a hung or dead worker cannot hang it; one whose channel stays full
for `SEND_TIMEOUT` is killed (and restarted). A worker holds at most ``worker_records``
records for a supervisor that does not keep up, then drops (and logs) them: DNS never
waits on the query log. Workers send no records at all when the supervisor has no
observer (no query log, no ``[http]``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from dnsproxy.chain import Metric, Setup
from dnsproxy.config import Address, ServerConfig, ServiceConfig, worker_count
from dnsproxy.errors import ConfigError, Drop, Reject
from dnsproxy.reply import Reply
from dnsproxy.server import Server, Stats, bind_socket, listen_socket
from dnsproxy.service import Sockets
from dnsproxy.shared import SECRET_SIZE
from dnsproxy.wire import Query, hostport, parse_query

log = logging.getLogger("dnsproxy")

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
SKF_NET_OFF = -0x100000  # classic-BPF loads relative to the network header
BPF_LD_W_ABS = 0x20  # A = 32-bit word at k
BPF_TAX = 0x07  # X = A
BPF_XOR_X = 0xAC  # A ^= X
BPF_MOD_K = 0x94  # A %= k
BPF_RET_A = 0x16  # return A
RECORD_FLUSH = 0.02  # seconds between a worker's batches of query records
METRICS_TIMEOUT = 1.0  # seconds a scrape waits for the workers' counters
SEND_TIMEOUT = 1.0  # seconds a message to one worker may wait for room in its channel
RELOAD_TIMEOUT = 30.0  # seconds SIGHUP waits for the workers to have reloaded
STOP_TIMEOUT = 4.0  # seconds workers get to stop before they are killed
RESTART_DELAY = 1.0  # seconds before a worker that exited is started again
SECRET_TIMEOUT = 5.0  # seconds a worker waits for its secret (written before it started)
FRAME = struct.Struct("!I")

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def steering_program(family: int, workers: int) -> list[Instruction]:
    """The classic-BPF program that picks a socket of a reuseport group: the client's
    source address (IPv6: its four words XORed) modulo ``workers``."""

    def load(offset: int) -> Instruction:
        return (BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF)

    if family == socket.AF_INET:
        prog = [load(12)]  # IPv4 source address
    else:
        prog = [load(8)]  # IPv6 source address: words at 8, 12, 16, 20
        for offset in (12, 16, 20):
            prog += [(BPF_TAX, 0, 0, 0), load(offset), (BPF_XOR_X, 0, 0, 0)]
    return [*prog, (BPF_MOD_K, 0, 0, workers), (BPF_RET_A, 0, 0, 0)]


def attach_steering(sock: socket.socket, workers: int) -> None:
    """Attach `steering_program` to the reuseport group of ``sock``."""
    prog = steering_program(sock.family, workers)
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HP", len(prog), ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def bind_group(addr: Address, kind: str, workers: int) -> list[socket.socket]:
    """``workers`` sockets sharing ``addr`` (``kind``: "udp" or "tcp"), steered by client."""
    socks: list[socket.socket] = []
    try:
        for _ in range(workers):  # a TCP socket joins its group at listen(): in this order
            if kind == "udp":
                socks.append(bind_socket(addr, socket.SOCK_DGRAM, reuseport=True))
            else:
                socks.append(listen_socket(addr, reuseport=True))
        attach_steering(socks[0], workers)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


Group = tuple[str, Address, list[socket.socket]]  # kind ("udp", "tcp"), listener, sockets


def bind_groups(name: str, sc: ServerConfig, passed: Sockets) -> list[Group]:
    """A steered group of sockets for every DNS listener (run as root before the drop
    when ``user`` is set, so port 53 works)."""
    n = worker_count(sc.workers)
    groups: list[Group] = []
    try:
        for addr in sc.listen:
            for kind in ("tcp",) if addr.encrypted else ("udp", "tcp"):
                if (kind, addr) in passed:
                    raise ConfigError(
                        f"{name}: server: workers: {kind} {addr} is passed by socket"
                        " activation, but workers > 1 binds a steered group of its own:"
                        " remove it from the socket unit, or set workers = 1"
                    )
                try:
                    groups.append((kind, addr, bind_group(addr, kind, n)))
                except OSError as exc:
                    raise ConfigError(
                        f"{name}: server: listen: cannot bind {kind} {addr}: {exc.strerror}"
                    ) from exc
    except ConfigError:
        close_groups(groups)
        raise
    return groups


def close_groups(groups: Sequence[Group]) -> None:
    for _, _, socks in groups:
        for sock in socks:
            sock.close()


def explain(sc: ServerConfig) -> str:
    """The line `dnsproxy check` prints about ``workers``."""
    n = worker_count(sc.workers)
    how = f"workers = {sc.workers!r}" + (f" ({n} usable CPUs)" if sc.workers == "auto" else "")
    if n == 1:
        return f"{how}: one process serves everything"
    return (
        f"{how}: {n} worker processes share each DNS listener (SO_REUSEPORT), steered by"
        " client address (classic BPF: one client, one worker); a supervisor owns reload,"
        " stop, the services ([http]), the query-log writer and the merged metrics"
    )


# --- the channel --------------------------------------------------------------------------


class Link:
    """One end of a supervisor-worker channel: whole messages, sends never interleaved."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self.lock = trio.Lock()
        self.buf = bytearray()

    async def send(self, message: Any) -> None:
        data = pickle.dumps(message, pickle.HIGHEST_PROTOCOL)
        async with self.lock:
            await self.stream.send_all(FRAME.pack(len(data)) + data)

    async def receive(self) -> Any:
        """The next message; None when the other end closed (or broke) the channel."""
        buf = self.buf
        try:
            while True:
                if len(buf) >= 4:
                    (size,) = FRAME.unpack_from(buf)
                    if len(buf) >= 4 + size:
                        data = bytes(buf[4 : 4 + size])
                        del buf[: 4 + size]
                        return pickle.loads(data)
                chunk = await self.stream.receive_some(1 << 16)
                if not chunk:
                    return None
                buf += chunk
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return None

    async def aclose(self) -> None:
        await self.stream.aclose()


# A query as observers saw it in a worker: query bytes, client, transport, client id,
# notes, response bytes (None: no response), answering source, EDEs, whether the response
# counts as blocked (`Reply.blocked`: a step may say so without an EDE), seconds taken.
Record = tuple[bytes, tuple[str, int], str, str | None, dict[str, Any] | None,
               bytes | None, str, tuple[Any, ...], bool, float]  # fmt: skip


def record(q: Query, reply: Reply | None, elapsed: float) -> Record:
    """What the supervisor's observers need of one query, in plain values: the notes as
    the text the query log stores (plain `str`: a note may be a str subclass holding its
    list; a blocklist's list note names its rule here, where the list is)."""
    notes = q.notes
    if notes:
        lst = notes.get("list")
        rule_for = getattr(lst, "rule_for", None)
        plain = {k: None if v is None else str.__str__(str(v)) for k, v in notes.items()}
        if rule_for is not None and "rule" not in notes:
            rule = rule_for(q)
            if rule is not None:
                plain["rule"] = str.__str__(str(rule))
        notes = plain
    if reply is None:
        return (q.data, q.client, q.transport, q.client_id, notes, None, "", (), False, elapsed)
    return (q.data, q.client, q.transport, q.client_id, notes, reply.wire, reply.source,
            reply.ede, reply.blocked, elapsed)  # fmt: skip


def replay(record: Record) -> tuple[Query, Reply | None, float] | None:
    """The query, reply and elapsed time a worker's observers would have been given."""
    data, client, transport, client_id, notes, wire_, source, ede, blocked, elapsed = record
    try:
        q = parse_query(data, client, transport)
    except (Drop, Reject):
        return None
    q.client_id = client_id
    q.notes = notes
    reply = None if wire_ is None else Reply(wire_, ede=ede, source=source, blocked=blocked)
    return q, reply, elapsed


@attrs.define(eq=False)
class Report:
    """A worker's counters as last reported, with what makes them monotonic per series."""

    last: dict[tuple[Any, ...], float] = attrs.Factory(dict)
    offset: dict[tuple[Any, ...], float] = attrs.Factory(dict)

    def monotonic(self, key: tuple[Any, ...], value: float, counter: bool) -> float:
        if not counter:
            return value
        if value < self.last.get(key, 0.0):  # the worker restarted or reloaded the step
            self.offset[key] = self.offset.get(key, 0.0) + self.last[key]
        self.last[key] = value
        return value + self.offset.get(key, 0.0)

    def restarted(self) -> None:
        """A new process took over: every count it reports adds to the old one's last.
        (The drop alone would miss a restart whose counts grew past the old ones before
        the next report.)"""
        for key, value in self.last.items():
            self.offset[key] = self.offset.get(key, 0.0) + value
        self.last.clear()


def receive_secret(sock: socket.socket) -> bytes | None:
    """The secret the supervisor wrote first on the (blocking) channel ``sock``; None if
    the channel closed or `SECRET_TIMEOUT` passed before all `SECRET_SIZE` bytes came."""
    sock.settimeout(SECRET_TIMEOUT)
    secret = b""
    try:
        while len(secret) < SECRET_SIZE:
            chunk = sock.recv(SECRET_SIZE - len(secret))
            if not chunk:
                return None
            secret += chunk
    except OSError:  # the timeout included
        return None
    return secret


# --- the worker ---------------------------------------------------------------------------


class Worker(Server):
    """A `Server` on passed sockets that reports to the supervisor over ``link``."""

    def __init__(self, path: Path, index: int, link_sock: socket.socket, **kw: Any) -> None:
        self.worker_index = index
        super().__init__(path, **kw)
        self.link = Link(link_sock)
        self.records: list[tuple[Query, Reply | None, float]] = []
        self.records_dropped = 0
        self.observed = True  # whether the supervisor has observers to replay records to

    def _service_configs(self) -> tuple[ServiceConfig, ...]:
        return ()  # the supervisor runs the services

    def _collect_observers(self) -> None:
        self._observers = (self._record,) if self.observed else ()

    def _record(self, q: Query, reply: Reply | None, elapsed: float) -> None:
        """The worker's one observer (hot path): keep the query for the supervisor."""
        if len(self.records) >= self.config.server.worker_records:
            self.records_dropped += 1
            return
        self.records.append((q, reply, elapsed))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen_to_supervisor, nursery)
            await nursery.start(self._serve, nursery)
            await self.link.send(("ready", os.getpid()))
            nursery.start_soon(self._send_records)
            task_status.started()

    async def _serve(self, nursery: trio.Nursery, *, task_status: Any) -> None:
        try:
            await Server.run(self, task_status=task_status)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(STOP_TIMEOUT / 2):
                await self._flush_records()
            nursery.cancel_scope.cancel()

    async def _flush_records(self) -> None:
        if self.records_dropped:
            log.warning("%d query records dropped: the supervisor is not keeping up",
                        self.records_dropped)  # fmt: skip
            self.records_dropped = 0
        if self.records:
            batch, self.records = self.records, []
            records = [record(*seen) for seen in batch]
            try:
                await self.link.send(("log", records))
            except (pickle.PicklingError, AttributeError, TypeError) as exc:  # a plugin's note
                log.error("%d query records not sent to the supervisor: %s", len(records), exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the supervisor went away: `_listen_to_supervisor` stops this worker

    async def _send_records(self) -> None:
        while True:
            await trio.sleep(RECORD_FLUSH)
            await self._flush_records()

    async def _listen_to_supervisor(self, nursery: trio.Nursery) -> None:
        """Carry out the supervisor's requests; its channel closing stops this worker."""
        while True:
            message = await self.link.receive()
            if message is None:
                log.warning("the supervisor went away: stopping")
                self.stop()
                return
            op = message[0]
            if op == "reload":
                await self.reload()
                await self.link.send(("reload",))  # done (a failure is logged here)
            elif op == "flush":
                for step in self.chain.steps:  # a managed allow/block change, then a flush
                    apply = getattr(step, "apply_managed", None)
                    if apply is not None:
                        await apply()
                self.flush()
            elif op == "blocking":
                self.blocking.restore(message[1])
            elif op == "refresh":  # a download must not hold up the next request
                step = next((s for s in self.chain.steps if s.setup.index == message[1]), None)
                if step is not None and hasattr(step, "refresh_now"):
                    nursery.start_soon(step.refresh_now, message[2])
            elif op == "observed":
                self.observed = message[1]
                self._collect_observers()
            elif op == "metrics":
                await self._flush_records()  # the records first: /metrics sums both
                await self.link.send(("metrics", self.metrics_report()))

    def metrics_report(self) -> tuple[dict[str, int], list[tuple[str, int, list[Metric]]]]:
        stats = {f.name: getattr(self.stats, f.name) for f in attrs.fields(Stats)}
        return stats, [(s.setup.name, s.setup.index, s.metrics()) for s in self.chain.steps]


def worker_main(argv: list[str]) -> int:
    """``python -m dnsproxy.workers CONFIG INDEX LINK_FD KIND:FD:ADDRESS...``."""
    from dnsproxy.cli import setup_logging
    from dnsproxy.config import read_toml, server_table
    from dnsproxy.loader import load

    path, index, link_fd = Path(argv[0]), int(argv[1]), int(argv[2])
    sc = server_table(path, read_toml(path))
    setup_logging(sc.log_level, sc.log_format)
    prefix = f"worker {index}: "
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: setattr(record, "msg", prefix + str(record.msg)) or True)
    sockets = Sockets()
    for spec in argv[3:]:
        kind, fd, text = spec.split(":", 2)
        sock = socket.socket(fileno=int(fd))
        sock.setblocking(False)
        sockets.add(kind, sock, Address.parse(text))
    link = socket.socket(fileno=link_fd)
    secret = receive_secret(link)
    if secret is None:
        log.error("no secret from the supervisor (channel closed, or %g s passed)", SECRET_TIMEOUT)
        return 1
    try:
        loaded = load(path)
    except ConfigError as exc:
        for line in exc.lines:
            log.error("%s", line)
        return 1
    worker = Worker(
        path, index, link, freeze_gc=True, loaded=loaded, sockets=sockets, secret=secret
    )
    trio.run(worker.run)
    return 0


# --- the supervisor -----------------------------------------------------------------------


@attrs.define(eq=False)
class Child:
    """The supervisor's view of one worker."""

    index: int
    process: trio.Process | None = None
    link: Link | None = None
    report: Report = attrs.Factory(Report)
    latest: Any = None  # its last metrics report
    answered: dict[str, trio.Event] = attrs.Factory(dict)  # request -> its answer came
    served: bool = False  # it became ready once: a later exit is a crash, not a start-up error
    replaced: bool = False  # a new process started and has not reported yet

    def started(self) -> None:
        """A new process runs it. The old one's counts become the report's offsets only at
        the new one's first report (`took`): a scrape while it starts (it may take seconds)
        still sums the old process's last report, so no merged counter goes back."""
        self.replaced = True

    def took(self, latest: Any) -> None:
        """A metrics report came (the first of a new process adds to the old one's)."""
        if self.replaced:
            self.report.restarted()
            self.replaced = False
        self.latest = latest


class Supervisor(Server):
    """The process that owns the workers; a `Server` without DNS listeners of its own."""

    def __init__(self, path: Path, *, groups: list[Group] | None = None, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.workers = worker_count(self.config.server.workers)
        self.groups = groups
        self.children = [Child(i) for i in range(self.workers)]
        self.own_stats = self.stats  # the supervisor's own core counters (no queries)
        self._published = self.stats  # `stats` as the last scrape made it
        self._stopping = trio.Event()
        self._observing = trio.Event()  # records wait until the observers are collected
        self.blocking.on_change = self._push_blocking

    def _dns_listeners(self) -> tuple[Address, ...]:
        return ()  # the workers serve them

    def _status(self) -> str:
        where = ", ".join(sorted({str(addr) for _, addr, _ in self.groups or ()}))
        return f"{self.workers} workers serving on {where}: {len(self.chain.steps)} steps"

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if not os.access(sys.executable, os.X_OK):
            raise ConfigError(
                f"{self.path.name}: server: workers: this user (uid {os.getuid()}) cannot run"
                f" {sys.executable}, which starts the workers: install dnsproxy with a Python"
                " the service user can run, or set workers = 1"
            )
        if self.groups is None:
            self.groups = bind_groups(self.path.name, self.config.server, Sockets())
        try:
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as starting:
                    for child in self.children:
                        starting.start_soon(nursery.start, self._supervise, child)
                nursery.start_soon(self._stop_workers)
                await nursery.start(self._serve, nursery)
                where = sorted({f"{kind} {addr}" for kind, addr, _ in self.groups})
                log.info("workers: %d serving %s", self.workers, ", ".join(where))
                task_status.started(self.addresses)
        finally:
            close_groups(self.groups)

    async def _serve(self, nursery: trio.Nursery, *, task_status: Any) -> None:
        try:
            await Server.run(self, task_status=task_status)
        finally:
            nursery.cancel_scope.cancel()

    def _collect_observers(self) -> None:
        """Collect the observers, and tell the workers whether to send records at all."""
        super()._collect_observers()
        self._observing.set()
        self._broadcast_soon(("observed", bool(self._observers)))

    def stop(self) -> None:
        """Stop the workers first (their last records still reach the query log)."""
        self._stopping.set()

    async def _stop_workers(self) -> None:
        await self._stopping.wait()
        log.info("stopping %d workers", self.workers)
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                child.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for child in self.children:
                if child.process is not None:
                    await child.process.wait()
            while any(child.link is not None for child in self.children):
                await trio.sleep(0.01)  # their last records read and replayed
        for child in self.children:
            if child.process is not None and child.process.returncode is None:
                log.error("worker %d did not stop in %g s: killed", child.index, STOP_TIMEOUT)
                child.process.kill()
        Server.stop(self)

    async def _supervise(self, child: Child, *, task_status: Any) -> None:
        """Run worker ``child``, restarting it when it exits; started once it serves."""
        while True:
            status = await self._run_worker(child, task_status)
            if self._stopping.is_set():
                return
            if not child.served:
                self._stopping.set()
                raise ConfigError(f"worker {child.index} failed to start (exit status {status})")
            log.error("worker %d exited (status %s): restarting it in %g s",
                      child.index, status, RESTART_DELAY)  # fmt: skip
            await trio.sleep(RESTART_DELAY)
            if self._stopping.is_set():
                return

    async def _run_worker(self, child: Child, task_status: Any) -> int:
        assert self.groups is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.sendall(self.shared.secret)  # first, and into an empty buffer: never blocks
        specs, fds = [], [theirs.fileno()]
        for kind, addr, socks in self.groups:
            fd = socks[child.index].fileno()
            fds.append(fd)
            specs.append(f"{kind}:{fd}:{hostport(addr.host, addr.port)}")
        argv = [sys.executable, "-m", "dnsproxy.workers", str(self.path), str(child.index),
                str(theirs.fileno()), *specs]  # fmt: skip
        try:
            process = await trio.lowlevel.open_process(
                argv, pass_fds=fds, start_new_session=True, stdin=subprocess.DEVNULL
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        child.process, child.link = process, Link(ours)
        child.started()
        try:
            while True:
                message = await child.link.receive()
                if message is None:
                    break
                op = message[0]
                if op == "log":
                    await self._observing.wait()
                    self._replay(message[1])
                elif op in child.answered:  # an answer to `_request`
                    if op == "metrics":
                        child.took(message[1])
                    child.answered[op].set()
                elif op == "ready":
                    log.info("worker %d serving (pid %d)", child.index, message[1])
                    await child.link.send(("blocking", self.blocking.export()))
                    if self._observing.is_set():
                        await child.link.send(("observed", bool(self._observers)))
                    if not child.served:
                        child.served = True
                        task_status.started()
        finally:
            link, child.link = child.link, None
            with trio.CancelScope(shield=True):
                await link.aclose()  # a worker still running stops when its channel closes
                with trio.move_on_after(STOP_TIMEOUT):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                status = await process.wait()
        return status

    def _replay(self, batch: list[Record]) -> None:
        observers = self._observers
        if not observers:
            return  # the workers are told to stop sending: these were on their way
        for record in batch:
            seen = replay(record)
            if seen is not None:
                for observe in observers:
                    observe(*seen)

    async def _broadcast(self, message: Any) -> None:
        """Send ``message`` to every serving worker. One that has not taken it within
        SEND_TIMEOUT is hung (its channel is full): it is killed, and restarted."""
        for child in self.children:
            if child.link is None or not child.served:
                continue
            with trio.move_on_after(SEND_TIMEOUT) as timer:
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await child.link.send(message)  # else it is exiting: a restart starts anew
            if timer.cancelled_caught and child.process is not None:
                log.error("worker %d takes no messages: killing it", child.index)
                child.process.kill()

    def _broadcast_soon(self, message: Any) -> None:
        """`_broadcast` from synchronous code (once the server runs: before, no worker is)."""
        if self._nursery is not None:
            self._nursery.start_soon(self._broadcast, message)

    def _push_blocking(self) -> None:
        self._broadcast_soon(("blocking", self.blocking.export()))

    async def reload(self) -> bool:
        """Validate and load the config here; only if it is good, reload every worker
        and wait (at most RELOAD_TIMEOUT) until they have: then the new config serves."""
        if not await super().reload():
            return False
        if worker_count(self.config.server.workers) != self.workers:
            log.warning("reload: workers changed; restart to apply it (%d serve)", self.workers)
        await self._request(("reload",), RELOAD_TIMEOUT)
        return True

    async def _request(self, message: tuple[str], timeout: float) -> None:
        """Send ``message`` to every worker and wait for their answers (`Child.answered`)."""
        op = message[0]
        for child in self.children:
            child.answered[op] = trio.Event()
        await self._broadcast(message)
        with trio.move_on_after(timeout):
            for child in self.children:
                if child.link is not None and child.served:
                    await child.answered[op].wait()

    async def refresh_list(self, step: Any, index: int) -> str | None:
        problem = await super().refresh_list(step, index)
        await self._broadcast(("refresh", step.setup.index, index))
        return problem

    def flush(self) -> None:
        super().flush()
        self._broadcast_soon(("flush",))

    async def gather_metrics(self) -> None:
        """Ask every worker for its counters (waiting at most METRICS_TIMEOUT), then make
        ``stats`` and `step_metrics` their sums."""
        await self._request(("metrics",), METRICS_TIMEOUT)
        own = self.own_stats
        if self.stats is not own:  # what the supervisor counted since (a step's background
            for f in attrs.fields(Stats):  # failure) went to the sums: it is its own
                added = getattr(self.stats, f.name) - getattr(self._published, f.name)
                setattr(own, f.name, getattr(own, f.name) + added)
        merged = Stats(**attrs.asdict(own))
        for child in self.children:
            if child.latest is None:
                continue
            for name, value in child.latest[0].items():
                total = child.report.monotonic(("core", name), value, name != "tcp_connections")
                setattr(merged, name, getattr(merged, name) + int(total))
        self.stats, self._published = merged, attrs.evolve(merged)

    def step_metrics(self) -> list[tuple[Setup, list[Metric]]]:
        """Every step's metrics: the supervisor's own plus every worker's, summed."""
        out = []
        for step in self.chain.steps:
            setup = step.setup
            sums: dict[tuple[str, tuple[tuple[str, str], ...]], Metric] = {
                (m.name, m.labels): m for m in step.metrics()
            }
            for child in self.children:
                if child.latest is None:
                    continue
                for name, index, samples in child.latest[1]:
                    if (name, index) != (setup.name, setup.index):
                        continue
                    for m in samples:
                        key = (m.name, m.labels)
                        value = child.report.monotonic(
                            (index, name, *key), m.value, m.kind != "gauge"
                        )
                        have = sums.get(key)
                        sums[key] = attrs.evolve(m, value=value + (have.value if have else 0))
            out.append((setup, list(sums.values())))
        return out


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
