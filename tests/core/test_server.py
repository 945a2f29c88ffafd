"""The server in-process: listeners, ACL, error policy, bounds, TCP per RFC 7766, reload."""

from __future__ import annotations

import errno
import socket
import struct
from pathlib import Path

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import pytest
import trio
from dnsproxy.plugins.forward import loop

from dnsproxy.server import Server
from dnsproxy.testing import make_query

PLUGIN = Path(__file__).with_name("stepsplugin.py")


def write_config(tmp_path: Path, chain: str, server: str = "") -> Path:
    path = tmp_path / "config.toml"
    path.write_text(
        f'plugins = ["{PLUGIN}"]\n[server]\nlisten = ["127.0.0.1:0", "[::1]:0"]\n{server}\n{chain}'
    )
    return path


STATIC = '[[chain]]\nplugin = "static"\n'


async def start(nursery: trio.Nursery, path: Path) -> tuple[Server, dict[str, tuple[str, int]]]:
    server = Server(path, handle_signals=False)
    addrs = await nursery.start(server.run)
    found = {}
    for kind, host, port in addrs:
        found.setdefault(f"{kind}{'6' if ':' in host else '4'}", (host, port))
    return server, found


def at(addr: tuple[str, int]) -> dict[str, object]:
    return {"where": addr[0], "port": addr[1]}


def query(name: str = "example.org", rdtype: str = "A", **kw) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, **kw)


