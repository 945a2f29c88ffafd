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
import pytest
import trio

from dnsproxy.errors import ConfigError
from dnsproxy.server import Server
from tests.fakeupstream import FakeUpstream

UPSTREAM_DELAY = 0.3
FORWARD = '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n'


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
        assert not server._client_inflight  # every in-flight share given back
        assert not [r for r in caplog.records if "internal error" in r.getMessage()]
        server.stop()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("max_tcp_per_client = 0", "option 'max_tcp_per_client': must be between 1"),
        ("max_inflight_per_client = 0", "option 'max_inflight_per_client': must be between 1"),
        ('max_inflight_per_client = "all"', "option 'max_inflight_per_client' must be an integer"),
        ("tcp_idle_timeout_min = 0", "option 'tcp_idle_timeout_min': must be between 0.1"),
    ],
)
def test_fairness_options_are_validated(tmp_path: Path, server: str, expected: str):
    path = tmp_path / "config.toml"
    path.write_text(f"[server]\n{server}\n{FORWARD}")
    with pytest.raises(ConfigError) as exc:
        Server(path, handle_signals=False)
    assert exc.value.lines[0].startswith(f"config.toml: server: {expected}"), exc.value.lines


@pytest.mark.parametrize(
    ("server", "share"),
    [
        ("", 1024),  # a quarter of the default 4096
        ("max_inflight = 20", 8),  # at least 8 ...
        ("max_inflight = 3", 3),  # ... but never more than max_inflight
        ("max_inflight = 100\nmax_inflight_per_client = 60", 60),
        ("max_inflight = 100\nmax_inflight_per_client = 500", 100),
    ],
)
def test_inflight_share_default(tmp_path: Path, server: str, share: int):
    path = tmp_path / "config.toml"
    path.write_text(f"[server]\n{server}\n{FORWARD}")
    assert Server(path, handle_signals=False).max_inflight_per_client == share
