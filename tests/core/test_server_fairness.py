"""The server in-process: what one client can take from the others, and tear-down races.

Counters and log records are read from the `Server` object directly; the fake upstream
runs in a thread. The same limits against the real process are in conformance/test_abuse.
"""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path

import dns.message
import trio

from dnsproxy.server import Server
from tests.fakeupstream import FakeUpstream

UPSTREAM_DELAY = 0.3


async def start(
    nursery: trio.Nursery, tmp_path: Path, forward: str, server: str = ""
) -> tuple[Server, tuple[str, int]]:
    """An in-process server forwarding with ``forward`` options; its TCP address."""
    path = tmp_path / "config.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:0"]\n{server}\n'
        f'[[chain]]\nplugin = "forward"\ntimeout = 2.0\n{forward}\n'
    )
    srv = Server(path, handle_signals=False)
    addrs = await nursery.start(srv.run)
    return srv, next((h, p) for kind, h, p in addrs if kind == "tcp")


def framed(msg: dns.message.Message) -> bytes:
    data = msg.to_wire()
    return struct.pack("!H", len(data)) + data


async def test_reset_connection_with_pending_queries_completes_quietly(tmp_path: Path, caplog):
    """Issue 22 item 11: queries pipelined on a connection the client resets while they
    wait on a slow upstream complete without an internal error, and every count returns
    to zero (no "Nursery is closed to new arrivals")."""
    caplog.set_level(logging.ERROR, logger="dnsproxy")
    async with trio.open_nursery() as nursery:
        up = FakeUpstream([{"delay": UPSTREAM_DELAY}])
        await nursery.start(up.run)
        server, (host, port) = await start(nursery, tmp_path, f'upstreams = ["{up.addr}"]')
        with trio.fail_after(10):
            for conn in range(8):
                stream = await trio.open_tcp_stream(host, port)
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                msgs = [dns.message.make_query(f"r{conn}-{i}.example.test", "A")
                        for i in range(40)]  # fmt: skip
                await stream.send_all(b"".join(framed(m) for m in msgs))
                await trio.sleep(0.02 * conn)  # resets at different points of the answers
                await stream.aclose()  # SO_LINGER 0: RST with the queries pending
            await trio.sleep(UPSTREAM_DELAY + 1.0)
            while server._inflight or server.stats.tcp_connections:
                await trio.sleep(0.05)
        assert len(up.seen) > 0
        assert server.stats.internal_errors == 0
        assert not [r for r in caplog.records if "internal error" in r.getMessage()]
        server.stop()
        nursery.cancel_scope.cancel()
