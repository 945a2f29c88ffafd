"""The taskless UDP client: matching, timeouts, errors, bounds, and the end of a run."""

from __future__ import annotations

import gc
import socket
import struct
import weakref

import pytest
import trio

from dnsproxy import wire
from dnsproxy.errors import UpstreamError
from dnsproxy.udpclient import SelectorSet, UdpExchanges, UdpUpstream, exchanges
from dnsproxy.upstream import UPSTREAM_UDP_SIZE, Request, matches

NAME = b"\x03www\x07example\x03org\x00"
OTHER = b"\x03www\x07example\x03net\x00"  # as long as NAME


def request(name: bytes = NAME) -> Request:
    return Request(name + b"\x00\x01\x00\x01", name.lower(), 1, 1)


TRUTH = bytes([192, 0, 2, 1])


def answer_to(
    query: bytes,
    *,
    msg_id: int | None = None,
    flags: int = 0x8180,
    question: bytes | None = None,
    address: bytes = TRUTH,
) -> bytes:
    """A response echoing ``query``'s ID and question (or ``msg_id``, ``question``) with one
    A record for ``address``; its length is the truth's whatever is changed."""
    rid = struct.unpack_from("!H", query)[0] if msg_id is None else msg_id
    if question is None:
        question = query[12 : 12 + len(NAME) + 4]
    record = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + address
    return wire.HEADER.pack(rid, flags, 1, 1, 0, 0) + question + record


class Upstream:
    """A UDP server on loopback that answers per ``mode``."""

    def __init__(self, mode: str = "answer") -> None:
        self.sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.other = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a wrong port
        self.mode = mode
        self.ports: list[int] = []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.sock.bind(("127.0.0.1", 0))
        await self.other.bind(("127.0.0.1", 0))
        task_status.started()
        while True:
            data, addr = await self.sock.recvfrom(65535)
            self.ports.append(addr[1])
            if self.mode == "silent":
                continue
            if self.mode == "liar":  # lies wrong in one way each, then the real answer
                wrong_id = (struct.unpack_from("!H", data)[0] + 1) % 65536
                for lie in (
                    answer_to(data, msg_id=wrong_id, address=b"\x06\x06\x06\x01"),
                    answer_to(
                        data, question=OTHER + b"\x00\x01\x00\x01", address=b"\x06\x06\x06\x02"
                    ),
                    answer_to(
                        data, question=NAME + b"\x00\x1c\x00\x01", address=b"\x06\x06\x06\x03"
                    ),
                    answer_to(data, flags=0x0180, address=b"\x06\x06\x06\x04"),  # QR=0
                ):
                    await self.sock.sendto(lie, addr)
                await self.other.sendto(answer_to(data, address=b"\x06\x06\x06\x05"), addr)
                await trio.sleep(0.02)  # the lie from the other port arrives first
            await self.sock.sendto(answer_to(data), addr)

    @property
    def addr(self) -> tuple[str, int]:
        return self.sock.getsockname()


async def ask(up: tuple[str, int], deadline_in: float = 2.0, table: UdpExchanges | None = None):
    """One exchange; returns (reply, error)."""
    result: list[tuple[bytes | None, str]] = []
    arrived = trio.Event()

    def done(data: bytes | None, err: str) -> None:
        result.append((data, err))
        arrived.set()

    (table or exchanges()).send(
        up, socket.AF_INET, request(), trio.current_time() + deadline_in, done
    )
    await arrived.wait()
    assert len(result) == 1
    return result[0]


async def test_answer_arrives_after_lies_are_ignored(nursery):
    up = Upstream("liar")
    await nursery.start(up.run)
    data, err = await ask(up.addr)
    assert err == "" and data == answer_to(data)  # the truth, not one of the lies
    assert exchanges()._pending == {}  # the socket is closed and forgotten


def _qdcount(data: bytes, qd: int) -> bytes:
    return data[:4] + struct.pack("!H", qd) + data[6:]


@pytest.mark.parametrize(
    ("change", "matched"),
    [
        (lambda a: a, True),
        (lambda a: a[:2] + b"\x85" + a[3:], True),  # AA and RD: flags beside QR and opcode
        (lambda a: a[:2] + b"\x89" + a[3:], False),  # opcode 1 (IQUERY) in a response
        (lambda a: a[:2] + b"\xa9" + a[3:], False),  # opcode 5 (UPDATE)
        (lambda a: _qdcount(a, 0), False),
        (lambda a: _qdcount(a, 2), False),
        (lambda a: a[: 12 + len(NAME) + 2], False),  # cut inside the question's type
        (lambda a: a[: 12 + len(NAME) - 3], False),  # cut inside the name
        (lambda a: a[:11], False),  # shorter than a header
    ],
)
def test_matches_takes_only_a_standard_response_to_the_question(change, matched):
    """RFC 5452 §9.1: ID, question, and a response (QR) of opcode QUERY with one question;
    a message cut short never matches."""
    req = request()
    truth = answer_to(struct.pack("!H", 7) + b"\x00" * 10 + req.question)
    assert matches(change(truth), 7, req) is matched


