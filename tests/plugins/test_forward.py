"""forward in-process: coalescing, loop marker, minimal answers, failover, metrics."""

from __future__ import annotations

import struct

import dns.edns
import dns.flags
import dns.message
import dns.rrset
import pytest
import trio
from dnsproxy.plugins.forward import ask, loop, transport, trim
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsproxy import wire
from dnsproxy.errors import ConfigError, UpstreamError
from dnsproxy.reply import Reply, finalize
from dnsproxy.shared import SECRET_SIZE, Shared
from dnsproxy.testing import build_step, chain_of, make_query, run_chain
from tests.fakeupstream import FakeUpstream


async def start(nursery, rules) -> FakeUpstream:
    up = FakeUpstream(rules)
    await nursery.start(up.run)
    return up


async def test_identical_misses_share_one_upstream_query(nursery):
    up = await start(nursery, [{"delay": 0.2, "answer": ["{qname} 300 IN A 192.0.2.1"]}])
    step = build_step("forward", {"upstreams": [up.addr]})
    replies = []

    async def ask() -> None:
        replies.append(await run_chain([step], make_query("same.example.org")))

    with trio.fail_after(5):
        async with trio.open_nursery() as n:
            for _ in range(50):
                n.start_soon(ask)
    assert len(up.seen) == 1
    assert all(r.message().answer[0][0].address == "192.0.2.1" for r in replies)
    assert step.coalesced == 49


async def test_failover_and_metrics(nursery):
    bad = await start(nursery, [{"rcode": "SERVFAIL"}])
    good = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.2"]}])
    step = build_step("forward", {"upstreams": [bad.addr, good.addr]})
    with trio.fail_after(5):
        reply = await run_chain([step], make_query("x.example.org"))
    assert reply.rcode == 0
    samples = {(m.name, m.labels): m.value for m in step.metrics()}
    assert samples[("upstream_queries", (("upstream", f"udp://{bad.addr}"),))] == 1
    assert samples[("upstream_queries", (("upstream", f"udp://{good.addr}"),))] == 1


async def test_query_carrying_our_token_is_a_loop(nursery):
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    step = build_step("forward", {"upstreams": [up.addr]})
    token = loop.loop_token(make_query("l.example.org"), step.loop_key)
    marker = dns.edns.GenericOption(loop.LOOP_OPTION, b"\x01" * 8 + token)
    with trio.fail_after(5):
        reply = await run_chain([step], make_query("l.example.org", options_=[marker]))
    assert reply.rcode == wire.SERVFAIL and "loop" in reply.ede[0][1]
    assert up.seen == [] and step.loops == 1
    assert not reply.cacheable  # about this query's path: never served to others


@pytest.mark.parametrize(
    "hops",
    [b"\x01" * 64, b"\x01" * 800, b"", b"\x01" * 5, "other-question"],
    ids=["8-hops", "100-hops", "empty", "not-tokens", "token-of-another-question"],
)
async def test_client_supplied_marker_is_not_a_loop(nursery, hops):
    """Only our own token for this question is a loop: a client's full, bogus or copied
    marker is forwarded (trimmed or replaced), never answered SERVFAIL."""
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    step = build_step("forward", {"upstreams": [up.addr]})
    if hops == "other-question":
        hops = loop.loop_token(make_query("other.example.org"), step.loop_key)
    marker = dns.edns.GenericOption(loop.LOOP_OPTION, hops)
    q = make_query("c.example.org", options_=[marker])
    with trio.fail_after(5):
        reply = await run_chain([step], q)
    assert reply.rcode == wire.NOERROR and step.loops == 0
    (seen,) = up.seen
    (sent,) = [bytes.fromhex(d) for code, d in seen.options if code == loop.LOOP_OPTION]
    assert sent.endswith(loop.loop_token(q, step.loop_key))
    assert len(sent) <= loop.MAX_HOPS * loop.TOKEN_SIZE and len(sent) % 8 == 0


def hop_token(step) -> bytes:
    """The loop token ``step`` puts on h.example.org."""
    return loop.loop_token(make_query("h.example.org"), step.loop_key)


