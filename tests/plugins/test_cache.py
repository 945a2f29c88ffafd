"""Unit tests of the cache step: keys, TTLs (RFC 2308), bounds, prefetch, serve-stale."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Callable

import dns.edns
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
import trio

from dnsproxy import wire
from dnsproxy.chain import AWAIT, Step
from dnsproxy.errors import ConfigError
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_CACHED_ERROR,
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_STALE,
    EDE_STALE_NXDOMAIN,
    Reply,
    finalize,
    respond,
    response_message,
    rr,
)
from dnsproxy.testing import build_step, chain_of, make_query, make_setup, run_chain
from dnsproxy.wire import Query

Handler = Callable[[Query], Reply]


def soa(ttl: int = 300, minimum: int = 60) -> dns.rrset.RRset:
    return dns.rrset.from_text(
        "example.org.", ttl, "IN", "SOA", f"ns.example.org. admin.example.org. 1 2 3 4 {minimum}"
    )


def answer(ip: str = "192.0.2.1", ttl: int = 300) -> Handler:
    def handler(q: Query) -> Reply:
        msg = response_message(q)
        msg.answer.append(dns.rrset.from_text(q.name, ttl, "IN", "A", ip))
        return Reply.from_message(msg, source="stub")

    return handler


def negative(rcode: int = wire.NXDOMAIN, with_soa: bool = True, **kw: int) -> Handler:
    def handler(q: Query) -> Reply:
        msg = response_message(q, rcode)
        if with_soa:
            msg.authority.append(soa(**kw))
        return Reply.from_message(msg, source="stub")

    return handler


class Upstream(Step):
    """A stub for the rest of the chain: counts queries, answers with ``handler``.

    With ``delay`` it answers from ``resolve`` after sleeping, like forward does.
    """

    def __init__(self, handler: Handler, delay: float | None = None) -> None:
        super().__init__(None, make_setup("upstream", reg=Registry()))
        self.handler = handler
        self.delay = delay
        self.calls = 0

    def query(self, q: Query) -> Reply | None:
        self.calls += 1
        return self.handler(q) if self.delay is None else AWAIT

    async def resolve(self, q: Query) -> Reply | None:
        assert self.delay is not None
        await trio.sleep(self.delay)
        return self.handler(q)


def ttls(reply: Reply) -> list[int]:
    msg = dns.message.from_wire(reply.wire)
    return [rrset.ttl for rrset in msg.answer + msg.authority]


def edes(reply: Reply) -> list[int]:
    return [code for code, _ in reply.ede]


def cache_step(**table: object):
    step = build_step("cache", table)
    step.clock = trio.current_time
    return step


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., object]]:
    """Build cache steps whose background nursery (``run``) is running."""
    async with trio.open_nursery() as nursery:

        def make(**table: object):
            step = cache_step(**table)
            nursery.start_soon(step.run)
            return step

        yield make
        nursery.cancel_scope.cancel()


# --- options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"min_ttl": 600, "max_ttl": 60}, "min_ttl"),
        ({"servfail_ttl": "10m"}, "servfail_ttl"),
        ({"stale_max_age": "forever"}, "stale_max_age"),
        ({"prefetch": "yes"}, "prefetch"),
        ({"max_ttls": 5}, "did you mean 'max_ttl'"),
    ],
)
def test_bad_options_name_the_key(table, message):
    with pytest.raises(ConfigError) as err:
        build_step("cache", table)
    assert len(err.value.lines) == 1
    assert "chain[0] (cache)" in str(err.value) and message in str(err.value)


def test_durations_accept_units():
    step = build_step("cache", {"stale_max_age": "3d", "servfail_ttl": "500ms"})
    assert step.options.stale_max_age == 3 * 86400
    assert step.options.servfail_ttl == 0.5


# --- hits, keys, TTL countdown ----------------------------------------------------------


async def test_hit_counts_down_and_expires(autojump_clock):
    cache, up = cache_step(serve_stale=False, prefetch=False), Upstream(answer(ttl=300))
    chain = chain_of([cache, up])
    first = await run_chain(chain, make_query("www.example.org"))
    assert ttls(first) == [300] and up.calls == 1
    await trio.sleep(100.5)
    q = make_query("www.example.org")
    hit = await run_chain(chain, q)
    assert up.calls == 1 and hit.source == "cache" and q.notes == {"cache": "hit"}
    assert ttls(hit) == [199]
    await trio.sleep(200)
    await run_chain(chain, make_query("www.example.org"))
    assert up.calls == 2
    assert (cache.hits, cache.misses) == (1, 2)


async def test_key_separates_type_do_cd_but_not_case(autojump_clock):
    cache, up = cache_step(), Upstream(answer())
    chain = chain_of([cache, up])
    for kw in ({}, {"do": True}, {"cd": True}, {"rdtype": "AAAA"}):
        await run_chain(chain, make_query("www.example.org", **kw))
    assert up.calls == 4
    q = make_query("WwW.Example.ORG")
    reply = await run_chain(chain, q)
    assert up.calls == 4
    out = dns.message.from_wire(finalize(reply, q, 1232))
    assert out.question[0].name.to_text() == "WwW.Example.ORG."  # echoed byte for byte
    assert out.id == q.id


async def test_client_scoped_steps_after_the_cache_split_the_key(autojump_clock):
    """CVE-2024-0874 class: a per-client answer must not be served to other clients."""
    cache = cache_step()
    kids, everyone = Upstream(answer("0.0.0.0")), Upstream(answer("192.0.2.1"))
    chain = chain_of([cache, (kids, {"clients": ["10.0.0.0/8"]}), everyone])
    r1 = await run_chain(chain, make_query("games.example.org", client="10.1.2.3"))
    r2 = await run_chain(chain, make_query("games.example.org", client="192.168.1.9"))
    r3 = await run_chain(chain, make_query("games.example.org", client="10.9.9.9"))
    addr = [dns.message.from_wire(r.wire).answer[0][0].address for r in (r1, r2, r3)]
    assert addr == ["0.0.0.0", "192.0.2.1", "0.0.0.0"]
    assert (kids.calls, everyone.calls, cache.hits) == (1, 1, 1)


async def test_zone_scoped_steps_do_not_cost_a_view(autojump_clock):
    cache = cache_step()
    chain_of([cache, (Upstream(answer()), {"zones": ["corp.example.org"]})])
    assert cache.views == ()


# --- what is stored and for how long ------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "options", "lifetime"),
    [
        (answer(ttl=300), {"max_ttl": 60}, 60),
        (answer(ttl=5), {"min_ttl": 30}, 30),
        (negative(ttl=300, minimum=60), {}, 60),  # RFC 2308: min(SOA TTL, MINIMUM)
        (negative(ttl=40, minimum=600), {}, 40),
        (negative(ttl=9000, minimum=9000), {"max_negative_ttl": 120}, 120),
        (negative(wire.NOERROR, ttl=100, minimum=100), {}, 100),  # NODATA
    ],
)
async def test_lifetimes(autojump_clock, handler, options, lifetime):
    cache, up = cache_step(serve_stale=False, prefetch=False, **options), Upstream(handler)
    chain = chain_of([cache, up])
    miss = await run_chain(chain, make_query("x.example.org"))
    assert miss.source == "stub" and ttls(miss) == [lifetime] * len(ttls(miss))
    hit = await run_chain(chain, make_query("x.example.org"))
    assert up.calls == 1 and ttls(hit) == ttls(miss) and hit.source == "cache"
    await trio.sleep(lifetime - 0.5)
    await run_chain(chain, make_query("x.example.org"))
    assert up.calls == 1
    await trio.sleep(1)
    await run_chain(chain, make_query("x.example.org"))
    assert up.calls == 2


def _truncated(q: Query) -> Reply:
    reply = answer()(q)
    data = bytearray(reply.wire)
    data[2] |= wire.TC >> 8
    return Reply(bytes(data))


def _msb_ttl(q: Query) -> Reply:
    reply = answer()(q)
    data = bytearray(reply.wire)
    data[reply.records()[0].ttl_off] |= 0x80
    return Reply(bytes(data))


def _other_question(q: Query) -> Reply:
    return answer()(make_query("other.example.org"))


def _many_records(q: Query) -> Reply:
    msg = response_message(q)
    msg.answer.append(
        dns.rrset.from_text(q.name, 300, "IN", "A", *(f"192.0.2.{i}" for i in range(1, 12)))
    )
    return Reply.from_message(msg)


@pytest.mark.parametrize(
    "handler",
    [
        negative(with_soa=False),
        negative(wire.NOERROR, with_soa=False),
        lambda q: respond(q, wire.REFUSED),
        lambda q: respond(q, wire.FORMERR),
        _truncated,
        _msb_ttl,
        answer(ttl=0),
        _other_question,
        _many_records,
    ],
    ids=[
        "nxdomain-no-soa",
        "nodata-no-soa",
        "refused",
        "formerr",
        "tc",
        "ttl-msb",
        "ttl-0",
        "other-question",
        "over-max-records",
    ],
)
async def test_not_cached(autojump_clock, handler):
    cache, up = cache_step(max_records=10, min_ttl=0), Upstream(handler)
    chain = chain_of([cache, up])
    for _ in range(2):
        await run_chain(chain, make_query("x.example.org"))
    assert up.calls == 2 and len(cache.entries) == 0


async def test_servfail_cached_briefly_with_ede_13(autojump_clock):
    failing = Upstream(
        lambda q: respond(q, wire.SERVFAIL, ede=[(EDE_NO_REACHABLE_AUTHORITY, "timeout")])
    )
    cache = cache_step(servfail_ttl=2)
    chain = chain_of([cache, failing])
    await run_chain(chain, make_query("x.example.org"))
    again = await run_chain(chain, make_query("x.example.org"))
    assert failing.calls == 1 and again.rcode == wire.SERVFAIL
    assert edes(again) == [EDE_NO_REACHABLE_AUTHORITY, EDE_CACHED_ERROR]
    await trio.sleep(2)
    await run_chain(chain, make_query("x.example.org"))
    assert failing.calls == 2


# --- bounds, flush, metrics --------------------------------------------------------------


async def test_lru_eviction_and_metrics(autojump_clock):
    cache, up = cache_step(max_entries=3), Upstream(answer())
    chain = chain_of([cache, up])
    for name in ("a", "b", "c", "a", "d"):  # "a" was used again, so "b" is the oldest
        await run_chain(chain, make_query(f"{name}.example.org"))
    assert [k[0] for k in cache.entries] == [wire.name_to_key(f"{n}.example.org") for n in "cad"]
    metrics = {m.name: m.value for m in cache.metrics()}
    assert metrics == {
        "hits": 1,
        "misses": 4,
        "stale": 0,
        "evictions": 1,
        "prefetches": 0,
        "entries": 3,
    }


async def test_flush_forgets_everything(autojump_clock):
    cache, up = cache_step(), Upstream(answer())
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("a.example.org"))
    chain.flush()
    await run_chain(chain, make_query("a.example.org"))
    assert up.calls == 2


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def test_flood_of_unique_names_stays_bounded(autojump_clock):
    """200,000 random names: the entry count stays at max_entries and RSS stays flat."""
    cache = cache_step(max_entries=20_000)
    fast = Upstream(lambda q: respond(q, answers=[rr(1, 300, bytes([192, 0, 2, 1]))]))
    chain = chain_of([cache, fast])
    rand = random.Random(4)

    header = wire.HEADER.pack(1, wire.RD, 1, 0, 0, 0)
    suffix = b"\x07example\x03org\x00\x00\x01\x00\x01"

    def flood(n: int) -> None:
        for _ in range(n):
            label = rand.randbytes(10).hex().encode()
            q = wire.parse_query(header + b"\x14" + label + suffix, ("127.0.0.1", 1), "udp")
            assert chain.start(q) is not None

    flood(40_000)  # fill the cache and let the allocator settle
    before = _rss_kib()
    flood(200_000)
    assert len(cache.entries) == 20_000
    assert cache.evictions == 220_000
    assert _rss_kib() - before < 8 * 1024


# --- prefetch -------------------------------------------------------------------------------


async def test_prefetch_refreshes_popular_entries_once(autojump_clock, running):
    cache, up = running(serve_stale=False), Upstream(answer(ttl=100), delay=0.5)
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org"))
    await trio.sleep(85)  # 15 s left: no prefetch yet
    await run_chain(chain, make_query("www.example.org"))
    assert up.calls == 1
    await trio.sleep(6)  # 9 s left, in the last tenth: hits answer and refresh once
    for _ in range(5):
        reply = await run_chain(chain, make_query("www.example.org"))
        assert reply.source == "cache"
    assert cache.prefetches == 1
    await trio.sleep(1)
    assert up.calls == 2
    reply = await run_chain(chain, make_query("www.example.org"))
    assert ttls(reply) == [99] and up.calls == 2  # renewed: 100 s from the refresh
    await trio.sleep(20)  # past the old expiry: still a hit
    await run_chain(chain, make_query("www.example.org"))
    assert up.calls == 2 and cache.misses == 1


async def test_prefetch_keeps_the_client_view(autojump_clock, running):
    cache = running()
    kids, everyone = Upstream(answer("0.0.0.0", ttl=10)), Upstream(answer("192.0.2.1", ttl=10))
    chain = chain_of([cache, (kids, {"clients": ["10.0.0.0/8"]}), everyone])
    await run_chain(chain, make_query("games.example.org", client="10.1.2.3"))
    await trio.sleep(9.5)
    await run_chain(chain, make_query("games.example.org", client="10.1.2.3"))
    await trio.sleep(0.1)
    assert (kids.calls, everyone.calls) == (2, 0)


# --- serve-stale (RFC 8767) -----------------------------------------------------------------


async def test_stale_answer_when_upstream_fails_then_retry_every_30s(autojump_clock, running):
    cache = running(prefetch=False)
    state = {"up": True}
    good = answer(ttl=60)

    def handler(q: Query) -> Reply:
        if state["up"]:
            return good(q)
        return respond(q, wire.SERVFAIL, ede=[(EDE_NO_REACHABLE_AUTHORITY, "timeout")])

    up = Upstream(handler, delay=0.1)
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org"))
    state["up"] = False
    await trio.sleep(120)
    stale = await run_chain(chain, make_query("www.example.org"))
    assert stale.rcode == wire.NOERROR and ttls(stale) == [30] and edes(stale) == [EDE_STALE]
    assert up.calls == 2
    for _ in range(3):  # within 30 s of the failure: stale at once, upstream left alone
        q = make_query("www.example.org")
        assert chain.start(q).source == "cache" and q.notes == {"cache": "stale"}
        await trio.sleep(5)
    assert up.calls == 2
    await trio.sleep(16)
    state["up"] = True
    fresh = await run_chain(chain, make_query("www.example.org"))
    assert up.calls == 3 and ttls(fresh) == [60] and fresh.ede == ()
    assert cache.stale == 4


async def test_slow_upstream_stale_at_1_8_s_and_refresh_continues(autojump_clock, running):
    cache = running(prefetch=False)
    up = Upstream(negative(ttl=60, minimum=60), delay=9)  # within the default 10 s step deadline
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("gone.example.org"))
    await trio.sleep(61)
    start = trio.current_time()
    stale = await run_chain(chain, make_query("gone.example.org"))
    assert trio.current_time() - start == pytest.approx(1.8)
    assert stale.rcode == wire.NXDOMAIN and edes(stale) == [EDE_STALE_NXDOMAIN]
    await trio.sleep(8)
    fresh = await run_chain(chain, make_query("gone.example.org"))
    assert fresh.ede == () and up.calls == 2 and ttls(fresh)[0] in (59, 60)


async def test_refresh_in_time_is_answered_fresh(autojump_clock, running):
    cache = running(prefetch=False)
    up = Upstream(answer(ttl=60), delay=0.2)
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org"))
    await trio.sleep(100)
    replies = []

    async def ask() -> None:
        replies.append(await run_chain(chain, make_query("www.example.org")))

    async with trio.open_nursery() as n:
        for _ in range(5):
            n.start_soon(ask)
    assert up.calls == 2  # one refresh for the five clients
    assert all(r.ede == () and ttls(r) == [60] for r in replies)


async def test_too_old_for_stale_is_a_miss(autojump_clock, running):
    cache = running(prefetch=False, stale_max_age="1h")
    up = Upstream(answer(ttl=60))
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org"))
    await trio.sleep(60 + 3601)
    assert chain.start(make_query("www.example.org")).source == "stub"
    assert up.calls == 2


async def test_without_run_stale_falls_back_to_inline_refresh(autojump_clock):
    cache = cache_step(prefetch=False)
    up = Upstream(answer(ttl=60), delay=0.1)
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org"))
    await trio.sleep(61)
    fresh = await run_chain(chain, make_query("www.example.org"))
    assert fresh.ede == () and up.calls == 2


# --- coalescing with the real forward step ---------------------------------------------------


async def test_identical_misses_make_one_upstream_query():
    """Twenty clients miss at once: forward sends exactly one query upstream."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    seen = []

    async def upstream() -> None:
        while True:
            data, addr = await sock.recvfrom(4096)
            seen.append(data)
            await trio.sleep(0.2)
            req = dns.message.from_wire(data)
            resp = dns.message.make_response(req)
            resp.answer.append(
                dns.rrset.from_text(req.question[0].name, 300, "IN", "A", "192.0.2.7")
            )
            await sock.sendto(resp.to_wire(), addr)

    cache = build_step("cache", {})
    forward = build_step(
        "forward", {"upstreams": [f"127.0.0.1:{port}"], "timeout": 8, "budget": 8}, index=1
    )
    chain = chain_of([cache, forward])
    replies = []

    async def ask() -> None:
        replies.append(await run_chain(chain, make_query("www.example.org")))

    with trio.fail_after(10):  # generous: the machine may be loaded
        async with trio.open_nursery() as n:
            n.start_soon(upstream)
            async with trio.open_nursery() as clients:
                for _ in range(20):
                    clients.start_soon(ask)
            hit = await run_chain(chain, make_query("www.example.org"))
            n.cancel_scope.cancel()
    sock.close()
    forward.close()
    assert len(seen) == 1
    assert len(replies) == 20 and all(r.rcode == wire.NOERROR for r in replies)
    assert hit.source == "cache"


