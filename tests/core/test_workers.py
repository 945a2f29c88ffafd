"""``[server] workers``: the config key, the steering program (interpreted here, and run
by the kernel on a real reuseport group), and the supervisor's pieces that need no
processes (the `dnsproxy check` line, pause hand-over, counter merging, record replay)."""

from __future__ import annotations

import ipaddress
import os
import pickle
import signal
import socket
import struct
import sys
import time
from pathlib import Path

import dns.message
import pytest
import trio

from dnsproxy import cli, config, workers
from dnsproxy.blocking import Blocking
from dnsproxy.errors import ConfigError
from dnsproxy.reply import Reply, respond
from dnsproxy.service import Sockets
from dnsproxy.shared import SECRET_SIZE
from dnsproxy.wire import name_to_key, parse_query
from tests.conftest import free_port

HOSTS = '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.1 a.lan"]\n'


def server_config(tmp_path: Path, value: str, key: str = "workers") -> config.ServerConfig:
    path = tmp_path / "config.toml"
    path.write_text(f"[server]\n{key} = {value}\n")
    return config.server_table(path, config.read_toml(path))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", ': must be "auto" or between 1 and 256, got 0'),
        ("-2", ': must be "auto" or between 1 and 256, got -2'),
        ("257", ': must be "auto" or between 1 and 256, got 257'),
        ("1.5", " must be an integer or one of 'auto', got 1.5"),
        ('"two"', " must be an integer or one of 'auto', got 'two'"),
        ("true", " must be an integer or one of 'auto', got True"),
    ],
)
def test_bad_workers_values_are_config_errors(tmp_path, value, message):
    with pytest.raises(ConfigError) as exc:
        server_config(tmp_path, value)
    assert exc.value.lines == [f"config.toml: server: option 'workers'{message}"]


@pytest.mark.parametrize("value", ["99", "10000001"])
def test_worker_records_out_of_range_is_a_config_error(tmp_path, value):
    with pytest.raises(ConfigError) as exc:
        server_config(tmp_path, value, "worker_records")
    assert exc.value.lines == [
        f"config.toml: server: option 'worker_records': must be between 100 and 10000000,"
        f" got {value}"
    ]


def test_workers_default_auto_and_count(tmp_path):
    assert config.ServerConfig().workers == 1
    assert server_config(tmp_path, "3").workers == 3
    assert server_config(tmp_path, '"auto"').workers == "auto"
    assert config.worker_count("auto") == len(os.sched_getaffinity(0))
    assert config.worker_count(3) == 3


def test_workers_need_reuseport_steering(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "reuseport_steering", lambda: False)
    assert server_config(tmp_path, "1").workers == 1  # one process needs nothing
    with pytest.raises(ConfigError, match="'workers': 2 needs SO_REUSEPORT"):
        server_config(tmp_path, "2")


def run_cbpf(prog: list[workers.Instruction], network_header: bytes) -> int:
    """A classic-BPF interpreter for the instructions the program uses; loads at
    SKF_NET_OFF + k read ``network_header``."""
    a = x = 0
    for code, _jt, _jf, k in prog:
        if code == workers.BPF_LD_W_ABS:
            offset = (k - (workers.SKF_NET_OFF & 0xFFFFFFFF)) & 0xFFFFFFFF
            (a,) = struct.unpack_from("!I", network_header, offset)
        elif code == workers.BPF_TAX:
            x = a
        elif code == workers.BPF_XOR_X:
            a ^= x
        elif code == workers.BPF_MOD_K:
            a %= k
        elif code == workers.BPF_RET_A:
            return a
        else:
            raise AssertionError(f"unexpected instruction {code:#x}")
    raise AssertionError("no return")


def ipv4_header(src: str) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 17, 0,
                       ipaddress.IPv4Address(src).packed, bytes(4))  # fmt: skip


def ipv6_header(src: str) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, 8, 17, 64, ipaddress.IPv6Address(src).packed,
                       bytes(16))  # fmt: skip


