"""Unit tests of the ratelimit step: BIND RRL accounting, the query limit, minimal ANY."""

from __future__ import annotations

import logging

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
from dnsproxy.plugins.ratelimit import RateLimit
from dnsproxy.plugins.ratelimit.accounts import soa_zone

from dnsproxy import wire
from dnsproxy.chain import Step
from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_RATE_LIMITED, Reply, finalize, respond, response_message
from dnsproxy.testing import Answer, build_step, make_query, make_setup, run_chain

RECORDS = {"www.example.org": ["A 192.0.2.1", "AAAA 2001:db8::1"], "mail.example.org": "192.0.2.2"}


class Fixed(Step):
    """A stub "next" step answering every query with one rcode (and an SOA if asked)."""

    def __init__(self, rcode: int, soa_zone: str | None = None) -> None:
        super().__init__(None, make_setup("fixed"))
        self.rcode = rcode
        self.soa_zone = soa_zone

    def query(self, q):
        msg = response_message(q, self.rcode)
        if self.soa_zone:
            msg.authority.append(
                dns.rrset.from_text(
                    self.soa_zone, 60, "IN", "SOA", "ns.example.org. admin.example.org. 1 2 3 4 5"
                )
            )
        return Reply.from_message(msg, source="fixed")


def rl(**table) -> RateLimit:
    step = build_step("ratelimit", table)
    assert isinstance(step, RateLimit)
    return step


async def outcomes(steps, n: int, name: str = "www.example.org", rdtype: str = "A", **kw):
    """Send ``n`` queries at once; "pass", "slip" (TC, empty) or "drop" for each."""
    out = []
    for _ in range(n):
        reply = await run_chain(steps, make_query(name, rdtype, **kw))
        out.append(kind(reply))
    return out


def kind(reply: Reply | None) -> str:
    if reply is None:
        return "drop"
    if reply.truncated:
        assert reply.ancount == 0
        return "slip"
    if reply.ede == ((EDE_RATE_LIMITED, ""),):
        return "refused"
    return "pass"


async def test_first_r_pass_then_every_second_limited_response_slips():
    steps = [rl(responses_per_second=5), Answer(RECORDS)]
    got = await outcomes(steps, 12)
    assert got == ["pass"] * 5 + ["slip", "drop"] * 3 + ["slip"]


@pytest.mark.parametrize(
    ("slip", "pattern"),
    [(0, ["drop"] * 6), (1, ["slip"] * 6), (3, ["slip", "drop", "drop"] * 2)],
)
async def test_slip_ratio(slip, pattern):
    steps = [rl(responses_per_second=2, slip=slip), Answer(RECORDS)]
    assert await outcomes(steps, 8) == ["pass", "pass", *pattern]


async def test_slipped_response_is_header_and_question_with_tc():
    step = rl(responses_per_second=1, slip=1)
    q = make_query("WWW.example.org", "A")
    await run_chain([step, Answer(RECORDS)], q)
    reply = await run_chain([step, Answer(RECORDS)], q)
    assert reply is not None
    msg = dns.message.from_wire(finalize(reply, q, 1232))
    assert msg.flags & dns.flags.TC
    assert msg.rcode() == dns.rcode.NOERROR
    assert msg.id == q.id
    assert str(msg.question[0].name) == "WWW.example.org."
    assert not msg.answer and not msg.authority and not msg.additional
    assert [(o.otype, o.code) for o in msg.options] == [(dns.edns.EDE, EDE_RATE_LIMITED)]
    assert q.notes == {"ratelimit": "slip"}


async def test_steady_rate_passes_and_recovery_after_window(autojump_clock):
    steps = [rl(responses_per_second=5, window=10, slip=0), Answer(RECORDS)]
    for _ in range(50):  # exactly R per second, for 10 s: never limited
        assert await outcomes(steps, 1) == ["pass"]
        await trio.sleep(0.2)
    assert "drop" in await outcomes(steps, 200)  # flood: balance bottoms at -window*R
    await trio.sleep(9)
    assert await outcomes(steps, 1) == ["drop"]  # still owed after less than a window
    await trio.sleep(2)
    assert await outcomes(steps, 1) == ["pass"]


async def test_recovery_is_bounded_by_window_not_flood_length(autojump_clock):
    steps = [rl(responses_per_second=2, window=3, slip=0), Answer(RECORDS)]
    for _ in range(20):  # a long flood still owes at most window*R
        await outcomes(steps, 50)
        await trio.sleep(1)
    await trio.sleep(3.6)
    assert await outcomes(steps, 1) == ["pass"]


