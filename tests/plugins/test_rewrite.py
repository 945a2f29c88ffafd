"""rewrite: name rules with answers mapped back, type/rcode rules, TTL clamps, precedence."""

from __future__ import annotations

import dns.message
import dns.rdatatype
import dns.rrset
import pytest

from dnsproxy import wire
from dnsproxy.chain import DROP, Step
from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_SYNTHESIZED, Reply, finalize, response_message
from dnsproxy.testing import Answer, build_step, make_query, run_chain


def rewrite(*rules: dict) -> Step:
    return build_step("rewrite", {"rules": list(rules)})


def parsed(reply: Reply, q) -> dns.message.Message:
    return dns.message.from_wire(finalize(reply, q, 1232))


def answers(msg: dns.message.Message) -> list[str]:
    return sorted(rrset.to_text() for rrset in msg.answer)


class Chained(Step):
    """A stub that answers with a CNAME chain, as an authoritative server would."""

    def __init__(self, chains: dict[str, list[str]]) -> None:
        super().__init__(None, Answer({}).setup)
        self.chains = chains
        self.seen: list[str] = []

    def query(self, q):
        self.seen.append(q.text)
        msg = response_message(q)
        for line in self.chains.get(q.text, []):
            msg.answer.append(dns.rrset.from_text(*line.split(maxsplit=4)))
        soa = "example.org. 300 IN SOA ns.example.org. admin.example.org. 1 2 3 4 60"
        if not msg.answer:
            msg.set_rcode(wire.NXDOMAIN)
            msg.authority.append(dns.rrset.from_text(*soa.split(maxsplit=4)))
        return Reply.from_message(msg, source="chained")


@pytest.mark.parametrize(
    ("rule", "asked", "sent"),
    [
        ({"match": "exact", "from": "a.example.org", "to": "b.example.net"}, "a.example.org", "b.example.net."),
        ({"match": "zone", "from": "staging.example.org", "to": "example.org"}, "www.staging.example.org", "www.example.org."),
        ({"match": "zone", "from": "staging.example.org", "to": "example.org"}, "staging.example.org", "example.org."),
        ({"match": "suffix", "from": ".dev.test", "to": ".svc.example.org"}, "api.dev.test", "api.svc.example.org."),
        ({"match": "prefix", "from": "stage-", "to": "prod-"}, "stage-db.example.org", "prod-db.example.org."),
        ({"match": "substring", "from": "-staging", "to": "-prod"}, "api-staging.example.org", "api-prod.example.org."),
        ({"match": "regex", "from": r"(.+)\.(\w+)\.dev\.test", "to": "{2}-{1}.example.org"}, "Web.Shop.dev.test", "shop-web.example.org."),
    ],
)  # fmt: skip
async def test_name_rules_rewrite_the_question_and_map_the_answer_back(rule, asked, sent):
    nxt = Answer({sent: "192.0.2.7"})
    q = make_query(asked)
    reply = await run_chain([rewrite(rule), nxt], q)
    assert [s.text for s in nxt.seen] == [sent]
    msg = parsed(reply, q)
    assert msg.question[0].name.to_text() == asked + "."
    assert answers(msg) == [f"{asked}. 300 IN A 192.0.2.7"]
    assert EDE_SYNTHESIZED in [code for code, _ in reply.ede]


async def test_cname_targets_inside_the_rewritten_zone_come_back_renamed():
    nxt = Chained(
        {
            "www.example.org.": [
                "www.example.org. 300 IN CNAME lb.example.org.",
                "lb.example.org. 300 IN CNAME cdn.example.net.",
                "cdn.example.net. 60 IN A 192.0.2.80",
            ]
        }
    )
    step = rewrite({"match": "zone", "from": "staging.example.org", "to": "example.org"})
    q = make_query("www.staging.example.org")
    msg = parsed(await run_chain([step, nxt], q), q)
    assert answers(msg) == [
        "cdn.example.net. 60 IN A 192.0.2.80",
        "lb.staging.example.org. 300 IN CNAME cdn.example.net.",
        "www.staging.example.org. 300 IN CNAME lb.staging.example.org.",
    ]


async def test_negative_answer_keeps_rcode_and_question():
    step = rewrite({"match": "suffix", "from": ".dev.test", "to": ".example.org"})
    q = make_query("missing.dev.test", "AAAA")
    msg = parsed(await run_chain([step, Chained({})], q), q)
    assert msg.rcode() == wire.NXDOMAIN
    assert msg.question[0].name.to_text() == "missing.dev.test."
    assert msg.question[0].rdtype == dns.rdatatype.AAAA