async def test_loop_key_is_per_server(nursery):
    """The steps of one server share its loop key; a second server in the same process
    has its own, so its forwarded query is a hop to this one, not a loop."""
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    shared = Shared()
    first = build_step("forward", {"upstreams": [up.addr]}, shared=shared)
    second = build_step("forward", {"upstreams": [up.addr]}, shared=shared)
    other = build_step("forward", {"upstreams": [up.addr]})
    assert hop_token(first) == hop_token(second) != hop_token(other)
    marker = dns.edns.GenericOption(loop.LOOP_OPTION, hop_token(other))
    with trio.fail_after(5):
        reply = await run_chain([first], make_query("h.example.org", options_=[marker]))
    assert reply.rcode == wire.NOERROR and first.loops == 0


async def test_one_secret_one_loop_key(nursery):
    """Stores given one secret (the worker processes of one server) make the same token,
    so a query another worker marked is a loop here; default secrets all differ."""
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    shared = Shared()
    here = build_step("forward", {"upstreams": [up.addr]}, shared=shared)
    worker = build_step("forward", {"upstreams": [up.addr]}, shared=Shared(shared.secret))
    stranger = build_step("forward", {"upstreams": [up.addr]}, shared=Shared(b"x" * 32))
    assert hop_token(worker) == hop_token(here) != hop_token(stranger)
    assert len({Shared().secret for _ in range(100)}) == 100
    marker = dns.edns.GenericOption(loop.LOOP_OPTION, hop_token(worker))
    with trio.fail_after(5):
        reply = await run_chain([here], make_query("h.example.org", options_=[marker]))
    assert reply.rcode == wire.SERVFAIL and here.loops == 1 and up.seen == []


def test_keys_of_one_secret_differ_by_use():
    """A plugin's key tells nothing of another's: each is a keyed hash of its use's name."""
    shared = Shared()
    assert shared.key("forward.loop") == Shared(shared.secret).key("forward.loop")
    assert shared.key("forward.loop") != shared.key("other.use") != shared.secret
    assert shared.key("forward.loop") != Shared().key("forward.loop")
    assert len(shared.key("x", 16)) == 16 and len(shared.secret) == SECRET_SIZE


async def test_loop_servfail_is_not_cached(nursery):
    """A looped query's SERVFAIL is about its path: the next client is not served it."""
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    forward = build_step("forward", {"upstreams": [up.addr]})
    chain = chain_of([build_step("cache", {}), forward])
    token = loop.loop_token(make_query("n.example.org"), forward.loop_key)
    marker = dns.edns.GenericOption(loop.LOOP_OPTION, token)
    with trio.fail_after(5):
        looped = await run_chain(chain, make_query("n.example.org", options_=[marker]))
        plain = await run_chain(chain, make_query("n.example.org"))
    assert looped.rcode == wire.SERVFAIL and plain.rcode == wire.NOERROR
    assert len(up.seen) == 1


async def test_scoped_cname_chain_cut_and_followed_through_the_chain(nursery):
    """A zone-scoped forward's answer is cut where its CNAME chain leaves the zones; the
    target comes from the step that owns it, even one before it in the chain."""
    evil = await start(
        nursery,
        [
            {
                "answer": [
                    "{qname} 300 IN CNAME www.example.org.",
                    "www.example.org. 300 IN A 6.6.6.6",
                ]
            }
        ],
    )
    good = await start(nursery, [{"answer": ["{qname} 60 IN A 192.0.2.9"]}])
    owner = build_step("forward", {"upstreams": [good.addr]})
    scoped = build_step("forward", {"upstreams": [evil.addr]})
    unscoped = build_step("forward", {"upstreams": [evil.addr]})
    chain = chain_of([(owner, {"zones": ["example.org"]}), (scoped, {"zones": ["evil.test"]})])
    with trio.fail_after(5):
        reply = await run_chain(chain, make_query("x.evil.test"))
        relayed = await run_chain([unscoped], make_query("y.evil.test"))
    got = [(r.name.to_text(), r[0].to_text()) for r in reply.message().answer]
    assert got == [("x.evil.test.", "www.example.org."), ("www.example.org.", "192.0.2.9")]
    assert [s.qname for s in good.seen] == ["www.example.org."]
    assert len(relayed.message().answer) == 2  # unscoped: the upstream's chain, as before