@pytest.mark.parametrize("n", [2, 3, 7])
def test_program_is_the_source_address_modulo_n(n):
    v4 = workers.steering_program(socket.AF_INET, n)
    for last in range(256):
        src = f"192.0.2.{last}"
        assert run_cbpf(v4, ipv4_header(src)) == int(ipaddress.IPv4Address(src)) % n
    v6 = workers.steering_program(socket.AF_INET6, n)
    for last in range(256):
        src = ipaddress.IPv6Address(f"2001:db8::{last:x}:1")
        words = struct.unpack("!4I", src.packed)
        expected = (words[0] ^ words[1] ^ words[2] ^ words[3]) % n
        assert run_cbpf(v6, ipv6_header(str(src))) == expected


@pytest.mark.skipif(not config.reuseport_steering(), reason="needs Linux SO_REUSEPORT")
def test_kernel_steers_each_client_address_to_one_socket():
    """The program attached to a real group: 127.0.0.i always reaches socket i % 2,
    whatever its source port (UDP datagrams and TCP connections)."""
    addr = config.Address("127.0.0.1", free_port())
    udp = workers.bind_group(addr, "udp", 2)
    tcp = workers.bind_group(addr, "tcp", 2)
    try:
        for sock in udp:
            sock.settimeout(2)
        for i in range(1, 21):
            for _ in range(3):  # three source ports
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                    client.bind((f"127.0.0.{i}", 0))
                    client.sendto(b"x", (addr.host, addr.port))
                assert udp[i % 2].recvfrom(10)[1][0] == f"127.0.0.{i}"
                with socket.create_connection((addr.host, addr.port), 2, (f"127.0.0.{i}", 0)):
                    tcp[i % 2].setblocking(True)
                    conn, peer = tcp[i % 2].accept()
                    conn.close()
                    assert peer[0] == f"127.0.0.{i}"
        for sock in udp:  # nothing went to the other socket
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(10)
    finally:
        workers.close_groups([("udp", addr, udp), ("tcp", addr, tcp)])


def test_check_explains_the_choice(tmp_path, capsys):
    path = tmp_path / "config.toml"
    path.write_text("[server]\nworkers = 2\n" + HOSTS)
    assert cli.main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "workers = 2: 2 worker processes share each DNS listener (SO_REUSEPORT)," in out
    assert "steered by client address (classic BPF: one client, one worker); a supervisor" in out
    path.write_text(HOSTS)
    assert cli.main(["check", "-c", str(path)]) == 0
    assert "workers = 1: one process serves everything" in capsys.readouterr().out
    usable = len(os.sched_getaffinity(0))
    auto = workers.explain(config.ServerConfig(workers="auto"))
    assert auto.startswith(f"workers = 'auto' ({usable} usable CPUs): ")


async def test_pauses_move_to_another_process_as_time_left():
    here, there = Blocking(), Blocking()
    changes = []
    here.on_change = lambda: changes.append(here.generation)
    here.pause(30)
    here.pause_group("kids", None)
    assert changes == [1, 2]
    state = here.export()
    await trio.sleep(0)
    there.restore(state)
    assert not there.active()
    assert 29 < there.seconds_left() <= 30
    assert there.paused_for(frozenset({"kids"}))
    here.resume()
    here.resume_group("kids")
    there.restore(here.export())
    assert there.active() and not there.groups


def test_worker_counters_stay_monotonic_across_a_restart():
    report = workers.Report()
    assert report.monotonic(("core", "queries"), 5, True) == 5
    assert report.monotonic(("core", "queries"), 7, True) == 7
    assert report.monotonic(("core", "queries"), 2, True) == 9  # restarted at 0, counted 2
    assert report.monotonic(("core", "tcp_connections"), 4, False) == 4
    assert report.monotonic(("core", "tcp_connections"), 1, False) == 1  # a gauge may drop