@pytest.mark.parametrize("do", [False, True])
@pytest.mark.parametrize("options", [b"", wire.edns_option(65053, b"t" * 8)])
@pytest.mark.parametrize("pad_block", [0, 128])
def test_a_request_on_the_wire_is_the_question_and_its_opt(do, options, pad_block):
    """`Request.to_wire` packs the OPT record itself (no `wire.opt_record` call per
    query): the same bytes, padded to the block when asked (RFC 7830/8467)."""
    req = Request(
        NAME + b"\x00\x01\x00\x01", NAME, 1, 1, wire.RD | wire.CD | wire.AD, do, True, options
    )
    out = req.to_wire(0x1234, pad_block=pad_block)
    head = wire.HEADER.pack(0x1234, wire.RD | wire.CD, 1, 0, 0, 1) + req.question
    if pad_block:
        pad = -(len(head) + 11 + len(options) + 4) % pad_block
        options += wire.edns_option(wire.PADDING_OPTION, b"\x00" * pad)
        assert len(out) % pad_block == 0
    assert out == head + wire.opt_record(UPSTREAM_UDP_SIZE, do, options)
    plain = Request(req.question, NAME, 1, 1, wire.RD, do, False, options)
    assert (
        plain.to_wire(9, pad_block=pad_block)
        == wire.HEADER.pack(9, wire.RD, 1, 0, 0, 0) + NAME + b"\x00\x01\x00\x01"
    )


async def test_silent_upstream_times_out_at_the_deadline(nursery, autojump_clock):
    up = Upstream("silent")
    await nursery.start(up.run)
    start = trio.current_time()
    data, err = await ask(up.addr, deadline_in=1.5)
    assert (data, err) == (None, "timeout")
    assert 1.5 <= trio.current_time() - start < 1.6


async def test_a_later_exchange_with_an_earlier_deadline_is_not_held_up(nursery, autojump_clock):
    up = Upstream("silent")
    await nursery.start(up.run)
    finished: dict[str, float] = {}

    async def one(label: str, deadline_in: float) -> None:
        await ask(up.addr, deadline_in)
        finished[label] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as n:
        n.start_soon(one, "long", 5.0)
        await trio.sleep(0.1)
        n.start_soon(one, "short", 0.5)
    assert finished["short"] - start < 0.7
    assert finished["long"] - start >= 5.0


async def test_a_reused_fd_is_not_timed_out_by_its_previous_exchange(nursery, autojump_clock):
    """The deadline heap keeps (deadline, fd) pairs: when a finished exchange's fd is
    reused by a later one, the stale entry's deadline must not time the new one out."""
    # Sockets earlier tests left to the garbage collector would free lower fds while this
    # one waits, and the reusing exchange would take one of them instead.
    gc.collect()
    answering, silent = Upstream(), Upstream("silent")
    await nursery.start(answering.run)
    await nursery.start(silent.run)
    table = UdpExchanges()
    outcomes: dict[str, tuple[bytes | None, str]] = {}

    def send(label: str, addr: tuple[str, int], deadline_in: float) -> None:
        def done(data: bytes | None, err: str) -> None:
            outcomes[label] = (data, err)

        table.send(addr, socket.AF_INET, request(), start + deadline_in, done)

    start = trio.current_time()
    send("first", silent.addr, 0.5)  # the top of the heap while the next one finishes
    send("answered", answering.addr, 1.0)
    (reused,) = set(table._pending) - {min(table._pending)}
    while "answered" not in outcomes:
        await trio.sleep(0.01)
    send("reusing", silent.addr, 3.0)
    assert reused in table._pending  # the answered one's fd, its entry still in the heap
    await trio.sleep(1.5 - (trio.current_time() - start))  # past both earlier deadlines
    assert outcomes["first"] == (None, "timeout") and "reusing" not in outcomes
    await trio.sleep(2.0)
    assert outcomes["reusing"] == (None, "timeout")
    assert len(table._deadlines) == 0