async def test_classes_and_qtypes_are_independent():
    step = rl(responses_per_second=2, slip=0)
    answers = Answer(RECORDS)
    assert await outcomes([step, answers], 4) == ["pass", "pass", "drop", "drop"]
    assert await outcomes([step, answers], 2, rdtype="AAAA") == ["pass", "pass"]
    assert await outcomes([step, answers], 2, name="mail.example.org") == ["pass", "pass"]
    assert await outcomes([step, answers], 2, rdtype="MX") == ["pass", "pass"]  # NODATA
    assert await outcomes([step, Fixed(wire.SERVFAIL)], 2) == ["pass", "pass"]
    assert await outcomes([step, Fixed(wire.NXDOMAIN)], 2) == ["pass", "pass"]


async def test_nodata_is_keyed_by_name_for_any_type():
    step = rl(responses_per_second=2, slip=0)
    got = [
        kind(await run_chain([step, Answer(RECORDS)], make_query("www.example.org", t)))
        for t in ("MX", "TXT", "SRV", "CAA")
    ]
    assert got == ["pass", "pass", "drop", "drop"]


async def test_nxdomain_flood_of_random_subdomains_shares_the_soa_zone_account():
    step = rl(responses_per_second=3, slip=0)
    nx = Fixed(wire.NXDOMAIN, soa_zone="example.org.")
    got = [
        kind(await run_chain([step, nx], make_query(f"r{i}.deep.example.org"))) for i in range(6)
    ]
    assert got == ["pass"] * 3 + ["drop"] * 3
    other = Fixed(wire.NXDOMAIN, soa_zone="example.net.")
    assert kind(await run_chain([step, other], make_query("r1.example.net"))) == "pass"
    key = next(k for k in step.responses.accounts if k[2] == -2)
    assert key[1] == wire.name_to_key("example.org")


async def test_nxdomain_without_soa_is_keyed_by_the_parent():
    step = rl(responses_per_second=2, slip=0)
    nx = Fixed(wire.NXDOMAIN)
    got = [kind(await run_chain([step, nx], make_query(f"x{i}.example.org"))) for i in range(4)]
    assert got == ["pass", "pass", "drop", "drop"]


async def test_errors_are_keyed_by_prefix_only_and_leak_at_the_slip_rate():
    step = rl(responses_per_second=2, slip=2)
    names = [f"n{i}.example.{tld}" for i, tld in enumerate(["org", "net", "com", "org", "net"])]
    got = []
    for name in names:
        reply = await run_chain([step, Fixed(wire.SERVFAIL)], make_query(name))
        got.append("drop" if reply is None else ("tc" if reply.truncated else reply.rcode))
    # SERVFAIL cannot be truncated: the slipped ones go out unchanged ("leak").
    assert got == [wire.SERVFAIL, wire.SERVFAIL, wire.SERVFAIL, "drop", wire.SERVFAIL]
    assert step.counts["leak"] == 2 and step.counts["drop"] == 1


async def test_client_prefixes_are_independent_and_aggregated():
    step = rl(responses_per_second=2, slip=0)
    steps = [step, Answer(RECORDS)]
    assert await outcomes(steps, 2, client="10.0.1.1") == ["pass", "pass"]
    assert await outcomes(steps, 1, client="10.0.1.200") == ["drop"]  # same /24
    assert await outcomes(steps, 2, client="10.0.2.1") == ["pass", "pass"]
    assert await outcomes(steps, 2, client="2001:db8:0:100::1") == ["pass", "pass"]
    assert await outcomes(steps, 1, client="2001:db8:0:1ff::2") == ["drop"]  # same /56
    assert await outcomes(steps, 1, client="2001:db8:0:200::1") == ["pass"]
    assert await outcomes(steps, 1, client="::ffff:10.0.1.9") == ["drop"]  # v4-mapped


async def test_prefix_lengths_are_configurable():
    step = rl(responses_per_second=1, slip=0, ipv4_prefix=32)
    steps = [step, Answer(RECORDS)]
    assert await outcomes(steps, 1, client="10.0.1.1") == ["pass"]
    assert await outcomes(steps, 1, client="10.0.1.2") == ["pass"]
    assert await outcomes(steps, 1, client="10.0.1.1") == ["drop"]


async def test_tcp_is_counted_never_limited():
    step = rl(responses_per_second=1, slip=0, all_per_second=1, queries_per_second=1)
    got = await outcomes([step, Answer(RECORDS)], 20, transport="tcp")
    assert got == ["pass"] * 20
    assert step.counts["tcp"] == 20
    assert not step.responses.accounts and not step.queries.accounts


async def test_exempt_clients_are_never_limited():
    step = rl(responses_per_second=1, slip=0, queries_per_second=1, exempt=["10.9.0.0/16"])
    assert await outcomes([step, Answer(RECORDS)], 10, client="10.9.8.7") == ["pass"] * 10
    assert step.counts["exempt"] == 10
    assert await outcomes([step, Answer(RECORDS)], 2, client="10.8.0.1") == ["pass", "refused"]