def test_a_restart_adds_the_new_process_counts_to_the_old_ones():
    report = workers.Report()
    assert report.monotonic(("core", "queries"), 5, True) == 5
    report.restarted()
    assert report.monotonic(("core", "queries"), 9, True) == 14  # counted past 5 already
    assert report.monotonic(("core", "queries"), 10, True) == 15
    report.restarted()
    assert report.monotonic(("core", "tcp_connections"), 3, False) == 3  # gauges are as is
    assert report.monotonic(("core", "queries"), 1, True) == 16


async def test_a_scrape_while_a_restarted_worker_starts_keeps_its_old_counts(tmp_path):
    """Between a new process's start and its first report, /metrics still sums the old
    process's last one (a counter that went back would read as a reset); that first
    report then adds to it."""
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    child = supervisor.children[1]

    async def queries() -> int:
        await supervisor.gather_metrics()  # no worker has a link: nothing is waited for
        return supervisor.stats.queries

    child.started()  # its first process
    child.took(({"queries": 5}, []))
    assert await queries() == 5
    child.started()  # a new process, still loading its config
    assert await queries() == 5
    child.took(({"queries": 2}, []))
    assert await queries() == 7
    child.took(({"queries": 3}, []))
    assert await queries() == 8


async def test_what_the_supervisor_counts_between_scrapes_stays_counted(tmp_path):
    """A scrape makes ``stats`` the sums; the supervisor's own counts land there until
    the next scrape, which keeps them (they are not the workers')."""
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    supervisor.children[0].took(({"queries": 8, "internal_errors": 2}, []))
    await supervisor.gather_metrics()
    supervisor.stats.internal_errors += 1  # a step's background failure in the supervisor
    for _ in range(2):
        await supervisor.gather_metrics()
        assert (supervisor.stats.internal_errors, supervisor.stats.queries) == (3, 8)


async def test_a_scrape_waits_for_a_silent_worker_at_most_metrics_timeout(tmp_path, autojump_clock):
    """A worker that takes the request and never answers: after METRICS_TIMEOUT its last
    report is summed."""
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    asked = []

    class Silent:
        async def send(self, message: object) -> None:
            asked.append(message)

    child = supervisor.children[0]
    child.link, child.served = Silent(), True
    child.took(({"queries": 4}, []))
    start = trio.current_time()
    with trio.fail_after(60):
        await supervisor.gather_metrics()
    assert trio.current_time() - start == pytest.approx(workers.METRICS_TIMEOUT)
    assert asked == [("metrics",)] and supervisor.stats.queries == 4


def test_a_record_replays_as_the_worker_observed_it():
    q = dns.message.make_query("Printer.LAN", "AAAA")
    reply = Reply(b"\x00" * 12, ede=((18, "x"),), source="hosts")
    record = (q.to_wire(), ("127.0.0.9", 5300), "tcp", "kid", {"list": "l"},
              reply.wire, reply.source, reply.ede, reply.blocked, 0.25)  # fmt: skip
    seen = workers.replay(record)
    assert seen is not None
    got, got_reply, elapsed = seen
    assert (got.client, got.transport, got.client_id, got.notes) == (
        ("127.0.0.9", 5300),
        "tcp",
        "kid",
        {"list": "l"},
    )
    assert (got.qtype, got.key) == (28, name_to_key("printer.lan"))
    assert got_reply is not None and (got_reply.source, got_reply.ede) == ("hosts", ((18, "x"),))
    assert not got_reply.blocked  # EDE 18 (Prohibited) is not a block
    assert elapsed == 0.25
    dropped = workers.replay((*record[:5], None, "", (), False, 0.1))
    assert dropped is not None and dropped[1] is None
    assert workers.replay((b"\x00", *record[1:])) is None  # not a query: nothing to observe