async def test_marker_is_appended_for_the_next_hop(nursery):
    up = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.1"]}])
    step = build_step("forward", {"upstreams": [up.addr]})
    other = dns.edns.GenericOption(loop.LOOP_OPTION, b"\x02" * 8)
    with trio.fail_after(5):
        await run_chain([step], make_query("m.example.org", options_=[other]))
    (seen,) = up.seen
    token = loop.loop_token(make_query("m.example.org"), step.loop_key)
    assert (loop.LOOP_OPTION, (b"\x02" * 8 + token).hex()) in seen.options


def response(q, answer=(), authority=(), additional=(), rcode=0) -> bytes:
    msg = dns.message.make_response(dns.message.make_query(q.name, q.qtype))
    msg.set_rcode(rcode)
    for section, texts in (
        (msg.answer, answer),
        (msg.authority, authority),
        (msg.additional, additional),
    ):
        for t in texts:
            name, ttl, cls, rdtype, *rdata = t.split()
            section.append(dns.rrset.from_text(name, int(ttl), cls, rdtype, " ".join(rdata)))
    return msg.to_wire()


CASES = {
    "clean": (["q.example.org. 60 IN A 192.0.2.1"], [], []),
    "glue and ns": (
        ["q.example.org. 60 IN A 192.0.2.1"],
        ["example.org. 60 IN NS ns.example.org."],
        ["ns.example.org. 60 IN A 192.0.2.53"],
    ),
    "other names first": (
        ["victim.example.net. 60 IN A 6.6.6.6", "q.example.org. 60 IN A 192.0.2.1"],
        [],
        [],
    ),
    "cname chain": (
        [
            "q.example.org. 60 IN CNAME a.example.net.",
            "a.example.net. 60 IN CNAME b.example.com.",
            "b.example.com. 60 IN A 192.0.2.9",
            "stray.example.com. 60 IN A 6.6.6.6",
        ],
        ["example.com. 60 IN NS ns.evil.example."],
        [],
    ),
    "nxdomain": ([], ["example.org. 60 IN SOA ns.example.org. h.example.org. 1 2 3 4 5"], []),
    "nxdomain with foreign soa": (
        [],
        ["evil.example. 60 IN SOA ns.evil.example. h.evil.example. 1 2 3 4 5"],
        [],
    ),
    "cname loop": (
        ["q.example.org. 60 IN CNAME r.example.org.", "r.example.org. 60 IN CNAME q.example.org."],
        [],
        [],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_minimal_keeps_only_the_chain_and_the_proof(case):
    """Whichever path runs (wire-level cut or dnspython rebuild), the right records stay."""
    answer, authority, additional = CASES[case]
    q = make_query("q.example.org", "A")
    body = response(q, answer, authority, additional)
    out = dns.message.from_wire(trim.minimal(*wire.strip_opt(body)[:2], q))
    kept = {rrset.name.to_text() for rrset in out.answer}
    assert "victim.example.net." not in kept and "stray.example.com." not in kept
    assert not out.additional
    if out.answer and out.answer[-1].rdtype == 1:
        assert not out.authority
    for rrset in out.authority:
        assert q.name.is_subdomain(rrset.name)


def test_minimal_leaves_clean_answers_untouched():
    q = make_query("q.example.org", "A")
    body, recs, _ = wire.strip_opt(response(q, ["q.example.org. 60 IN A 192.0.2.1"]))
    assert trim.minimal(body, recs, q) is body


def with_forward_pointer(record: int) -> tuple[bytes, object]:
    """An answer plus an NS record, one record's owner pointing past the end (never valid)."""
    q = make_query("q.example.org", "A")
    body = bytearray(
        response(q, ["q.example.org. 60 IN A 192.0.2.1"], ["example.org. 60 IN NS ns.example.org."])
    )
    off = wire.records(bytes(body))[1][record].name_off
    body[off : off + 2] = bytes([0xC0 | (len(body) >> 8), len(body) & 0xFF])
    return bytes(body), q


def test_minimal_rejects_forward_pointers():
    body, q = with_forward_pointer(0)
    with pytest.raises(ValueError):
        trim.minimal(*wire.strip_opt(body)[:2], q)


def test_malformed_records_that_are_cut_do_not_matter():
    body, q = with_forward_pointer(1)
    out = dns.message.from_wire(trim.minimal(*wire.strip_opt(body)[:2], q))
    assert [r.rdtype for r in out.answer] == [1] and not out.authority


@pytest.mark.parametrize(
    ("listen", "upstream", "loop"),
    [
        ("0.0.0.0:53", "192.0.2.53", False),  # not an address of this host
        ("0.0.0.0:53", "127.0.0.1", True),
        ("0.0.0.0:5353", "127.0.0.1", False),  # other port
        ("127.0.0.1:53", "127.0.0.1:53", True),
        ("[::]:53", "::1", True),
    ],
)
def test_own_listener_is_rejected_wildcards_included(listen, upstream, loop):
    from dnsproxy.config import ServerConfig
    from dnsproxy.errors import ConfigError

    server = ServerConfig(listen=(listen,))
    if loop:
        with pytest.raises(ConfigError, match="own listener"):
            build_step("forward", {"upstreams": [upstream]}, server=server)
    else:
        build_step("forward", {"upstreams": [upstream]}, server=server).close()


@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_path_agrees_with_minimal_or_declines(case):
    """The one-pass path for plain answers gives the same bytes as the general one."""
    answer, authority, additional = CASES[case]
    q = make_query("q.example.org", "A")
    body = response(q, answer, authority, additional)
    direct = trim.direct_answer(body, q)
    if direct is not None:
        assert direct == trim.relayed(trim.minimal(*wire.strip_opt(body)[:2], q))
    assert (direct is not None) == (case in ("clean", "glue and ns"))


def test_system_upstreams_come_from_resolv_conf_minus_our_listener(tmp_path, monkeypatch):
    from dnsproxy.config import ServerConfig
    from dnsproxy.errors import ConfigError

    conf = tmp_path / "resolv.conf"
    monkeypatch.setattr(transport, "RESOLV_CONF", conf)
    server = ServerConfig(listen=("127.0.0.1:53",))
    conf.write_text("# only ourselves\nnameserver 127.0.0.1\nsearch example.org\n")
    with pytest.raises(ConfigError, match="'system': no usable nameserver"):
        build_step("forward", {"upstreams": ["system"]}, server=server)
    conf.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    step = build_step("forward", {"upstreams": ["system"]}, server=server)
    assert [u.name for u in step.upstreams] == ["udp://192.0.2.53:53", "udp://[fe80::1]:53"]
    step.close()


class Broken:
    """A transport with only the async ``exchange`` (run in a task), failing as told."""

    def __init__(self, name: str, exc: Exception) -> None:
        self.name = name
        self.exc = exc

    async def exchange(self, req):
        await trio.sleep(0)
        raise self.exc

    def close(self) -> None:
        pass


async def test_failing_task_transports_fail_over_then_servfail(nursery):
    """Errors of transports run in a task (a bug's exception too) are attempts that
    failed: the next upstream is asked, and with none left the client gets EDE 23."""
    good = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.7"]}])
    step = build_step("forward", {"upstreams": [good.addr]})
    broken = [
        Broken("bug://a", RuntimeError("transport bug")),
        Broken("err://b", UpstreamError("refused by peer")),
    ]
    for up in broken:
        step.health[up.name] = ask.Health()
    step.upstreams[:0] = broken
    with trio.fail_after(5):
        reply = await run_chain([step], make_query("t.example.org"))
    assert reply.message().answer[0][0].address == "192.0.2.7"
    assert [step.health[u.name].errors for u in broken] == [1, 1]

    step.upstreams[:] = broken
    with trio.fail_after(5):
        reply = await run_chain([step], make_query("u.example.org"))
    assert reply.rcode == wire.SERVFAIL
    ((code, text),) = reply.ede
    assert code == 23 and "RuntimeError: transport bug" in text and "refused by peer" in text


async def test_finished_queries_leave_no_garbage_cycles(nursery):
    """Each upstream query's state is freed as soon as it is answered, by reference
    counting alone, not left for the garbage collector. Failover included."""
    import gc

    bad = await start(nursery, [{"rcode": "SERVFAIL"}])
    good = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.9"]}])
    step = build_step("forward", {"upstreams": [bad.addr, good.addr]})
    with trio.fail_after(5):
        await run_chain([step], make_query("warm.example.org"))
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(5):
            for i in range(20):
                reply = await run_chain([step], make_query(f"n{i}.example.org"))
                assert reply.rcode == 0
        left = [o for o in gc.get_objects() if isinstance(o, ask.Ask)]
    finally:
        gc.enable()
    assert left == []


@pytest.mark.parametrize("value", [0, 17])
def test_max_follow_is_validated(value):
    with pytest.raises(ConfigError, match="max_follow"):
        build_step("forward", {"upstreams": ["192.0.2.1"], "max_follow": value})


@pytest.mark.parametrize(("limit", "rcode"), [(1, wire.SERVFAIL), (2, wire.NOERROR)])
async def test_max_follow_bounds_targets_followed(nursery, limit, rcode):
    a = await start(nursery, [{"answer": ["{qname} 300 IN CNAME x.b.test."]}])
    b = await start(nursery, [{"answer": ["{qname} 300 IN CNAME y.c.test."]}])
    c = await start(nursery, [{"answer": ["{qname} 300 IN A 192.0.2.3"]}])
    steps = [
        (
            build_step("forward", {"upstreams": [a.addr], "max_follow": limit}),
            {"zones": ["a.test"]},
        ),
        (
            build_step("forward", {"upstreams": [b.addr], "max_follow": limit}),
            {"zones": ["b.test"]},
        ),
        build_step("forward", {"upstreams": [c.addr]}),
    ]
    with trio.fail_after(5):
        reply = await run_chain(steps, make_query("q.a.test"))
    assert reply.rcode == rcode
    if rcode == wire.NOERROR:
        assert len(reply.message().answer) == 3


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200),
    counts=st.tuples(st.integers(0, 4), st.integers(0, 4), st.integers(0, 4)),
    qclass=st.sampled_from([1, 3, 255]),
)
def test_scrub_and_minimal_raise_only_value_error(body, counts, qclass):
    """Whatever an upstream sends, the class/TTL scrub and the trim either give a message
    dnspython reads or raise ValueError (the attempt's "malformed answer")."""
    q = make_query("q.example.org")
    q.qclass = qclass
    data = struct.pack("!HHHHHH", 7, 0x8580, 1, *counts) + q.question + body
    try:
        stripped, recs, _ = wire.strip_opt(data)
        out = trim.relayed(trim.minimal(*trim.scrub(stripped, recs, q), q))
    except ValueError:
        return
    if any(r.rclass != qclass for r in wire.records(out)[1]) and qclass != 255:
        raise AssertionError("a record of another class survived")
    assert not out[2] & 0x04 and out[3] & 0x80


