"""The blocklist step: answers, modes, allowlists, CNAME inspection, pausing, loading."""

from __future__ import annotations

import logging
import os

import dns.message
import dns.rdatatype
import pytest
import trio

from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_BLOCKED
from dnsproxy.shared import Shared
from dnsproxy.testing import Answer, build_step, chain_of, make_query, run_chain
from tests.conftest import BLOCKLISTS

UPSTREAM = {
    "www.example.org": "192.0.2.1",
    "ads.example.org": "192.0.2.66",
    "cdn.example.org": ["CNAME tracker.example.net.", "A 192.0.2.7"],
    "fine.example.org": ["CNAME www.example.org.", "A 192.0.2.1"],
}


def write(tmp_path, name, *lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


async def loaded(step, nursery):
    """Start the step's background loading and wait until every list is attached."""
    nursery.start_soon(step.run)
    with trio.fail_after(30):
        while not step.ready():
            await trio.sleep(0.01)
    return step


async def load_now(step):
    """Load every (file) list in this task: no background work, so no timers under autojump."""
    await step.load_now()
    assert step.ready()
    return step


async def ask(steps, name, rdtype="A", **kw):
    reply = await run_chain([*steps, Answer(UPSTREAM)], make_query(name, rdtype, **kw))
    return reply, dns.message.from_wire(reply.wire)


def addresses(msg):
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


@pytest.fixture
def ads(tmp_path):
    return write(tmp_path, "ads.txt", "# ads", "ads.example.org", "tracker.example.net")


async def test_null_mode_answers_by_type_with_ede_and_ttl(tmp_path, ads, nursery):
    step = await loaded(build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path), nursery)
    reply, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["0.0.0.0"] and msg.answer[0].ttl == 60
    assert reply.ede == ((EDE_BLOCKED, "ads.txt"),)
    _, msg = await ask([step], "x.Ads.Example.org", "AAAA")
    assert addresses(msg) == ["::"]
    _, msg = await ask([step], "ads.example.org", "MX")
    assert msg.rcode() == 0 and msg.answer == []
    _, msg = await ask([step], "www.example.org")
    assert addresses(msg) == ["192.0.2.1"]  # passed on to the next step
    assert step.metrics()[0].value == 3


@pytest.mark.parametrize(
    ("mode", "rcode", "a", "aaaa"),
    [
        ("nxdomain", 3, [], []),
        ("nodata", 0, [], []),
        ("refused", 5, [], []),
        ("192.0.2.99", 0, ["192.0.2.99"], []),
        (["192.0.2.99", "2001:db8::99"], 0, ["192.0.2.99"], ["2001:db8::99"]),
    ],
)
async def test_modes(tmp_path, ads, nursery, mode, rcode, a, aaaa):
    table = {"lists": ["ads.txt"], "mode": mode, "ttl": 7}
    step = await loaded(build_step("blocklist", table, base_dir=tmp_path), nursery)
    reply, msg = await ask([step], "ads.example.org")
    assert msg.rcode() == rcode and addresses(msg) == a
    assert reply.ede == ((EDE_BLOCKED, "ads.txt"),)
    assert all(rrset.ttl == 7 for rrset in msg.answer)
    _, msg = await ask([step], "ads.example.org", "AAAA")
    assert addresses(msg) == aaaa


async def test_allow_list_wins_and_important_wins_over_it(tmp_path, nursery):
    write(tmp_path, "block.txt", "||example.org^", "||ads.example.org^$important")
    write(tmp_path, "allow.txt", "www.example.org", "ads.example.org")
    table = {"lists": ["block.txt"], "allow": ["allow.txt"]}
    step = await loaded(build_step("blocklist", table, base_dir=tmp_path), nursery)
    _, msg = await ask([step], "www.example.org")
    assert addresses(msg) == ["192.0.2.1"]
    _, msg = await ask([step], "other.example.org")
    assert addresses(msg) == ["0.0.0.0"]
    reply, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["0.0.0.0"] and reply.ede == ((EDE_BLOCKED, "block.txt"),)


async def test_cname_target_blocked(tmp_path, ads, nursery):
    step = await loaded(build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path), nursery)
    q = make_query("cdn.example.org")
    q.trace = []
    reply = await run_chain([step, Answer(UPSTREAM)], q)
    assert addresses(dns.message.from_wire(reply.wire)) == ["0.0.0.0"]
    assert reply.ede == ((EDE_BLOCKED, "ads.txt"),)
    notes = {k: str(v) for k, v in q.notes.items()}
    assert notes == {
        "list": "ads.txt",
        "rule": "tracker.example.net (CNAME target tracker.example.net)",
    }
    assert any("CNAME target tracker.example.net" in line for line in q.trace)
    _, msg = await ask([step], "fine.example.org")
    assert "192.0.2.1" in addresses(msg)


async def test_cname_inspection_can_be_off(tmp_path, ads, nursery):
    table = {"lists": ["ads.txt"], "cname": False}
    step = await loaded(build_step("blocklist", table, base_dir=tmp_path), nursery)
    _, msg = await ask([step], "cdn.example.org")
    assert "192.0.2.7" in addresses(msg)


async def test_pause_and_resume(tmp_path, ads, autojump_clock):
    step = await load_now(build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path))
    blocking = step.setup.blocking
    blocking.pause(30)
    assert not blocking.active()
    _, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["192.0.2.66"]
    await trio.sleep(31)
    _, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["0.0.0.0"] and blocking.active()
    blocking.pause()
    await trio.sleep(86400)
    assert not blocking.active()
    blocking.resume()
    _, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["0.0.0.0"]