async def test_a_finished_exchange_is_released_at_once(nursery):
    """Nothing of a finished exchange lingers in the deadline heap (its request, its
    callback): memory and garbage-collector work per query stay flat."""
    up = Upstream()
    await nursery.start(up.run)
    table = UdpExchanges()
    req = request()
    arrived = trio.Event()
    table.send(up.addr, socket.AF_INET, req, trio.current_time() + 60, lambda *a: arrived.set())
    await arrived.wait()
    gone = weakref.ref(req)
    del req
    assert gone() is None and len(table._deadlines) == 0


async def test_closed_port_is_connection_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        addr = s.getsockname()
    with trio.fail_after(2):
        data, err = await ask(addr)
    assert (data, err) == (None, "connection refused")


async def test_send_error_is_reported_before_send_returns():
    outcomes: list[tuple[bytes | None, str]] = []
    # An IPv6 address on an IPv4 socket: connect() fails at once.
    exchanges().send(
        ("::1", 53),
        socket.AF_INET,
        request(),
        trio.current_time() + 1,
        lambda *a: outcomes.append(a),
    )
    assert len(outcomes) == 1 and outcomes[0][0] is None and outcomes[0][1]
    assert exchanges()._pending == {}


async def test_concurrent_exchanges_use_different_fresh_ports(nursery):
    up = Upstream()
    await nursery.start(up.run)
    async with trio.open_nursery() as n:
        for _ in range(50):
            n.start_soon(ask, up.addr)
    assert len(set(up.ports)) == 50


async def test_finished_deadlines_do_not_pile_up(nursery):
    up = Upstream()
    await nursery.start(up.run)
    table = UdpExchanges()
    for _ in range(1500):
        await ask(up.addr, deadline_in=60, table=table)
    assert len(table._deadlines) <= 1024 + 1


async def test_finished_deadlines_are_dropped_at_the_next_timeout(nursery):
    """While one exchange stays in flight the reader never goes idle, and the entries of
    finished exchanges with later deadlines are not at the top for `_live_top` to pop:
    the next timeout drops them all in one go."""
    up, silent = Upstream(), Upstream("silent")
    await nursery.start(up.run)
    await nursery.start(silent.run)
    table = UdpExchanges()
    outcomes: list[tuple[bytes | None, str]] = []
    now = trio.current_time()
    table.send(silent.addr, socket.AF_INET, request(), now + 100, lambda *a: None)  # held
    for _ in range(1100):  # more than the 1024 stale entries the heap may keep
        await ask(up.addr, deadline_in=200, table=table)
    assert len(table._deadlines) == 1 + 1100  # all stale but the top's
    table.send(silent.addr, socket.AF_INET, request(), now, lambda *a: outcomes.append(a))
    while not outcomes:
        await trio.sleep(0.01)
    assert outcomes == [(None, "timeout")]
    assert len(table._deadlines) == len(table._pending) == 1


async def test_selector_fallback_works_the_same(nursery):
    up = Upstream("liar")
    await nursery.start(up.run)
    data, err = await ask(up.addr, table=UdpExchanges(SelectorSet()))
    assert err == "" and data == answer_to(data)


async def test_async_exchange_raises_upstream_error(nursery):
    silent = Upstream("silent")
    await nursery.start(silent.run)
    up = UdpUpstream(*silent.addr, tcp=None)  # type: ignore[arg-type]
    with trio.move_on_after(0.2) as cs:
        await up.exchange(request())
    assert cs.cancelled_caught
    answering = Upstream()
    await nursery.start(answering.run)
    assert await UdpUpstream(*answering.addr, tcp=None).exchange(request())  # type: ignore[arg-type]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()
    with pytest.raises(UpstreamError, match="refused"):
        await UdpUpstream(*closed, tcp=None).exchange(request())  # type: ignore[arg-type]


def test_end_of_run_answers_every_waiting_caller():
    """A run that ends with exchanges in flight tells their callers, and refuses new ones
    (a caller that fails over on "shutting down" must not start another exchange)."""
    outcomes: list[str] = []
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))

    async def main() -> None:
        table = exchanges()

        def done(data: bytes | None, err: str) -> None:
            outcomes.append(err)
            if len(outcomes) == 1:  # fail over, as forward would
                table.send(silent.getsockname(), socket.AF_INET, request(), 1e9, done)

        table.send(silent.getsockname(), socket.AF_INET, request(), trio.current_time() + 60, done)
        await trio.sleep(0.05)

    trio.run(main)
    silent.close()
    assert outcomes == ["shutting down", "shutting down"]
