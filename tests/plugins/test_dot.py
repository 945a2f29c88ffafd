"""The pipelined stream client (against in-memory fake servers) and the dot plugin's config."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import struct
from collections.abc import Callable
from pathlib import Path

import dns.message
import dns.rrset
import pytest
import trio
import trio.testing
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dnsproxy.plugins import dot

from dnsproxy import streamclient, wire
from dnsproxy.errors import ConfigError, UpstreamError
from dnsproxy.streamclient import PipelinedTcpUpstream, StreamClient
from dnsproxy.testing import make_setup
from dnsproxy.upstream import Request, UpstreamSpec
from tests.conftest import Nsd


def request(name: str) -> Request:
    key = wire.name_to_key(name)
    return Request(key + struct.pack("!HH", 1, 1), key, 1, 1)


def answer(query: bytes, address: str = "192.0.2.1", qname: str | None = None) -> bytes:
    msg = dns.message.from_wire(query)
    resp = dns.message.make_response(msg)
    name = qname or msg.question[0].name.to_text()
    if qname:
        resp.question = [dns.rrset.RRset(dns.name.from_text(qname), 1, 1)]
    resp.answer.append(dns.rrset.from_text(name, 60, "IN", "A", address))
    return resp.to_wire()


def address_of(reply: bytes) -> str:
    return dns.message.from_wire(reply).answer[0][0].address


class FakeServer:
    """DNS over an in-memory stream; ``handler`` gets each query and the server."""

    def __init__(self, nursery: trio.Nursery, handler: Callable[..., object]) -> None:
        self.nursery = nursery
        self.handler = handler
        self.streams: list[trio.abc.Stream] = []
        self.queries: list[bytes] = []
        self.eofs = 0
        self.fail: OSError | None = None
        self.attempts = 0

    async def connect(self) -> trio.abc.Stream:
        self.attempts += 1
        if self.fail is not None:
            raise self.fail
        client, server = trio.testing.memory_stream_pair()
        self.streams.append(server)
        self.nursery.start_soon(self._serve, server)
        return client

    async def _serve(self, stream: trio.abc.Stream) -> None:
        buf = bytearray()
        try:
            while True:
                frame = await streamclient.read_frame(stream, buf)
                if frame is None:
                    self.eofs += 1
                    return
                self.queries.append(frame)
                await self.handler(frame, stream, self)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.eofs += 1


async def send(stream: trio.abc.Stream, data: bytes) -> None:
    await stream.send_all(struct.pack("!H", len(data)) + data)


async def echo(frame: bytes, stream: trio.abc.Stream, server: FakeServer) -> None:
    await send(stream, answer(frame))


async def test_reply_padded_and_matched(nursery):
    server = FakeServer(nursery, echo)
    client = StreamClient("fake", server.connect, pad_block=128)
    reply = await client.exchange(request("www.example.test"))
    assert address_of(reply) == "192.0.2.1"
    assert len(server.queries[0]) % 128 == 0
    assert dns.message.from_wire(server.queries[0]).options[0].otype == 12
    client.close()


async def test_pipelined_out_of_order_on_one_connection(nursery):
    held: list[bytes] = []

    async def reverse(frame, stream, server):
        held.append(frame)
        if len(held) == 20:  # all 20 were written before any reply: answer last-first
            for q in reversed(held):
                name = dns.message.from_wire(q).question[0].name.to_text()
                await send(stream, answer(q, "192.0.2." + name.split(".")[0][1:]))

    server = FakeServer(nursery, reverse)
    client = StreamClient("fake", server.connect)
    results: dict[int, str] = {}

    async def ask(i: int) -> None:
        results[i] = address_of(await client.exchange(request(f"q{i}.example.test")))

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            for i in range(20):
                inner.start_soon(ask, i)
    assert results == {i: f"192.0.2.{i}" for i in range(20)}
    assert client.connects == 1 and len(server.streams) == 1
    ids = [struct.unpack_from("!H", q)[0] for q in server.queries]
    assert len(set(ids)) == 20
    client.close()


async def test_in_flight_id_never_reused(nursery, monkeypatch):
    ids = iter([7, 7, 7, 8])
    monkeypatch.setattr(streamclient, "new_id", lambda: next(ids))
    held: list[bytes] = []

    async def both(frame, stream, server):
        held.append(frame)
        if len(held) == 2:
            for q in held:
                await send(stream, answer(q))

    server = FakeServer(nursery, both)
    client = StreamClient("fake", server.connect)
    async with trio.open_nursery() as inner:
        inner.start_soon(client.exchange, request("a.example.test"))
        await trio.testing.wait_all_tasks_blocked()
        inner.start_soon(client.exchange, request("b.example.test"))
    assert [struct.unpack_from("!H", q)[0] for q in server.queries] == [7, 8]
    client.close()


async def test_reply_with_wrong_question_is_ignored(nursery):
    async def spoof_first(frame, stream, server):
        await send(stream, answer(frame, "203.0.113.66", qname="evil.example."))
        await send(stream, answer(frame, "192.0.2.7"))

    server = FakeServer(nursery, spoof_first)
    client = StreamClient("fake", server.connect)
    assert address_of(await client.exchange(request("www.example.test"))) == "192.0.2.7"
    client.close()


async def test_idle_close_and_reopen(nursery, autojump_clock):
    server = FakeServer(nursery, echo)
    client = StreamClient("fake", server.connect, idle_timeout=3)
    await client.exchange(request("www.example.test"))
    await trio.sleep(2)
    await client.exchange(request("www.example.test"))
    assert client.connects == 1
    await trio.sleep(3.5)
    assert server.eofs == 1  # closed by us after 3 s unused
    await client.exchange(request("www.example.test"))
    assert client.connects == 2
    client.close()


async def test_connect_failure_backs_off(nursery, autojump_clock):
    server = FakeServer(nursery, echo)
    server.fail = ConnectionRefusedError(111, "Connection refused")
    client = StreamClient("fake", server.connect, backoff_min=1, backoff_max=4)
    for expect_attempts, wait in ((1, 0.5), (1, 0.6), (2, 2.1), (3, 0)):
        with pytest.raises(UpstreamError, match="refused"):
            await client.exchange(request("www.example.test"))
        assert server.attempts == expect_attempts
        await trio.sleep(wait)
    server.fail = None
    await trio.sleep(4)
    assert address_of(await client.exchange(request("www.example.test"))) == "192.0.2.1"
    client.close()


async def test_server_close_in_flight_retried_once(nursery):
    async def close_first(frame, stream, server):
        if len(server.streams) == 1:
            await stream.aclose()
        else:
            await send(stream, answer(frame))

    server = FakeServer(nursery, close_first)
    client = StreamClient("fake", server.connect)
    assert address_of(await client.exchange(request("www.example.test"))) == "192.0.2.1"
    assert client.connects == 2


async def test_server_that_keeps_closing_fails_the_query(nursery):
    async def close_always(frame, stream, server):
        await stream.aclose()

    server = FakeServer(nursery, close_always)
    client = StreamClient("fake", server.connect)
    with pytest.raises(UpstreamError, match="closed by the server"):
        await client.exchange(request("www.example.test"))
    assert client.connects == 2


async def test_inflight_bound(nursery, autojump_clock):
    outstanding = 0
    peak = 0
    lock = trio.Lock()

    async def slow(frame, stream, server):
        nonlocal outstanding, peak
        outstanding += 1
        peak = max(peak, outstanding)

        async def later() -> None:
            nonlocal outstanding
            await trio.sleep(1)
            outstanding -= 1
            async with lock:
                await send(stream, answer(frame))

        server.nursery.start_soon(later)

    server = FakeServer(nursery, slow)
    client = StreamClient("fake", server.connect, max_inflight=2)
    async with trio.open_nursery() as inner:
        for i in range(5):
            inner.start_soon(client.exchange, request(f"q{i}.example.test"))
    assert len(server.queries) == 5 and peak == 2
    client.close()


async def test_silent_peer_is_dropped_after_a_timeout(nursery, autojump_clock):
    async def silent_first(frame, stream, server):
        if len(server.streams) > 1:
            await send(stream, answer(frame))

    server = FakeServer(nursery, silent_first)
    client = StreamClient("fake", server.connect)
    with trio.move_on_after(2):
        await client.exchange(request("www.example.test"))
    assert address_of(await client.exchange(request("www.example.test"))) == "192.0.2.1"
    assert client.connects == 2


async def test_server_that_stops_reading_is_dropped(nursery, autojump_clock):
    connections: list[trio.abc.Stream] = []

    async def chatter(stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:  # sends a frame now and then, never reads a query
                await send(stream, bytes(12))
                await trio.sleep(0.1)

    async def connect() -> trio.abc.Stream:
        client, server = trio.testing.lockstep_stream_pair()
        connections.append(server)
        nursery.start_soon(chatter, server)
        return client

    client = StreamClient("fake", connect, max_inflight=2)
    for _ in range(4):  # 1 stuck in the writer, 2 queued, the 4th finds the queue full
        with trio.move_on_after(1):
            await client.exchange(request("www.example.test"))
    assert client.connects == 2
    client.close()


async def test_unexpected_error_closes_only_the_connection():
    class Broken(trio.abc.Stream):
        async def send_all(self, data: bytes) -> None:
            await trio.sleep_forever()

        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            raise ValueError("bug")

        async def wait_send_all_might_not_block(self) -> None: ...

        async def send_eof(self) -> None: ...

        async def aclose(self) -> None: ...

    async def connect() -> trio.abc.Stream:
        return Broken()

    client = StreamClient("fake", connect)
    with pytest.raises(UpstreamError, match="internal error"):
        await client.exchange(request("www.example.test"))


async def test_close_ends_connection_and_refuses(nursery):
    server = FakeServer(nursery, echo)
    client = StreamClient("fake", server.connect)
    await client.exchange(request("www.example.test"))
    client.close()
    await trio.testing.wait_all_tasks_blocked()
    assert server.eofs == 1
    with pytest.raises(UpstreamError, match="closed"):
        await client.exchange(request("www.example.test"))


async def test_pipelined_tcp_against_nsd(nsd: Nsd):
    up = PipelinedTcpUpstream(nsd.host, nsd.port)
    replies: list[bytes] = []

    async def ask() -> None:
        replies.append(await up.exchange(request("www.example.test")))

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            for _ in range(30):
                inner.start_soon(ask)
    assert {address_of(r) for r in replies} == {"192.0.2.10"} and len(replies) == 30
    assert up.connects == 1 and up.name == f"tcp://{nsd.host}:{nsd.port}"
    up.close()


# --- the dot plugin's configuration -------------------------------------------------------


def make(table: dict | str, tmp_path: Path) -> StreamClient:
    setup = make_setup("forward", base_dir=tmp_path)
    return dot.make_dot(UpstreamSpec.parse(table), setup)


def test_defaults_and_name(tmp_path):
    up = make("tls://127.0.0.1", tmp_path)
    assert up.name == "tls://127.0.0.1:853" and up.pad_block == 128
    assert make("tls://[::1]:5853", tmp_path).name == "tls://[::1]:5853"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "tls://127.0.0.1", "sever_name": "x"}, "unknown option 'sever_name'"),
        ({"url": "tls://127.0.0.1", "ca_file": "missing.pem"}, "ca_file"),
        ({"url": "tls://127.0.0.1", "spki_pin": "nope!"}, "not base64"),
        ({"url": "tls://127.0.0.1", "spki_pin": "AAAA"}, "not a SHA-256"),
        ({"url": "tls://127.0.0.1", "max_inflight": 0}, "max_inflight"),
        ({"url": "tls://127.0.0.1", "idle_timeout": "forever"}, "idle_timeout"),
        ({"url": "tls://dns.example"}, "needs bootstrap"),
        ({"url": "tls://dns.example", "bootstrap": ["dns.google"]}, "not an IP address"),
        ("tls://127.0.0.1/path", "no path"),
    ],
)
def test_config_errors(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message) as info:
        make(table, tmp_path)
    assert all(line.startswith("test.toml: chain[0] (forward): ") for line in info.value.lines)


def test_relative_ca_file_and_bootstrap(tmp_path):
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    up = make(
        {"url": "tls://dns.example:5853", "ca_file": "ca.pem", "bootstrap": ["127.0.0.1"]},
        tmp_path,
    )
    assert up.name == "tls://dns.example:5853"


def test_spki_digest_matches_cryptography():
    cert = trustme.CA().issue_cert("localhost")
    pem = cert.cert_chain_pems[0].bytes()
    parsed = x509.load_pem_x509_certificate(pem)
    spki = parsed.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    der = parsed.public_bytes(serialization.Encoding.DER)
    assert dot.spki_digest(der) == hashlib.sha256(spki).digest()
    pin = "sha256/" + base64.b64encode(hashlib.sha256(spki).digest()).decode()
    assert dot.DotOptions(spki_pin=pin).spki_pin == (hashlib.sha256(spki).digest(),)