async def test_subquery_keeps_id_flags_and_edns():
    step = rewrite({"match": "exact", "from": "a.example.org", "to": "b.example.org"})
    nxt = Answer({"b.example.org": "192.0.2.1"})
    q = make_query("a.example.org", do=True, cd=True, payload=4000)
    await run_chain([step, nxt], q)
    sub = nxt.seen[0]
    assert (sub.id, sub.flags, sub.edns, sub.do, sub.cd, sub.udp_size) == (
        q.id,
        q.flags,
        True,
        True,
        True,
        4000,
    )
    assert q.notes is not None and q.notes["rewrite"] == "exact a.example.org"


async def test_a_name_too_long_after_rewriting_is_yxdomain():
    step = rewrite({"match": "prefix", "from": "x", "to": "y" * 60 + "."})
    q = make_query("x" + "a" * 60 + "." + "b" * 60 + "." + "c" * 60 + "." + "d" * 50)
    reply = await run_chain([step, Answer({})], q)
    assert reply.rcode == 6


async def test_type_rule_answers_nodata_and_lets_other_types_pass():
    step = rewrite(
        {"match": "zone", "from": "v4only.example.org", "types": ["AAAA"], "rcode": "NODATA"}
    )
    nxt = Answer({"www.v4only.example.org": ["192.0.2.1", "2001:db8::1"]})
    q = make_query("www.v4only.example.org", "AAAA")
    reply = await run_chain([step, nxt], q)
    assert reply.rcode == wire.NOERROR and reply.ancount == 0
    assert reply.ede[0][0] == EDE_SYNTHESIZED
    assert nxt.seen == []
    q = make_query("www.v4only.example.org", "A")
    reply = await run_chain([step, nxt], q)
    assert reply.ancount == 1


@pytest.mark.parametrize("rcode", ["NXDOMAIN", "REFUSED"])
async def test_rcode_rules(rcode):
    step = rewrite({"match": "zone", "from": "ads.example.org", "rcode": rcode})
    nxt = Answer({"x.ads.example.org": "192.0.2.1"})
    reply = await run_chain([step, nxt], make_query("x.ads.example.org"))
    assert reply.rcode == {"NXDOMAIN": 3, "REFUSED": 5}[rcode]
    assert nxt.seen == []
    assert (await run_chain([step, nxt], make_query("example.org"))).rcode == wire.NXDOMAIN
    assert len(nxt.seen) == 1  # out of the zone: passed on


async def test_ttl_clamp_raises_and_lowers_ttls_without_touching_other_names():
    step = rewrite({"match": "zone", "from": "example.org", "ttl": [60, 600]})
    low = Answer({"a.example.org": "192.0.2.1"}, ttl=5)
    high = Answer({"a.example.org": "192.0.2.1", "example.net": "192.0.2.2"}, ttl=86400)
    q = make_query("a.example.org")
    assert parsed(await run_chain([step, low], q), q).answer[0].ttl == 60
    assert parsed(await run_chain([step, high], q), q).answer[0].ttl == 600
    q = make_query("example.net")
    assert parsed(await run_chain([step, high], q), q).answer[0].ttl == 86400
    assert step.metrics()[2].value == 2


async def test_ttl_combined_with_a_name_rule_clamps_the_rewritten_answer():
    step = rewrite({"match": "exact", "from": "a.example.org", "to": "b.example.org", "ttl": 30})
    q = make_query("a.example.org")
    reply = await run_chain([step, Answer({"b.example.org": "192.0.2.1"}, ttl=3600)], q)
    assert parsed(reply, q).answer[0].ttl == 30


async def test_exact_beats_wildcard_and_first_match_wins():
    step = rewrite(
        {"match": "zone", "from": "example.org", "rcode": "REFUSED"},
        {"match": "suffix", "from": ".example.org", "rcode": "NXDOMAIN"},
        {"match": "exact", "from": "www.example.org", "to": "web.example.net"},
    )
    nxt = Answer({"web.example.net": "192.0.2.9"})
    assert (await run_chain([step, nxt], make_query("www.example.org"))).ancount == 1
    assert (await run_chain([step, nxt], make_query("x.example.org"))).rcode == wire.REFUSED
    swapped = rewrite(
        {"match": "suffix", "from": ".example.org", "rcode": "NXDOMAIN"},
        {"match": "zone", "from": "example.org", "rcode": "REFUSED"},
    )
    assert (await run_chain([swapped, nxt], make_query("x.example.org"))).rcode == wire.NXDOMAIN
    assert (await run_chain([swapped, nxt], make_query("example.org"))).rcode == wire.REFUSED