async def test_udp_and_tcp_on_ipv4_and_ipv6(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    with trio.fail_after(5):
        for key in ("udp4", "udp6"):
            host, port = addrs[key]
            r = await dns.asyncquery.udp(query("WwW.Example.org"), host, port=port, timeout=2)
            assert r.answer[0][0].address == "192.0.2.1"
            assert r.question[0].name.to_text() == "WwW.Example.org."
        for key in ("tcp4", "tcp6"):
            host, port = addrs[key]
            r = await dns.asyncquery.tcp(query(), host, port=port, timeout=2)
            assert r.answer[0][0].address == "192.0.2.1"
    server.stop()


async def test_large_answer_truncates_over_udp_and_is_whole_over_tcp(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    host, port = addrs["udp4"]
    with trio.fail_after(5):
        r = await dns.asyncquery.udp(query("big.example.org", "TXT"), host, port=port, timeout=2)
        assert r.flags & dns.flags.TC and not r.answer
        r = await dns.asyncquery.udp(
            query("big.example.org", "TXT", use_edns=0, payload=4096), host, port=port, timeout=2
        )
        assert r.flags & dns.flags.TC  # 1.5 kB > edns_udp_size 1232
        r = await dns.asyncquery.tcp(
            query("big.example.org", "TXT"), **at(addrs["tcp4"]), timeout=2
        )
        assert not r.flags & dns.flags.TC and len(r.answer[0]) == 16
    server.stop()


async def test_acl_refuses_with_ede_18(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC, 'allow = ["10.0.0.0/8"]'))
    with trio.fail_after(5):
        r = await dns.asyncquery.udp(query(use_edns=0), **at(addrs["udp4"]), timeout=2)
    assert r.rcode() == dns.rcode.REFUSED
    assert [o.code for o in r.options] == [18]
    assert server.stats.refused_acl == 1
    server.stop()


@pytest.mark.parametrize("plugin", ["boom", "later"])  # raising in query, or in begin
async def test_step_exception_is_servfail_and_server_keeps_serving(
    tmp_path, nursery, caplog, plugin
):
    path = write_config(
        tmp_path, f'[[chain]]\nplugin = "{plugin}"\nzones = ["boom.example.org"]\n' + STATIC
    )
    server, addrs = await start(nursery, path)
    with trio.fail_after(5):
        for _ in range(3):
            r = await dns.asyncquery.udp(query("boom.example.org"), **at(addrs["udp4"]), timeout=2)
            assert r.rcode() == dns.rcode.SERVFAIL
        r = await dns.asyncquery.udp(query("fine.example.org"), **at(addrs["udp4"]), timeout=2)
        assert r.rcode() == dns.rcode.NOERROR
    assert server.stats.step_errors == 3
    logged = [rec for rec in caplog.records if "step failed" in rec.getMessage()]
    assert len(logged) == 1 and f"chain[0] ({plugin})" in logged[0].getMessage()
    server.stop()


@pytest.mark.parametrize("plugin", ["slow", "later"])  # I/O in a task, or by callback
async def test_max_inflight_answers_servfail_beyond_the_bound(tmp_path, nursery, plugin):
    chain = f'[[chain]]\nplugin = "{plugin}"\ndelay = 0.5\n'
    path = write_config(tmp_path, chain, "max_inflight = 2")
    server, addrs = await start(nursery, path)
    results = []

    async def ask(i: int) -> None:
        r = await dns.asyncquery.udp(query(f"q{i}.example.org"), **at(addrs["udp4"]), timeout=3)
        results.append(r.rcode())

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for i in range(5):
                n.start_soon(ask, i)
                await trio.sleep(0.01)
    assert sorted(results) == [0, 0, 2, 2, 2]
    assert server.stats.servfail_overload == 3
    server.stop()


async def tcp_connect(addr):
    return await trio.open_tcp_stream(*addr)


async def read_message(stream: trio.SocketStream, buf: bytearray) -> dns.message.Message | None:
    while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    size = struct.unpack_from("!H", buf)[0]
    data = bytes(buf[2 : 2 + size])
    del buf[: 2 + size]
    return dns.message.from_wire(data)


def framed(msg: dns.message.Message) -> bytes:
    data = msg.to_wire()
    return struct.pack("!H", len(data)) + data


async def test_tcp_pipelined_queries_are_answered_out_of_order(tmp_path, nursery):
    path = write_config(
        tmp_path, '[[chain]]\nplugin = "slow"\ndelay = 0.5\nonly = "slow"\n' + STATIC
    )
    server, addrs = await start(nursery, path)
    slow, fast = query("slow.example.org"), query("fast.example.org")
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        await stream.send_all(framed(slow) + framed(fast))
        buf = bytearray()
        first = await read_message(stream, buf)
        second = await read_message(stream, buf)
    assert (first.id, second.id) == (fast.id, slow.id)
    assert second.answer[0][0].address == "192.0.2.99"
    await stream.aclose()
    server.stop()


async def test_many_queries_on_one_connection(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    msgs = [query(f"n{i}.example.org") for i in range(300)]
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        await stream.send_all(b"".join(framed(m) for m in msgs))
        buf = bytearray()
        got = {(await read_message(stream, buf)).id for _ in msgs}
    assert got == {m.id for m in msgs}
    await stream.aclose()
    server.stop()


async def test_tcp_messages_cut_anywhere_are_answered(tmp_path, nursery):
    """Messages arriving in pieces (a length split from its message, a piece holding the
    end of one and the start of the next) are put together."""
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    msgs = [query(f"n{i}.example.org") for i in range(4)]
    data = b"".join(framed(m) for m in msgs)
    cuts = [1, *range(2, len(data), 3), len(data)]  # 3 bytes at a time after the first
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        at_ = 0
        for cut in cuts:
            await stream.send_all(data[at_:cut])
            at_ = cut
            await trio.sleep(0.01)  # each piece read on its own
        buf = bytearray()
        got = {(await read_message(stream, buf)).id for _ in msgs}
    assert got == {m.id for m in msgs}
    await stream.aclose()
    server.stop()


class SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_tcp_answers_ready_at_once_cost_no_task_each(tmp_path, nursery):
    """Synchronous answers go through the connection's one writer, not a task per answer
    (a task, lock and scheduler round per answer made TCP cache hits ~10x dearer than UDP)."""
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    msgs = [query(f"n{i}.example.org") for i in range(100)]
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        buf = bytearray()
        await stream.send_all(framed(msgs[0]))  # the connection's own tasks are running
        assert (await read_message(stream, buf)).id == msgs[0].id
        counter = SpawnCounter()
        trio.lowlevel.add_instrument(counter)
        try:
            await stream.send_all(b"".join(framed(m) for m in msgs))
            got = {(await read_message(stream, buf)).id for _ in msgs}
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert got == {m.id for m in msgs}
    assert counter.spawned < 5  # was one per answer
    await stream.aclose()
    server.stop()


async def test_tcp_idle_timeout_is_reset_only_by_complete_messages(tmp_path, nursery):
    path = write_config(tmp_path, STATIC, "tcp_idle_timeout = 0.5")
    server, addrs = await start(nursery, path)
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        start_t = trio.current_time()
        data = framed(query())
        try:
            for b in data[:-1]:  # slowloris: one byte every 0.1 s never completes a message
                await stream.send_all(bytes([b]))
                await trio.sleep(0.1)
        except trio.BrokenResourceError:
            pass
        assert await stream.receive_some(100) == b""
        assert trio.current_time() - start_t < 1.5
    server.stop()


async def test_a_client_that_stops_reading_and_sending_is_reset(tmp_path, nursery):
    """Answers the client never reads fill the socket: after tcp_idle_timeout the writer
    gives up and the connection is reset, not closed with a FIN that would wait behind the
    answers the client does not read."""
    server, addrs = await start(nursery, write_config(tmp_path, STATIC, "tcp_idle_timeout = 0.5"))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(addrs["tcp4"])
    flood = b"".join(framed(query(f"n{i}.example.org", "TXT")) for i in range(5000))
    with trio.move_on_after(2):  # 7.5 MB of 1.5 kB answers: more than the sockets hold
        while flood:
            flood = flood[await sock.send(flood) :]
    with trio.fail_after(5):
        while server.stats.tcp_connections:
            await trio.sleep(0.05)
        with pytest.raises(ConnectionResetError):
            while await sock.recv(65536):
                pass
    sock.close()
    server.stop()


async def test_idle_connection_is_closed(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC, "tcp_idle_timeout = 0.3"))
    with trio.fail_after(3):
        stream = await tcp_connect(addrs["tcp4"])
        await stream.send_all(framed(query()))
        buf = bytearray()
        assert await read_message(stream, buf) is not None
        assert await read_message(stream, buf) is None  # closed after 0.3 s of idleness
    server.stop()


async def test_max_tcp_connections(tmp_path, nursery):
    path = write_config(tmp_path, STATIC, "max_tcp_connections = 2")
    server, addrs = await start(nursery, path)
    with trio.fail_after(5):
        keep = [await tcp_connect(addrs["tcp4"]) for _ in range(2)]
        await trio.sleep(0.1)
        extra = await tcp_connect(addrs["tcp4"])
        try:
            await extra.send_all(framed(query()))
            assert await extra.receive_some(100) == b""
        except trio.BrokenResourceError:
            pass
        assert server.stats.tcp_rejected >= 1
        r = await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2)  # UDP unaffected
        assert r.rcode() == 0
        for s in keep:
            await s.aclose()
    server.stop()