async def test_answers_before_lists_load_then_attaches(tmp_path, nursery, caplog):
    caplog.set_level(logging.INFO)
    table = {"lists": [str(BLOCKLISTS / "tracking.domains"), str(BLOCKLISTS / "basic.hosts")]}
    step = build_step("blocklist", table, base_dir=tmp_path)
    assert not step.ready()
    _, msg = await ask([step], "0cf.io")
    assert addresses(msg) == []  # NXDOMAIN from the stub: not blocked yet, not stuck either
    await loaded(step, nursery)
    reply, msg = await ask([step], "0cf.io")
    assert addresses(msg) == ["0.0.0.0"] and reply.ede == ((EDE_BLOCKED, "tracking.domains"),)
    reply, _ = await ask([step], "0-app.com")
    assert reply.ede == ((EDE_BLOCKED, "basic.hosts"),)
    text = caplog.text
    assert "list tracking.domains: 143876 rules" in text and "2/2 lists ready" in text


async def test_file_change_is_picked_up_and_bad_version_keeps_old(tmp_path, ads, nursery):
    table = {"lists": ["ads.txt"], "watch": "0.1s"}
    step = await loaded(build_step("blocklist", table, base_dir=tmp_path), nursery)
    write(tmp_path, "ads.txt", "www.example.org")
    os.utime(tmp_path / "ads.txt", ns=(1, 10**18))
    with trio.fail_after(10):
        while (await ask([step], "www.example.org"))[1].answer[0][0].to_text() != "0.0.0.0":
            await trio.sleep(0.05)
    _, msg = await ask([step], "ads.example.org")
    assert addresses(msg) == ["192.0.2.66"]
    write(tmp_path, "ads.txt", "<html>", "<body>not a list</body>")
    os.utime(tmp_path / "ads.txt", ns=(2, 2 * 10**18))
    with trio.fail_after(10):
        while step.load_failures == 0:
            await trio.sleep(0.05)
    _, msg = await ask([step], "www.example.org")
    assert addresses(msg) == ["0.0.0.0"]


async def test_per_client_policy(tmp_path, ads, nursery):
    write(tmp_path, "strict.txt", "www.example.org")
    kid = await loaded(
        build_step("blocklist", {"lists": ["strict.txt"]}, base_dir=tmp_path), nursery
    )
    everyone = await loaded(
        build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path), nursery
    )
    chain = chain_of([(kid, {"clients": ["192.168.1.50/32"]}), everyone, Answer(UPSTREAM)])
    reply = await run_chain(chain, make_query("www.example.org", client="192.168.1.50"))
    assert reply.ede == ((EDE_BLOCKED, "strict.txt"),)
    reply = await run_chain(chain, make_query("www.example.org", client="192.168.1.51"))
    assert reply.ede == ()
    reply = await run_chain(chain, make_query("ads.example.org", client="192.168.1.50"))
    assert reply.ede == ((EDE_BLOCKED, "ads.txt"),)


async def test_check_reports_counts(tmp_path):
    write(tmp_path, "mixed.txt", "ads.example.org", "||x.example.org^$third-party", "b@d line")
    step = build_step("blocklist", {"lists": ["mixed.txt"]}, base_dir=tmp_path)
    lines = await step.check()
    assert lines[0] == "list mixed.txt: 1 rules, 1 names, 1 skipped, 1 errors"
    assert "line 2: unsupported modifier $third-party" in lines[1]


async def test_check_fails_on_unusable_list(tmp_path):
    write(tmp_path, "big.txt", "a.example", "b.example", "c.example")
    step = build_step("blocklist", {"lists": ["big.txt"], "max_entries": 2}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"chain\[0\] \(blocklist\): lists: big.txt: more than"):
        await step.check()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"lists": ["ads.txt"], "mode": "block"}, "option 'mode': expected one of null"),
        ({"lists": ["ads.txt"], "mode": ["192.0.2.1", "x"]}, "got 'x'"),
        ({"lists": ["ads.txt"], "ttl": -1}, "option 'ttl'"),
        ({"lists": ["ads.txt"], "refresh": "1s"}, "option 'refresh'"),
        ({"lists": ["ads.txt"], "lsts": []}, "did you mean 'lists'"),
        ({}, "missing required option 'lists'"),
    ],
)
def test_config_errors(tmp_path, ads, table, message):
    with pytest.raises(ConfigError, match=message):
        build_step("blocklist", table, base_dir=tmp_path)


async def test_root_and_non_in_class_pass(tmp_path, ads, nursery):
    step = await loaded(build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path), nursery)
    assert step.query(make_query(".", "NS")) is None
    q = make_query("ads.example.org", dns.rdatatype.TXT)
    q.qclass = 3
    assert step.query(q) is None


async def test_a_reloaded_step_blocks_at_once_with_unchanged_lists(tmp_path, ads, nursery):
    shared = Shared()  # one server's store: its steps and the steps of its reloads
    table = {"lists": ["ads.txt"]}
    first = await loaded(build_step("blocklist", table, base_dir=tmp_path, shared=shared), nursery)
    again = build_step("blocklist", table, base_dir=tmp_path, shared=shared)
    assert again.ready() and again.query(make_query("ads.example.org")) is not None
    assert again.sources[0].parsed is first.sources[0].parsed
    other_server = build_step("blocklist", table, base_dir=tmp_path, shared=Shared())
    assert not other_server.ready()  # another server's step is never lent this one's lists
    other_options = build_step(
        "blocklist", {"lists": ["ads.txt"], "subdomains": False}, base_dir=tmp_path, shared=shared
    )
    assert not other_options.ready()
    write(tmp_path, "ads.txt", "www.example.org")
    os.utime(tmp_path / "ads.txt", ns=(1, 10**18))
    changed = build_step("blocklist", table, base_dir=tmp_path, shared=shared)
    assert not changed.ready() and changed.query(make_query("ads.example.org")) is None
    assert first.ready()