async def test_regex_is_anchored():
    step = rewrite({"match": "regex", "from": r"ads\.example\.org", "rcode": "NXDOMAIN"})
    nxt = Answer({"ads.example.org.evil.net": "192.0.2.1"})
    assert (await run_chain([step, nxt], make_query("ads.example.org"))).rcode == wire.NXDOMAIN
    reply = await run_chain([step, nxt], make_query("ads.example.org.evil.net"))
    assert reply.ancount == 1


async def test_reply_from_downstream_is_not_mutated():
    shared = Answer({"b.example.org": "192.0.2.1"})
    step = rewrite({"match": "exact", "from": "a.example.org", "to": "b.example.org"})
    q = make_query("a.example.org")
    out = await run_chain([step, shared], q)
    direct = await run_chain([shared], make_query("b.example.org"))
    assert out.wire != direct.wire
    assert dns.message.from_wire(direct.wire).question[0].name.to_text() == "b.example.org."


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"match": "suffix", "fom": "x", "to": "y"}], "unknown key 'fom' (did you mean 'from'?)"),
        ([{"match": "suffix", "from": ".x", "to": ""}], "to: must be a non-empty name"),
        ([{"match": "glob", "from": "x", "to": "y"}], "match: must be one of"),
        ([{"match": "exact", "from": "a.example.org"}], "needs an action"),
        ([{"from": "", "rcode": "NXDOMAIN"}], "from: required"),
        ([{"from": "a.example.org", "rcode": "NOPE"}], "rcode: must be one of"),
        ([{"from": "a.example.org", "rcode": "NXDOMAIN", "ttl": 5}], "cannot be combined"),
        ([{"from": "a.example.org", "ttl": [600, 60]}], "ttl: need 0 <= min <= max"),
        ([{"from": "a.example.org", "ttl": "1h"}], "ttl: expected [min, max]"),
        ([{"match": "regex", "from": "(a", "to": "b"}], "bad regex"),
        ([{"match": "regex", "from": "(a)", "to": "{2}.example.org"}], "{2} but the regex has 1"),
        ([{"from": "a.example.org", "types": ["AAAAA"], "rcode": "NODATA"}], "unknown record type"),
        ([{"from": "a..example.org", "to": "b"}], "is not a domain name"),
        ([{"from": "a", "to": "b", "answer": "none"}], 'only "auto"'),
        (["a.example.org b.example.org"], "expected a table"),
        ([], "'rules' is empty"),
    ],
)
def test_bad_rules_are_one_clear_line(rules, message):
    with pytest.raises(ConfigError) as info:
        rewrite(*rules)
    assert len(info.value.lines) == 1
    line = info.value.lines[0]
    assert line.startswith("test.toml: chain[0] (rewrite): ") and "rules" in line
    assert message in line


def test_max_rules_is_enforced():
    rules = [{"from": f"n{i}.example.org", "rcode": "NXDOMAIN"} for i in range(3)]
    with pytest.raises(ConfigError, match="more than max_rules = 2"):
        build_step("rewrite", {"rules": rules, "max_rules": 2})


class Dropper(Step):
    """A later step that drops every query (a rate limiter)."""

    def __init__(self) -> None:
        super().__init__(None, Answer({}).setup)

    def query(self, q):
        return DROP


async def test_a_query_dropped_after_the_rewrite_is_refused():
    step = rewrite({"match": "exact", "from": "a.example.org", "to": "b.example.org"})
    reply = await run_chain([step, Dropper()], make_query("a.example.org"))
    assert reply is not None and reply.rcode == wire.REFUSED


class BlockedChained(Chained):
    """`Chained`'s answers marked blocked without an EDE and kept out of the caches."""

    def query(self, q):
        reply = super().query(q)
        return Reply(reply.wire, source="policy", blocked=True, cacheable=False)


async def test_a_rewritten_reply_stays_blocked_and_uncacheable():
    nxt = BlockedChained({"b.example.net.": ["b.example.net. 300 IN A 192.0.2.7"]})
    q = make_query("a.example.org")
    reply = await run_chain([rewrite({"from": "a.example.org", "to": "b.example.net"}), nxt], q)
    assert answers(parsed(reply, q)) == ["a.example.org. 300 IN A 192.0.2.7"]
    assert (reply.blocked, reply.cacheable, reply.source) == (True, False, "policy")
    assert EDE_SYNTHESIZED in [code for code, _ in reply.ede]
