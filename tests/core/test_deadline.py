"""The step deadline: a step whose I/O never ends costs its queries a SERVFAIL with EDE 22
after ``deadline`` seconds, is counted and logged once, and gives back its in-flight slot."""

from __future__ import annotations

import logging

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import pytest
import trio

from dnsproxy.errors import ConfigError
from dnsproxy.loader import build_chain, load
from dnsproxy.reply import EDE_NO_REACHABLE_AUTHORITY
from dnsproxy.server import Server, _Deadlines
from dnsproxy.testing import make_query
from tests.core.test_server import start, write_config

HUNG = '[[chain]]\nplugin = "{plugin}"\ndeadline = "300ms"\n'


def edes(msg: dns.message.Message) -> list[tuple[int, str]]:
    return [(opt.code, opt.text) for opt in msg.options if isinstance(opt, dns.edns.EDEOption)]


@pytest.mark.parametrize("plugin", ["hang", "stuck"])  # resolve in a task; begin without one
async def test_hung_step_gets_servfail_with_ede_after_its_deadline(
    tmp_path, nursery, plugin, caplog
):
    path = write_config(tmp_path, HUNG.format(plugin=plugin), server="max_inflight = 1")
    server, addrs = await start(nursery, path)
    host, port = addrs["udp4"]
    caplog.set_level(logging.WARNING, logger="dnsproxy")
    for _ in range(2):  # the slot comes back: the second query is timed out, not refused
        started = trio.current_time()
        with trio.fail_after(3):
            r = await dns.asyncquery.udp(
                dns.message.make_query("example.org", "A", use_edns=0), host, port=port
            )
        assert trio.current_time() - started >= 0.3
        assert r.rcode() == dns.rcode.SERVFAIL
        assert edes(r) == [(EDE_NO_REACHABLE_AUTHORITY, "step timed out")]
        assert server.inflight == 0
    assert server.stats.step_timeouts == 2
    assert server.stats.servfail_overload == 0 and server.stats.step_errors == 0
    lines = [r.getMessage() for r in caplog.records if "deadline" in r.getMessage()]
    assert len(lines) == 1 and f"chain[0] ({plugin})" in lines[0]  # rate-limited
    server.stop()


@pytest.mark.parametrize("plugin", ["hang", "stuck"])
async def test_query_api_times_out_a_hung_step(tmp_path, plugin, autojump_clock):
    """``dnsproxy query`` and the HTTP API run queries through `Server.query`."""
    server = Server(write_config(tmp_path, HUNG.format(plugin=plugin)), handle_signals=False)
    reply = await server.query(make_query("example.org"))
    assert reply.rcode == dns.rcode.SERVFAIL
    assert reply.ede == ((EDE_NO_REACHABLE_AUTHORITY, "step timed out"),)
    assert trio.current_time() == pytest.approx(0.3)
    assert server.stats.step_timeouts == 1


def test_deadline_defaults_to_10_s_and_is_validated(tmp_path):
    cfg, registry, _ = load(write_config(tmp_path, '[[chain]]\nplugin = "static"\n'))
    assert cfg.chain[0].deadline == 10.0
    assert build_chain(cfg, registry).steps[0].setup.deadline == 10.0
    for bad, said in (("0s", "must be between 0.01 s and 3600 s"), ("soon", "expected a duration")):
        path = write_config(tmp_path, f'[[chain]]\nplugin = "static"\ndeadline = "{bad}"\n')
        with pytest.raises(ConfigError) as err:
            load(path)
        [line] = err.value.lines
        assert line.startswith("config.toml: chain[0] (static): deadline: ") and said in line


async def test_a_shorter_deadline_added_later_expires_first(nursery, autojump_clock):
    """`_Deadlines.run` sleeps until the earliest deadline: one added while it sleeps
    towards a later one wakes it earlier, and each expires at its own time."""
    deadlines = _Deadlines()
    nursery.start_soon(deadlines.run)
    await trio.sleep(0.1)  # run is asleep, with nothing to wait for
    start = trio.current_time()
    expired: dict[str, float] = {}
    deadlines.add(5.0, lambda: expired.setdefault("long", trio.current_time()))
    await trio.sleep(0.1)
    deadlines.add(0.5, lambda: expired.setdefault("short", trio.current_time()))
    await trio.sleep(6)
    assert 0.6 <= expired["short"] - start < 0.65
    assert 5.0 <= expired["long"] - start < 5.05