def upstream_answer(q, *, flags: int = 0x8580, records: bytes = b"", ar: bytes = b"") -> bytes:
    """An upstream's answer to ``q`` as built by hand: ``records`` (wire form, answer
    section), then an OPT record carrying ``ar`` as its options."""
    an = 0
    off = 0
    while off < len(records):  # count the hand-built records
        off = wire.skip_name(records, off)
        off += 10 + struct.unpack_from("!H", records, off + 8)[0]
        an += 1
    header = wire.HEADER.pack(q.id, flags, 1, an, 0, 1)
    return header + q.question + records + wire.opt_record(1232, False, ar)


def rr_a(ttl: int = 60, rclass: int = 1, owner: bytes = b"\xc0\x0c", rtype: int = 1) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, 4) + bytes([192, 0, 2, 1])


NAME_Q = b"\x01q\x07example\x03org\x00"
# case: (flags, answer records, options in the upstream's OPT, taken by the fast path)
DIRECT_CASES = {
    "plain": (0x8580, rr_a(), b"", True),
    "two records": (0x8580, rr_a() * 2, b"", True),
    "EDNS options in the answer's OPT": (0x8580, rr_a(), wire.edns_option(10, b"c" * 16), True),
    "truncated": (0x8780, rr_a(), b"", True),  # TC kept: forward retries over TCP
    "owner written out": (0x8580, rr_a(owner=NAME_Q), b"", False),
    "owner pointer elsewhere": (0x8580, rr_a(owner=b"\xc0\x0e"), b"", False),
    "top-bit TTL": (0x8580, rr_a(ttl=1 << 31), b"", False),
    "another class": (0x8580, rr_a(rclass=3), b"", False),
    "another type first": (0x8580, rr_a(rtype=28) + rr_a(), b"", False),
    "nxdomain": (0x8583, b"", b"", False),
}