async def test_log_only_changes_nothing_on_the_wire():
    step = rl(responses_per_second=2, log_only=True)
    answers = Answer(RECORDS)
    q = make_query("www.example.org")
    plain = finalize(await run_chain([answers], q), q, 1232)
    for _ in range(6):
        reply = await run_chain([step, answers], q)
        assert finalize(reply, q, 1232) == plain
    assert step.counts["pass"] == 2 and step.counts["log_only"] == 4


async def test_all_per_second_never_slips():
    step = rl(all_per_second=3, slip=1)
    answers = Answer(RECORDS)
    names = ["www.example.org", "mail.example.org", "a.example.org", "b.example.org"]
    got = [kind(await run_chain([step, answers], make_query(n))) for n in names * 2]
    assert got == ["pass"] * 3 + ["drop"] * 5


async def test_table_is_bounded_and_degrades_to_not_limiting():
    step = rl(responses_per_second=1, slip=0, max_table_size=4)
    steps = [step, Answer(RECORDS)]
    assert await outcomes(steps, 2, client="10.0.0.1") == ["pass", "drop"]
    for i in range(1, 50):  # a flood from many prefixes churns the table
        await outcomes(steps, 1, client=f"10.0.{i}.1")
    assert len(step.responses.accounts) == 4
    assert step.responses.evictions == 46
    assert await outcomes(steps, 1, client="10.0.0.1") == ["pass"]  # forgotten, so fresh


async def test_query_limit_refuses_with_ede_31_and_refills(autojump_clock):
    answers = Answer(RECORDS)
    step = rl(queries_per_second=2, queries_burst=4)
    codes = []
    for _ in range(6):
        reply = await run_chain([step, answers], make_query("www.example.org"))
        codes.append(reply.rcode)
    assert codes == [0] * 4 + [wire.REFUSED] * 2
    assert len(answers.seen) == 4  # refused queries never reach the next step
    assert reply.ede == ((EDE_RATE_LIMITED, ""),)
    await trio.sleep(0.5)
    assert (await run_chain([step, answers], make_query("www.example.org"))).rcode == 0
    assert (await run_chain([step, answers], make_query("www.example.org"))).rcode == 5
    other = await run_chain([step, answers], make_query("www.example.org", client="127.0.0.2"))
    assert other.rcode == 0  # per host by default (queries_ipv4_prefix = 32)
    assert step.query_counts["refuse"] == 3


async def test_query_limit_drop():
    answers = Answer(RECORDS)
    step = rl(queries_per_second=1, queries_action="drop")
    q = make_query("www.example.org")
    assert await run_chain([step, answers], q) is not None
    q = make_query("www.example.org")
    assert await run_chain([step, answers], q) is None
    assert q.notes == {"ratelimit": "query_drop"}
    assert len(answers.seen) == 1


async def test_query_limit_log_only_passes():
    answers = Answer(RECORDS)
    step = rl(queries_per_second=1, log_only=True)
    got = [
        (await run_chain([step, answers], make_query("www.example.org"))).rcode for _ in range(3)
    ]
    assert got == [0, 0, 0]
    assert step.query_counts["log_only"] == 2


async def test_minimal_any_over_udp_only():
    answers = Answer(RECORDS)
    step = rl()
    q = make_query("www.example.org", "ANY")
    reply = await run_chain([step, answers], q)
    msg = dns.message.from_wire(finalize(reply, q, 1232))
    assert len(msg.answer) == 1
    rrset = msg.answer[0]
    assert rrset.rdtype == dns.rdatatype.HINFO and rrset.name == q.name
    assert rrset[0].cpu == b"RFC8482" and rrset[0].os == b""
    assert not answers.seen and step.any_count == 1
    await run_chain([step, answers], make_query("www.example.org", "ANY", transport="tcp"))
    assert len(answers.seen) == 1
    off = await run_chain([rl(minimal_any=False), answers], make_query("www.example.org", "ANY"))
    assert off is not None and len(answers.seen) == 2


async def test_minimal_any_answers_are_rate_limited_too():
    step = rl(responses_per_second=1, slip=0)
    assert await outcomes([step, Answer(RECORDS)], 3, rdtype="ANY") == ["pass", "drop", "drop"]