@pytest.mark.parametrize(
    "junk",
    [b"\x00\x00", b"\x00\x01x", b"\x00\x05hello", struct.pack("!H", 1024) + b"\x00" * 1024],
)
async def test_garbage_frames_then_a_valid_query(tmp_path, nursery, junk):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    q = query()
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        await stream.send_all(junk + framed(q))
        buf = bytearray()
        while True:
            r = await read_message(stream, buf)
            assert r is not None
            if r.id == q.id and r.rcode() == 0:
                break
    await stream.aclose()
    server.stop()


async def test_error_policy_over_udp(tmp_path, nursery):
    server, addrs = await start(nursery, write_config(tmp_path, STATIC))
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.connect(addrs["udp4"])
    two = dns.message.make_query("example.org", "A")
    two.question.append(two.question[0])
    with trio.fail_after(5):
        await sock.send(b"\x12\x34")  # too short: dropped
        await sock.send(two.to_wire())  # QDCOUNT=2: FORMERR
        r = dns.message.from_wire(await sock.recv(4096))
        assert r.id == two.id and r.rcode() == dns.rcode.FORMERR
        notify = dns.message.make_query("example.org", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        await sock.send(notify.to_wire())
        r = dns.message.from_wire(await sock.recv(4096))
        assert r.rcode() == dns.rcode.NOTIMP and r.opcode() == dns.opcode.NOTIFY
        v1 = dns.message.make_query("example.org", "A", use_edns=1)
        await sock.send(v1.to_wire())
        r = dns.message.from_wire(await sock.recv(4096))
        assert r.rcode() == dns.rcode.BADVERS and r.edns == 0
        resp = dns.message.make_response(query())
        await sock.send(resp.to_wire())  # QR=1: dropped, never answered
        ok = query()
        await sock.send(ok.to_wire())
        r = dns.message.from_wire(await sock.recv(4096))
        assert r.id == ok.id  # the next message answered is the good query
    assert server.stats.dropped == 2
    sock.close()
    server.stop()


FORWARD = '[[chain]]\nplugin = "forward"\nupstreams = ["192.0.2.53"]\n'


def loop_token(server: Server) -> bytes:
    return loop.loop_token(make_query("t.example.org"), server.chain.steps[0].loop_key)


async def test_servers_given_one_secret_make_one_loop_token_across_reloads(tmp_path, nursery):
    """Servers given one secret (the workers of one instance) make the same loop token,
    servers of their own secret each another; a reload keeps the secret."""
    path = write_config(tmp_path, FORWARD)
    one, two = (Server(path, handle_signals=False, secret=b"s" * 32) for _ in range(2))
    others = [Server(path, handle_signals=False) for _ in range(2)]
    assert loop_token(one) == loop_token(two)
    assert len({loop_token(one), *map(loop_token, others)}) == 3
    await nursery.start(one.run)
    step = one.chain.steps[0]
    path.write_text(path.read_text() + "timeout = 1.0\n")  # a changed step: a new one
    with trio.fail_after(5):
        assert await one.reload()
    assert one.chain.steps[0] is not step and loop_token(one) == loop_token(two)
    one.stop()


async def test_reload_swaps_chain_and_keeps_old_on_error(tmp_path, nursery):
    path = write_config(tmp_path, STATIC)
    server, addrs = await start(nursery, path)
    with trio.fail_after(5):
        path.write_text(path.read_text().replace(STATIC, STATIC + 'address = "192.0.2.7"\n'))
        assert await server.reload()
        r = await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2)
        assert r.answer[0][0].address == "192.0.2.7"
        path.write_text(path.read_text() + "bogus = 1\n")
        assert not await server.reload()
        r = await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2)
        assert r.answer[0][0].address == "192.0.2.7"
    server.stop()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_frozen_gc_frees_the_chain_a_reload_retires(tmp_path, nursery):
    """``dnsproxy run`` freezes long-lived objects out of the garbage collector; the old
    chain holds cycles, so a reload must collect it (not wait for the periodic refreeze)."""
    import gc
    import weakref

    path = write_config(tmp_path, '[[chain]]\nplugin = "slow"\ndelay = 0.2\n')
    server = Server(path, handle_signals=False, freeze_gc=True)
    try:
        addrs = {kind + host: (host, port) for kind, host, port in await nursery.start(server.run)}
        assert gc.get_freeze_count() > 0
        old = weakref.ref(server.chain)
        answered = []

        async def ask() -> None:
            r = await dns.asyncquery.udp(query(), **at(addrs["udp127.0.0.1"]), timeout=2)
            answered.append(r.rcode())

        with trio.fail_after(5):
            async with trio.open_nursery() as n:  # a query in flight across the reload
                n.start_soon(ask)
                await trio.sleep(0.05)
                assert await server.reload()
            while old() is not None:
                await trio.sleep(0.02)
        assert answered == [dns.rcode.NOERROR]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    server.stop()