@pytest.mark.parametrize("case", sorted(DIRECT_CASES))
def test_direct_path_falls_back_where_it_must(case):
    """The wire fast path for plain answers takes only what it can relay unchanged but for
    the header; everything else goes the general way, and both agree where both apply."""
    flags, records, ar, direct = DIRECT_CASES[case]
    q = make_query("q.example.org", "A")
    data = upstream_answer(q, flags=flags, records=records, ar=ar)
    fast = trim.direct_answer(data, q)
    assert (fast is not None) == direct
    if fast is None:
        return
    out = dns.message.from_wire(fast)
    general = dns.message.from_wire(trim.relayed(trim.minimal(*wire.strip_opt(data)[:2], q)))
    assert out == general and out.answer == general.answer and out.edns < 0  # no OPT relayed
    assert fast[2] & 0x04 == 0 and fast[3] & 0x80  # AA cleared, RA set
    assert bool(fast[2] & 0x02) == (case == "truncated")
    assert struct.unpack_from("!HHH", fast, 6) == (data[7], 0, 0)  # every answer record kept


def test_direct_path_declines_a_record_running_past_the_end():
    q = make_query("q.example.org", "A")
    data = upstream_answer(q, records=rr_a())[: -11 - 2]  # OPT gone, rdata cut short
    assert trim.direct_answer(data, q) is None
    with pytest.raises(ValueError):
        trim.trim(data, q)