@pytest.mark.parametrize(
    ("ede", "blocked", "counted"),
    [((), True, True), (((17, "quiet hours"),), None, True), (((3, "stale"),), None, False)],
)
def test_a_record_keeps_whether_the_reply_counts_as_blocked(ede, blocked, counted):
    """A step may say ``blocked=True`` without an EDE: the supervisor's observers (query
    log, /metrics) see the flag the worker's reply had."""
    q = parse_query(dns.message.make_query("x.test", "A").to_wire(), ("127.0.0.1", 5300), "udp")
    reply = respond(q, 3, ede=ede, source="policy", blocked=blocked)
    seen = workers.replay(pickle.loads(pickle.dumps(workers.record(q, reply, 0.1))))
    assert seen is not None and seen[1] is not None
    assert (seen[1].blocked, seen[1].ede) == (counted, ede)


def test_a_record_carries_notes_as_the_query_log_text():
    """Notes may hold objects (a blocklist's list, a lazy rule): the record holds their
    text, and a list note names its rule, as the query log's writer would."""

    class ListNote(str):  # as the blocklist's: a str that knows its list
        def rule_for(self, q) -> str:
            return f"||{q.qname.decode()}^"

    class LazyRule:
        def __str__(self) -> str:
            return "rule text"

    wire_q = dns.message.make_query("ads.test", "A").to_wire()
    q = parse_query(wire_q, ("127.0.0.1", 5300), "udp")
    q.notes = {"list": ListNote("ads.txt"), "cache": "miss"}
    rec = workers.record(q, None, 0.5)
    assert rec[4] == {"list": "ads.txt", "cache": "miss", "rule": f"||{q.qname.decode()}^"}
    assert rec[5] is None
    q.notes = {"list": ListNote("ads.txt"), "rule": LazyRule()}
    assert workers.record(q, None, 0.5)[4] == {"list": "ads.txt", "rule": "rule text"}
    assert pickle.loads(pickle.dumps(workers.record(q, None, 0.5))) == workers.record(q, None, 0.5)