async def test_newly_limited_accounts_are_logged_at_a_bounded_rate(autojump_clock, caplog):
    caplog.set_level(logging.WARNING, logger="dnsproxy.plugins.ratelimit")
    step = rl(responses_per_second=1, slip=0, log_per_second=2)
    steps = [step, Answer(RECORDS)]
    for i in range(5):
        await outcomes(steps, 5, client=f"10.0.{i}.1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "A www.example.org responses to 10.0.0.0/24" in lines[0]
    await trio.sleep(1)
    await outcomes(steps, 5, client="10.0.9.1")
    assert "(3 similar lines suppressed)" in caplog.records[-1].getMessage()
    await outcomes(steps, 5, client="10.0.9.1")  # still limited: no new line
    assert len(caplog.records) == 3


async def test_classes_default_to_responses_per_second_and_zero_turns_one_off():
    step = rl(responses_per_second=2, nxdomains_per_second=0, errors_per_second=1, slip=0)
    assert await outcomes([step, Fixed(wire.NXDOMAIN)], 5) == ["pass"] * 5
    assert await outcomes([step, Fixed(wire.SERVFAIL)], 2) == ["pass", "drop"]
    assert await outcomes([step, Fixed(wire.NOERROR)], 3) == ["pass", "pass", "drop"]


def test_injected_clock_outside_trio():
    now = [100.0]
    step = RateLimit(
        rl(responses_per_second=1, slip=0).options, make_setup("ratelimit"), clock=lambda: now[0]
    )
    q = make_query("www.example.org")
    reply = respond(
        q, wire.NOERROR, [b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"]
    )
    assert step.response(q, reply) is reply
    assert step.response(q, reply) is None
    now[0] += 2.5
    assert step.response(q, reply) is reply


async def test_run_binds_the_runs_clock_unless_one_is_injected(autojump_clock):
    step = rl(responses_per_second=1)
    await step.run()
    start = step.clock()
    assert start == trio.current_time()
    await trio.sleep(7)
    assert step.clock() - start == 7  # the autojump clock's time, read more cheaply
    injected = RateLimit(step.options, make_setup("ratelimit"), clock=lambda: 1.5)
    await injected.run()
    assert injected.clock() == 1.5


def test_metrics_and_flush():
    now = [0.0]
    step = RateLimit(
        rl(responses_per_second=1, slip=2).options, make_setup("ratelimit"), clock=lambda: now[0]
    )
    q = make_query("www.example.org")
    reply = respond(q, wire.NXDOMAIN)
    for _ in range(4):
        step.response(q, reply)
    samples = {(m.name, m.labels): m.value for m in step.metrics()}
    assert samples[("responses", (("action", "pass"),))] == 1
    assert samples[("responses", (("action", "slip"),))] == 2
    assert samples[("responses", (("action", "drop"),))] == 1
    assert samples[("entries", ())] == 1
    step.flush()
    assert step.response(q, reply) is reply


def test_soa_zone_skips_answers_and_other_authority_records():
    q = make_query("alias.example.org")
    msg = response_message(q, wire.NXDOMAIN)
    msg.answer.append(dns.rrset.from_text(q.name, 60, "IN", "CNAME", "gone.Example.NET."))
    msg.authority.append(dns.rrset.from_text("example.net.", 60, "IN", "NS", "ns.example.net."))
    msg.authority.append(
        dns.rrset.from_text(
            "Example.NET.", 60, "IN", "SOA", "ns.example.net. a.example.net. 1 2 3 4 5"
        )
    )
    data = Reply.from_message(msg).wire
    assert soa_zone(data, b"fallback") == wire.name_to_key("example.net")
    assert soa_zone(respond(q, wire.NXDOMAIN).wire, b"fallback") == b"fallback"


async def test_malformed_authority_falls_back_to_parent():
    step = rl(responses_per_second=1, slip=0)
    q = make_query("x.example.org")
    bad = Reply(
        respond(q, wire.NXDOMAIN).wire[:2]
        + b"\x81\x83\x00\x01\x00\x00\x00\x05\x00\x00"
        + q.question
    )  # claims 5 authority records it does not have
    assert kind(step.response(q, bad)) == "pass"
    q2 = make_query("y.example.org")
    assert kind(step.response(q2, respond(q2, wire.NXDOMAIN))) == "drop"  # same parent


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"slip": 11}, "slip"),
        ({"window": 0}, "window"),
        ({"window": "2h"}, "window"),
        ({"responses_per_second": -1}, "responses_per_second"),
        ({"responses_per_second": 1.5}, "responses_per_second"),
        ({"nxdomains_per_second": "x"}, "nxdomains_per_second"),
        ({"ipv4_prefix": 33}, "ipv4_prefix"),
        ({"queries_action": "block"}, "queries_action"),
        ({"exempt": ["not-a-net"]}, "exempt"),
        ({"max_table_size": 0}, "max_table_size"),
        ({"slipp": 2}, "did you mean 'slip'"),
    ],
)
def test_bad_options_name_the_key(table, message):
    with pytest.raises(ConfigError) as info:
        build_step("ratelimit", table)
    text = str(info.value)
    assert "test.toml: chain[0] (ratelimit)" in text and message in text
