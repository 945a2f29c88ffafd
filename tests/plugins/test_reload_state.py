"""State that outlives a reload: the blocking pause (`Blocking`), `Step.inherit` of the cache
and ratelimit, and a blocklist whose list file is missing (in-process; the real process is
in tests/integration/test_reload.py)."""

from __future__ import annotations

import logging

import pytest
import trio

from dnsproxy import wire
from dnsproxy.blocking import Blocking
from dnsproxy.errors import ConfigError
from dnsproxy.testing import Answer, build_step, chain_of, make_query, run_chain


@pytest.fixture
def ads(tmp_path):
    path = tmp_path / "ads.txt"
    path.write_text("ads.example.org\n")
    return path


async def load_now(step):
    """Load every list file that exists, in this task."""
    await step.load_now()
    return step


async def test_a_timed_pause_ends_on_its_timer_and_is_logged_once(autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="dnsproxy")
    blocking = Blocking()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocking.run)
        await trio.sleep(0)
        blocking.pause(30)
        await trio.sleep(29)
        assert not blocking.active() and 0 < blocking.seconds_left() <= 1
        await trio.sleep(2)  # no query: the timer ends it
        assert blocking.paused_until is None
        assert caplog.text.count("blocking resumed") == 1
        assert blocking.active() and blocking.seconds_left() is None
        blocking.pause()
        await trio.sleep(86400)
        assert not blocking.active() and blocking.seconds_left() is None
        blocking.resume()
        blocking.resume()  # not paused: nothing to log
        nursery.cancel_scope.cancel()
    assert caplog.text.count("blocking resumed") == 2
    assert "blocking paused for 30 s" in caplog.text


async def test_a_step_built_later_honours_the_shared_pause(tmp_path, ads):
    blocking = Blocking()
    table = {"lists": ["ads.txt"]}
    old = await load_now(build_step("blocklist", table, base_dir=tmp_path, blocking=blocking))
    blocking.pause(300)
    new = await load_now(build_step("blocklist", table, base_dir=tmp_path, blocking=blocking))
    upstream = Answer({"ads.example.org": "192.0.2.66"})
    for step in (old, new):
        reply = await run_chain([step, upstream], make_query("ads.example.org"))
        assert reply.source == "answer"
    blocking.resume()
    reply = await run_chain([new, upstream], make_query("ads.example.org"))
    assert reply.source == "blocklist"


async def test_a_missing_list_is_not_ready_with_a_reason_and_fails_check(tmp_path, ads):
    table = {"lists": ["ads.txt", "late.txt"], "allow": ["nope.txt"]}
    step = await load_now(build_step("blocklist", table, base_dir=tmp_path))  # no ConfigError
    reply = await run_chain([step, Answer({})], make_query("ads.example.org"))
    assert reply.source == "blocklist"  # the list that exists blocks
    assert not step.ready()
    assert "list late.txt" in step.not_ready_reason()
    with pytest.raises(ConfigError, match=r"lists: .*late\.txt: no such file"):
        await step.check()
    step = build_step("blocklist", {"lists": ["ads.txt"], "allow": ["nope.txt"]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"allow: .*nope\.txt: no such file"):
        await step.check()


async def test_missing_file_is_logged_once_and_loaded_when_it_appears(tmp_path, ads, caplog):
    caplog.set_level(logging.INFO)
    table = {"lists": ["ads.txt", "late.txt"], "watch": "0.1s"}
    step = build_step("blocklist", table, base_dir=tmp_path)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(step.run)
            await trio.sleep(0.5)
            errors = [r for r in caplog.records if r.levelno == logging.ERROR]
            assert len(errors) == 1 and "late.txt" in errors[0].getMessage()
            (tmp_path / "late.txt").write_text("late.example.org\n")
            while not step.ready():
                await trio.sleep(0.05)
            assert step.not_ready_reason() is None
            reply = await run_chain([step, Answer({})], make_query("late.example.org"))
            assert reply.source == "blocklist"
            nursery.cancel_scope.cancel()


def cache_chain(*, child_view: bool, cache_table: dict | None = None):
    """cache → [an answer only for the child's address] → the household's answer."""
    cache = build_step("cache", cache_table or {})
    child = (Answer({"x.test": "192.0.2.9"}), {"clients": ["192.168.1.50/32"]})
    rest = Answer({"x.test": "192.0.2.1"})
    return cache, rest, chain_of([cache, child, rest] if child_view else [cache, rest])


async def test_cache_inherits_entries_and_counters_with_the_same_views():
    old, _, chain = cache_chain(child_view=True)
    await run_chain(chain, make_query("x.test", client="192.168.1.50"))
    await run_chain(chain, make_query("x.test", client="10.0.0.1"))
    await run_chain(chain, make_query("x.test", client="10.0.0.1"))
    new, rest, chain = cache_chain(child_view=True)
    new.inherit(old)
    assert len(new.entries) == 2 and (new.hits, new.misses) == (1, 2)
    child = await run_chain(chain, make_query("x.test", client="192.168.1.50"))
    assert "192.0.2.9" in child.message().to_text()
    await run_chain(chain, make_query("x.test", client="10.0.0.1"))
    assert rest.seen == [] and new.hits == 3


async def test_cache_drops_entries_of_a_view_that_no_longer_exists():
    old, _, chain = cache_chain(child_view=True)
    await run_chain(chain, make_query("x.test", client="192.168.1.50"))
    await run_chain(chain, make_query("x.test", client="10.0.0.1"))
    new, rest, chain = cache_chain(child_view=False)
    new.inherit(old)
    assert list(new.entries) == [(wire.name_to_key("x.test"), 1, 1, False, False)]
    reply = await run_chain(chain, make_query("x.test", client="192.168.1.50"))
    assert "192.0.2.1" in reply.message().to_text() and rest.seen == []
    # The other way round: a view that is new leaves every entry's value unknown.
    newer, _, _ = cache_chain(child_view=True)
    newer.inherit(new)
    assert not newer.entries


async def test_ratelimit_inherits_its_accounts(autojump_clock):
    table = {"queries_per_second": 1}
    old = build_step("ratelimit", table)
    upstream = Answer({"x.test": "192.0.2.1"})
    assert (await run_chain([old, upstream], make_query("x.test"))).source == "answer"
    assert (await run_chain([old, upstream], make_query("x.test"))).source == "ratelimit"
    new = build_step("ratelimit", table)
    new.inherit(old)
    assert (await run_chain([new, upstream], make_query("x.test"))).source == "ratelimit"
    assert new.query_counts["refuse"] == 2