def test_direct_path_declines_an_answer_count_past_the_records():
    """ANCOUNT says two records, the message ends after one: the second record's fixed
    part is read past the end, and the fast path declines rather than fail."""
    q = make_query("q.example.org", "A")
    data = upstream_answer(q, records=rr_a())
    data = data[:6] + struct.pack("!HHH", 2, 0, 0) + data[12:-11]  # ANCOUNT 2, no OPT
    assert trim.direct_answer(data, q) is None
    with pytest.raises(ValueError):
        trim.trim(data, q)


def test_an_upstream_0x20_answer_reaches_the_client_in_its_own_case():
    """The upstream echoes the question in another case (0x20): the fast path keeps its
    bytes, and finalize gives the client back its own spelling."""
    client = make_query("Q.eXample.ORG", "A")
    upstream_q = make_query("q.EXAMPLE.org", "A")
    data = upstream_answer(upstream_q, records=rr_a())
    assert data[12 : 12 + len(client.qname)].lower() == client.key  # what `matches` checks
    fast = trim.direct_answer(data, client)
    assert fast is not None
    out = finalize(Reply(fast), client, 1232)
    assert out[12 : 12 + len(client.qname)] == client.qname
    assert dns.message.from_wire(out).answer[0][0].address == "192.0.2.1"


def test_a_forwarded_answer_larger_than_the_client_takes_is_truncated():
    client = make_query("q.example.org", "A", edns=False)  # 512 bytes
    records = b"".join(
        b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, i]) for i in range(40)
    )
    fast = trim.direct_answer(upstream_answer(client, records=records), client)
    assert fast is not None and len(fast) > 512
    out = finalize(Reply(fast), client, 1232)
    msg = dns.message.from_wire(out)
    assert msg.flags & dns.flags.TC and not msg.answer and len(out) <= 512