class _Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_frozen_gc_still_frees_cycles_periodically(tmp_path, nursery, monkeypatch):
    import gc
    import weakref

    from dnsproxy import server as server_mod

    monkeypatch.setattr(server_mod, "GC_REFREEZE", 0.1)
    server = Server(write_config(tmp_path, STATIC), handle_signals=False, freeze_gc=True)
    junk = _Cycle()
    junk_ref = weakref.ref(junk)
    try:
        await nursery.start(server.run)
        assert gc.get_freeze_count() > 0
        del junk  # frozen with the rest at start-up, now garbage
        with trio.fail_after(5):
            while junk_ref() is not None:
                await trio.sleep(0.02)
    finally:
        gc.unfreeze()
    server.stop()


@pytest.mark.parametrize("plugin", ["slow", "later"])
async def test_stop_lets_in_flight_queries_finish(tmp_path, nursery, plugin):
    path = write_config(tmp_path, f'[[chain]]\nplugin = "{plugin}"\ndelay = 0.3\n')
    server, addrs = await start(nursery, path)
    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            result = []

            async def ask() -> None:
                result.append(await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2))

            n.start_soon(ask)
            while not server.stats.queries:  # the query is in the chain: in flight
                await trio.sleep(0.01)
            server.stop()
    assert result[0].answer[0][0].address == "192.0.2.99"