async def test_a_user_who_cannot_run_the_interpreter_is_a_config_error(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    monkeypatch.setattr(workers.os, "access", lambda p, mode: p != sys.executable)
    supervisor = workers.Supervisor(path, handle_signals=False)
    with pytest.raises(ConfigError, match=r"server: workers: this user \(uid \d+\) cannot run"):
        await supervisor.run()


async def test_a_worker_that_takes_no_message_is_killed_not_waited_for(tmp_path, autojump_clock):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    killed, got = [], []

    class Hung:
        async def send(self, message: object) -> None:
            await trio.sleep_forever()

    class Taking:
        async def send(self, message: object) -> None:
            got.append(message)

    class Process:
        def kill(self) -> None:
            killed.append(True)

    hung, taking = supervisor.children
    hung.link, hung.served, hung.process = Hung(), True, Process()
    taking.link, taking.served = Taking(), True
    start = trio.current_time()
    await supervisor._broadcast(("flush",))
    assert trio.current_time() - start == pytest.approx(workers.SEND_TIMEOUT)
    assert killed == [True] and got == [("flush",)]


async def test_a_worker_that_ignores_sigterm_is_killed_after_stop_timeout(
    tmp_path, autojump_clock, caplog
):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    signals: list[str] = []

    class Process:
        returncode: int | None = None

        def send_signal(self, signum: int) -> None:
            signals.append(signal.Signals(signum).name)

        async def wait(self) -> int:
            await trio.sleep_forever()
            return 0

        def kill(self) -> None:
            signals.append("kill")

    supervisor.children[0].process = Process()
    supervisor.stop()
    start = trio.current_time()
    with trio.fail_after(60):
        await supervisor._stop_workers()
    assert trio.current_time() - start == pytest.approx(workers.STOP_TIMEOUT)
    assert signals == ["SIGTERM", "kill"] and supervisor._stop.is_set()
    assert "worker 0 did not stop in 4 s: killed" in caplog.text


async def test_a_worker_that_cannot_be_started_leaves_no_channel_open(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworkers = 2\n' + HOSTS)
    supervisor = workers.Supervisor(path, handle_signals=False)
    supervisor.groups = []
    pairs, real = [], socket.socketpair

    def socketpair(*args: int) -> tuple[socket.socket, socket.socket]:
        pairs.append(real(*args))
        return pairs[-1]

    async def refused(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(workers.socket, "socketpair", socketpair)
    monkeypatch.setattr(workers.trio.lowlevel, "open_process", refused)
    with pytest.raises(PermissionError):
        await supervisor._run_worker(supervisor.children[0], trio.TASK_STATUS_IGNORED)
    assert [sock.fileno() for sock in pairs[0]] == [-1, -1]


def test_a_dns_listener_passed_by_socket_activation_is_a_config_error(tmp_path):
    port = free_port()
    sc = config.ServerConfig(listen=[f"127.0.0.1:{port}"], workers=2)
    passed = Sockets()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", port))
    passed.add("udp", sock)
    try:
        with pytest.raises(ConfigError, match="is passed by socket activation, but workers > 1"):
            workers.bind_groups("config.toml", sc, passed)
    finally:
        passed.close_all()


def test_a_listener_that_cannot_be_bound_is_a_config_error_and_nothing_stays_bound():
    """The second listener's TCP port is taken: a ConfigError naming it, and the groups
    already bound (the first listener's, the second's UDP) are closed."""
    first, second = free_port(), free_port()
    sc = config.ServerConfig(listen=[f"127.0.0.1:{first}", f"127.0.0.1:{second}"], workers=2)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", second))
        taken.listen()
        with pytest.raises(ConfigError) as exc:
            workers.bind_groups("config.toml", sc, Sockets())
    assert exc.value.lines == [
        f"config.toml: server: listen: cannot bind tcp 127.0.0.1:{second}: Address already in use"
    ]
    for port in (first, second):  # sockets without SO_REUSEADDR: free only if all closed
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            with socket.socket(socket.AF_INET, kind) as sock:
                sock.bind(("127.0.0.1", port))


def test_a_worker_holds_at_most_worker_records_records(tmp_path):
    """A supervisor that does not read: the worker drops (and counts) beyond the bound."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworker_records = 100\n' + HOSTS
    )
    ours, theirs = socket.socketpair()
    try:
        worker = workers.Worker(path, 0, theirs, handle_signals=False)
        q = parse_query(dns.message.make_query("a.lan", "A").to_wire(), ("127.0.0.1", 1), "udp")
        for _ in range(102):
            worker._record(q, None, 0.1)
        assert len(worker.records) == 100 and worker.records_dropped == 2
    finally:
        ours.close()
        theirs.close()


async def test_a_worker_logs_the_records_it_dropped_or_cannot_send(tmp_path, caplog):
    """Beyond ``worker_records``: counted, then one warning at the next batch; a batch a
    plugin's value makes unpicklable: logged and left, the channel still usable."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nworker_records = 100\n' + HOSTS
    )
    ours, theirs = socket.socketpair()
    worker = workers.Worker(path, 0, theirs, handle_signals=False)
    supervisor = workers.Link(ours)
    q = parse_query(dns.message.make_query("a.lan", "A").to_wire(), ("127.0.0.1", 1), "udp")

    class PluginText(str):  # a class pickle cannot find by name
        pass

    for _ in range(102):
        worker._record(q, None, 0.1)
    await worker._flush_records()
    worker._record(q, Reply(q.data, ede=[(15, PluginText("why"))]), 0.1)
    await worker._flush_records()
    worker._record(q, None, 0.1)
    await worker._flush_records()
    with trio.fail_after(5):
        assert [len((await supervisor.receive())[1]) for _ in range(2)] == [100, 1]
    messages = [r.getMessage() for r in caplog.records if r.name == "dnsproxy"]
    assert messages[0] == "2 query records dropped: the supervisor is not keeping up"
    assert messages[1].startswith("1 query records not sent to the supervisor: ")
    assert len(messages) == 2 and worker.records == [] and worker.records_dropped == 0
    await supervisor.aclose()
    await worker.link.aclose()


async def test_a_worker_sends_no_records_when_the_supervisor_observes_nothing(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n' + HOSTS)
    ours, theirs = socket.socketpair()
    worker = workers.Worker(path, 0, theirs, handle_signals=False)
    worker._collect_observers()
    assert worker._observers == (worker._record,)  # until told otherwise
    supervisor = workers.Link(ours)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker._listen_to_supervisor, nursery)
        await supervisor.send(("observed", False))
        with trio.fail_after(5):
            while worker._observers:
                await trio.sleep(0.01)
        await supervisor.aclose()  # the supervisor going away stops the worker
    assert worker._stop.is_set()


@pytest.mark.skipif(not config.reuseport_steering(), reason="needs Linux SO_REUSEPORT")
def test_kernel_runs_the_ipv6_program():
    """::1 (words 0, 0, 0, 1: XOR 1) always reaches socket 1 of a group of 2."""
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    addr = config.Address("::1", port)
    udp = workers.bind_group(addr, "udp", 2)
    try:
        udp[1].settimeout(2)
        for _ in range(5):
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
                client.sendto(b"x", ("::1", port))
            assert udp[1].recvfrom(10)[1][0] == "::1"
        udp[0].setblocking(False)
        with pytest.raises(BlockingIOError):
            udp[0].recv(10)
    finally:
        workers.close_groups([("udp", addr, udp)])


async def test_a_worker_carries_out_each_supervisor_request(tmp_path):
    """The control channel, worker end: "ready" once serving; "blocking" takes the
    supervisor's pauses; "metrics" and "reload" are answered (the reload done first);
    "flush" flushes; the channel closing stops it."""
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n' + HOSTS)
    ours, theirs = socket.socketpair()
    worker = workers.Worker(path, 0, theirs, handle_signals=False)
    flushed = []
    worker.flush = lambda: flushed.append(True)  # type: ignore[method-assign]
    supervisor = workers.Link(ours)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            assert await supervisor.receive() == ("ready", os.getpid())
            paused = Blocking()
            paused.pause(60)
            await supervisor.send(("blocking", paused.export()))
            await supervisor.send(("metrics",))
            op, (stats, steps) = await supervisor.receive()
            assert op == "metrics" and not worker.blocking.active()  # taken in order
            assert stats["queries"] == 0 and [(n, i) for n, i, _ in steps] == [("hosts", 0)]
            await supervisor.send(("flush",))
            old = worker.chain
            await supervisor.send(("reload",))
            assert await supervisor.receive() == ("reload",)
            assert flushed == [True] and worker.chain is not old
            await supervisor.aclose()
    assert worker._stop.is_set()


async def test_a_worker_reads_exactly_the_secret_before_the_channel():
    """The supervisor's secret comes first on the channel (here in two pieces); the
    worker takes exactly those bytes, and the channel's messages follow intact."""
    ours, theirs = socket.socketpair()
    secret = os.urandom(SECRET_SIZE)
    ours.sendall(secret[:5])
    ours.sendall(secret[5:])
    supervisor = workers.Link(ours)
    await supervisor.send(("ready", 1))
    assert workers.receive_secret(theirs) == secret
    worker = workers.Link(theirs)
    with trio.fail_after(5):
        assert await worker.receive() == ("ready", 1)
    await supervisor.aclose()
    await worker.aclose()


@pytest.mark.parametrize("sent", [b"", b"short"])
def test_a_worker_waits_for_its_secret_at_most_secret_timeout(monkeypatch, sent):
    """No secret, or part of one: None after SECRET_TIMEOUT (the worker exits with 1);
    a channel closed before the whole secret came: None at once."""
    monkeypatch.setattr(workers, "SECRET_TIMEOUT", 0.2)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.sendall(sent)
        began = time.monotonic()
        assert workers.receive_secret(theirs) is None
        assert 0.19 <= time.monotonic() - began < 2
        ours.sendall(sent)
        ours.shutdown(socket.SHUT_WR)
        began = time.monotonic()
        assert workers.receive_secret(theirs) is None
        assert time.monotonic() - began < 0.1