async def test_background_refreshes_are_bounded(autojump_clock, running):
    cache = running(serve_stale=False, max_refreshes=1)
    up = Upstream(answer(ttl=100), delay=5)
    chain = chain_of([cache, up])
    for name in ("a", "b"):
        await run_chain(chain, make_query(f"{name}.example.org"))  # 5 s each
    await trio.sleep(91)  # both in the last tenth of their life
    for name in ("a", "b", "a", "b"):
        assert chain.start(make_query(f"{name}.example.org")).source == "cache"
    assert cache.prefetches == 1 and len(cache.refreshing) == 1
    await trio.sleep(6)
    assert up.calls == 3 and not cache.refreshing


async def test_nxdomain_answers_every_type_of_the_name(autojump_clock):
    """RFC 2308 §5: NXDOMAIN is cached per name and class, whatever the type."""
    cache, up = cache_step(), Upstream(negative(ttl=300, minimum=60))
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("gone.example.org", "A"))
    await trio.sleep(10)
    q = make_query("gone.example.org", "AAAA")
    reply = await run_chain(chain, q)
    assert up.calls == 1 and reply.source == "cache" and ttls(reply) == [50]
    out = dns.message.from_wire(finalize(reply, q, 1232))
    assert out.question[0].rdtype == dns.rdatatype.AAAA and out.rcode() == wire.NXDOMAIN
    await run_chain(chain, make_query("gone.example.org", "MX", do=True))  # other DO bit
    assert up.calls == 2
    await trio.sleep(51)
    await run_chain(chain, make_query("gone.example.org", "TXT"))
    assert up.calls == 3


async def test_nodata_is_per_type(autojump_clock):
    cache, up = cache_step(), Upstream(negative(wire.NOERROR))
    chain = chain_of([cache, up])
    await run_chain(chain, make_query("www.example.org", "MX"))
    await run_chain(chain, make_query("www.example.org", "TXT"))
    assert up.calls == 2


async def test_answers_through_the_cache_are_not_authoritative(autojump_clock):
    cache = cache_step()
    up = Upstream(lambda q: respond(q, answers=[rr(1, 300, bytes([192, 0, 2, 1]))], aa=True))
    chain = chain_of([cache, up])
    miss = await run_chain(chain, make_query("www.example.org"))
    hit = await run_chain(chain, make_query("www.example.org"))
    assert not miss.flags & wire.AA and not hit.flags & wire.AA