async def test_failing_background_work_does_not_stop_the_server(tmp_path, nursery, caplog):
    server, addrs = await start(
        nursery, write_config(tmp_path, '[[chain]]\nplugin = "crashy"\n' + STATIC)
    )
    with trio.fail_after(5):
        await trio.sleep(0.05)
        r = await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2)
    assert r.rcode() == 0
    assert server.stats.internal_errors == 1
    assert any(
        "chain[0] (crashy): background work failed" in rec.getMessage() for rec in caplog.records
    )
    server.stop()


async def test_max_tcp_pipeline_bounds_queries_in_progress(tmp_path, nursery):
    """With at most 2 queries outstanding per connection, 6 slow ones take 3 rounds."""
    path = write_config(
        tmp_path, '[[chain]]\nplugin = "slow"\ndelay = 0.3\n', "max_tcp_pipeline = 2"
    )
    server, addrs = await start(nursery, path)
    msgs = [query(f"q{i}.example.org") for i in range(6)]
    with trio.fail_after(5):
        stream = await tcp_connect(addrs["tcp4"])
        start_t = trio.current_time()
        await stream.send_all(b"".join(framed(m) for m in msgs))
        buf = bytearray()
        got = {(await read_message(stream, buf)).id for _ in msgs}
        took = trio.current_time() - start_t
    assert got == {m.id for m in msgs}
    assert 0.85 < took < 2.0  # 3 rounds of 0.3 s, not 1 (unbounded) or 6 (serial)
    await stream.aclose()
    server.stop()


class _FailingListener:
    """A listening socket whose ``accept`` fails as scripted: always readable (the fd of
    one end of a socket pair with a byte waiting), each ``accept`` raising the next error."""

    def __init__(self, errors: list[int]) -> None:
        self.pair = socket.socketpair()
        self.pair[1].send(b"x")
        self.errors = errors
        self.accepts: list[float] = []

    def fileno(self) -> int:
        return self.pair[0].fileno()

    def accept(self) -> tuple[socket.socket, tuple[str, int]]:
        self.accepts.append(trio.current_time())
        raise OSError(self.errors.pop(0), "scripted")


async def test_accept_skips_a_failed_connection_pauses_when_out_of_fds_else_raises(
    tmp_path, autojump_clock, caplog
):
    """One connection's failure (ECONNABORTED) costs nothing; running out of descriptors
    (EMFILE) pauses the listener 100 ms, not a busy loop; anything else is a bug, raised."""
    server = Server(write_config(tmp_path, STATIC), handle_signals=False)
    sock = _FailingListener([errno.ECONNABORTED, errno.EMFILE, errno.EINVAL])
    with pytest.raises(OSError) as exc:
        await server._tcp_accept(sock)  # type: ignore[arg-type]
    assert exc.value.errno == errno.EINVAL and sock.errors == []
    skipped, paused, raised = sock.accepts
    assert skipped == paused and raised - paused >= 0.1
    assert "tcp accept failed: scripted; pausing 100 ms" in caplog.text
    for s in sock.pair:
        s.close()
