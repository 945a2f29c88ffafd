"""The zone step: authoritative answers, wildcards, CNAME chains, delegation, transfers,
inline records, options errors and reloads."""

from __future__ import annotations

import logging
import os

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trio

from dnsproxy import wire
from dnsproxy.errors import ConfigError
from dnsproxy.testing import Answer, build_step, chain_of, make_query, run_chain

DEV_ZONE = """\
$ORIGIN dev.test.
$TTL 300
@          IN SOA ns1.dev.test. hostmaster.dev.test. 2024010101 3600 600 86400 120
@          IN NS  ns1
@          IN MX  10 mail
@          IN TXT "v=spf1 -all"
ns1        IN A   127.0.0.1
mail       IN A   192.0.2.25
mail       IN AAAA 2001:db8::25
web        IN A   192.0.2.80
web        IN AAAA 2001:db8::80
api        IN CNAME lb
lb         IN CNAME web
ext        IN CNAME www.other.test.
deleg      IN CNAME host.sub
_http._tcp IN SRV 0 5 8080 web
*.apps     IN A   192.0.2.99
*.apps     IN TXT "wild"
x.y.apps   IN A   192.0.2.100
*.cn       IN CNAME web
*          IN TXT "top wildcard"
b.ent      IN A   192.0.2.5
sub        IN NS  ns.sub
ns.sub     IN A   192.0.2.53
"""


@pytest.fixture
def zone_file(tmp_path):
    path = tmp_path / "dev.test.zone"
    path.write_text(DEV_ZONE)
    return path


def make(tmp_path, **table):
    table.setdefault("files", ["dev.test.zone"])
    return build_step("zone", table, base_dir=tmp_path)


NEXT = {
    "www.other.test": ["A 198.51.100.7"],
    "host.sub.dev.test": ["A 198.51.100.53"],
    "foo.sub.dev.test": ["A 198.51.100.54"],
    "outside.example.org": ["A 198.51.100.1"],
}


async def ask(step, name, rdtype="A", **kw):
    q = make_query(name, rdtype, **kw)
    reply = await run_chain([step, Answer(NEXT)], q)
    assert reply is not None
    return reply, dns.message.from_wire(reply.wire)


def section(rrsets):
    return sorted(
        f"{r.name.to_text().lower()} {r.ttl} {dns.rdatatype.to_text(r.rdtype)} {rd.to_text()}"
        for r in rrsets
        for rd in r
    )


SOA_NEG = "dev.test. 120 SOA ns1.dev.test. hostmaster.dev.test. 2024010101 3600 600 86400 120"


@pytest.mark.parametrize(
    ("name", "rdtype", "answer", "additional"),
    [
        ("web.dev.test", "A", ["web.dev.test. 300 A 192.0.2.80"], []),
        ("WeB.DeV.TeSt", "AAAA", ["web.dev.test. 300 AAAA 2001:db8::80"], []),
        (
            "dev.test",
            "MX",
            ["dev.test. 300 MX 10 mail.dev.test."],
            ["mail.dev.test. 300 A 192.0.2.25", "mail.dev.test. 300 AAAA 2001:db8::25"],
        ),
        (
            "_http._tcp.dev.test",
            "SRV",
            ["_http._tcp.dev.test. 300 SRV 0 5 8080 web.dev.test."],
            ["web.dev.test. 300 A 192.0.2.80", "web.dev.test. 300 AAAA 2001:db8::80"],
        ),
        ("dev.test", "NS", ["dev.test. 300 NS ns1.dev.test."], ["ns1.dev.test. 300 A 127.0.0.1"]),
        (
            "api.dev.test",
            "A",
            [
                "api.dev.test. 300 CNAME lb.dev.test.",
                "lb.dev.test. 300 CNAME web.dev.test.",
                "web.dev.test. 300 A 192.0.2.80",
            ],
            [],
        ),
        ("api.dev.test", "CNAME", ["api.dev.test. 300 CNAME lb.dev.test."], []),
        ("a.apps.dev.test", "TXT", ['a.apps.dev.test. 300 TXT "wild"'], []),
        ("z.x.apps.dev.test", "A", ["z.x.apps.dev.test. 300 A 192.0.2.99"], []),
        (
            "q.cn.dev.test",
            "A",
            ["q.cn.dev.test. 300 CNAME web.dev.test.", "web.dev.test. 300 A 192.0.2.80"],
            [],
        ),
        ("zz.dev.test", "TXT", ['zz.dev.test. 300 TXT "top wildcard"'], []),
        (
            "web.dev.test",
            "ANY",
            ["web.dev.test. 300 A 192.0.2.80", "web.dev.test. 300 AAAA 2001:db8::80"],
            [],
        ),
    ],
)
async def test_positive_answers(tmp_path, zone_file, name, rdtype, answer, additional):
    reply, msg = await ask(make(tmp_path), name, rdtype)
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & wire.AA
    assert reply.source == "zone"
    assert section(msg.answer) == answer
    assert msg.authority == []
    assert section(msg.additional) == additional


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode"),
    [
        ("nope.x.dev.test", "A", dns.rcode.NOERROR),  # the top wildcard exists: no A there
        ("web.dev.test", "MX", dns.rcode.NOERROR),  # NODATA
        ("web.dev.test", "TXT", dns.rcode.NOERROR),  # the wildcard does not cover web
        ("ent.dev.test", "A", dns.rcode.NOERROR),  # an empty non-terminal
        ("ent.dev.test", "TXT", dns.rcode.NOERROR),  # ... blocks the top wildcard
        ("y.apps.dev.test", "A", dns.rcode.NOERROR),  # ... and *.apps
        ("q.ent.dev.test", "A", dns.rcode.NXDOMAIN),  # closest encloser ent has no wildcard
        ("x.web.dev.test", "A", dns.rcode.NXDOMAIN),
        ("sub.dev.test", "DS", dns.rcode.NOERROR),  # DS at the cut is the parent's
    ],
)
async def test_negative_answers_carry_the_soa(tmp_path, zone_file, name, rdtype, rcode):
    _, msg = await ask(make(tmp_path), name, rdtype)
    assert msg.rcode() == rcode and msg.flags & wire.AA
    assert msg.answer == [] and msg.additional == []
    assert section(msg.authority) == [SOA_NEG]  # TTL min(300, minimum 120): RFC 2308


async def test_nxdomain_at_the_end_of_a_chain_keeps_the_chain(tmp_path):
    step = build_step("zone", {"records": ["a 60 CNAME gone"], "origin": "dev.test"})
    _, msg = await ask(step, "a.dev.test")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert section(msg.answer) == ["a.dev.test. 60 CNAME gone.dev.test."]
    assert [r.rdtype for r in msg.authority] == [dns.rdatatype.SOA]


async def test_cname_leaving_the_zone_is_followed_through_the_chain(tmp_path, zone_file):
    _, msg = await ask(make(tmp_path), "ext.dev.test")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & wire.AA
    assert section(msg.answer) == [
        "ext.dev.test. 300 CNAME www.other.test.",
        "www.other.test. 300 A 198.51.100.7",
    ]


async def test_cname_into_a_delegation_is_followed(tmp_path, zone_file):
    _, msg = await ask(make(tmp_path), "deleg.dev.test")
    assert section(msg.answer) == [
        "deleg.dev.test. 300 CNAME host.sub.dev.test.",
        "host.sub.dev.test. 300 A 198.51.100.53",
    ]


async def test_delegated_and_outside_names_pass_on(tmp_path, zone_file):
    step = make(tmp_path)
    for name in ("foo.sub.dev.test", "sub.dev.test", "outside.example.org"):
        reply, _ = await ask(step, name)
        assert reply.source == "answer", name
    assert step.counts["referral"] == 2


async def test_cname_loop_across_zones_is_servfail(tmp_path, zone_file):
    other = build_step("zone", {"records": ["www.other.test. CNAME ext.dev.test."]})
    chain = chain_of([make(tmp_path), other])
    with trio.fail_after(5):
        reply = await run_chain(chain, make_query("ext.dev.test"))
    assert reply is not None and reply.rcode == wire.SERVFAIL


async def test_inline_records_get_a_synthesised_soa():
    step = build_step(
        "zone",
        {
            "records": [
                "api.dev.test. 300 CNAME lb.dev.test.",
                "lb.dev.test. A 192.0.2.1",
                "_http._tcp.dev.test. SRV 0 5 8080 lb.dev.test.",
            ],
            "ttl": 60,
        },
    )
    _, msg = await ask(step, "api.dev.test")
    assert section(msg.answer) == [
        "api.dev.test. 300 CNAME lb.dev.test.",
        "lb.dev.test. 60 A 192.0.2.1",
    ]
    _, msg = await ask(step, "_http._tcp.dev.test", "SRV")
    assert section(msg.additional) == ["lb.dev.test. 60 A 192.0.2.1"]
    _, msg = await ask(step, "missing.dev.test")
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert section(msg.authority) == [
        "dev.test. 60 SOA dev.test. hostmaster.dev.test. 1 3600 600 86400 60"
    ]
    reply, _ = await ask(step, "outside.example.org")
    assert reply.source == "answer"


async def test_inline_records_join_the_file_zone_of_their_origin(tmp_path, zone_file):
    step = make(tmp_path, records=["extra 60 TXT hello"], origin="dev.test")
    _, msg = await ask(step, "extra.dev.test", "TXT")
    assert section(msg.answer) == ['extra.dev.test. 60 TXT "hello"']
    _, msg = await ask(step, "web.dev.test")
    assert section(msg.answer) == ["web.dev.test. 300 A 192.0.2.80"]


async def test_zone_origin_from_the_soa_without_origin_line(tmp_path):
    (tmp_path / "z").write_text(
        "example.org. 300 IN SOA ns.example.org. h.example.org. 7 1 1 1 30\n"
        "example.org. 300 IN NS ns.example.org.\n"
        "www.example.org. 300 IN A 192.0.2.1\n"
    )
    _, msg = await ask(make(tmp_path, files=["z"]), "www.example.org")
    assert section(msg.answer) == ["www.example.org. 300 A 192.0.2.1"]


@pytest.mark.parametrize(
    ("rdtype", "transport", "client", "allowed", "rcode"),
    [
        ("AXFR", "udp", "127.0.0.1", [], dns.rcode.REFUSED),
        ("AXFR", "tcp", "127.0.0.1", [], dns.rcode.REFUSED),
        ("AXFR", "tcp", "127.0.0.2", ["127.0.0.1/32"], dns.rcode.REFUSED),
        ("AXFR", "udp", "127.0.0.1", ["127.0.0.1/32"], dns.rcode.REFUSED),
        ("IXFR", "tcp", "127.0.0.1", [], dns.rcode.REFUSED),
        ("AXFR", "tcp", "127.0.0.1", ["127.0.0.0/8"], dns.rcode.NOERROR),
        ("IXFR", "tcp", "127.0.0.1", ["127.0.0.0/8"], dns.rcode.NOERROR),
    ],
)
async def test_transfers(tmp_path, zone_file, rdtype, transport, client, allowed, rcode):
    step = make(tmp_path, allow_transfer=allowed)
    q = make_query("dev.test", rdtype, transport=transport, client=client)
    reply = await run_chain([step, Answer(NEXT)], q)
    msg = dns.message.from_wire(reply.wire, one_rr_per_rrset=True)
    assert msg.rcode() == rcode
    if rcode == dns.rcode.REFUSED:
        assert step.counts["transfer_refused"] == 1 and msg.answer == []
        return
    types = [r.rdtype for r in msg.answer]
    assert types[0] == types[-1] == dns.rdatatype.SOA and types.count(dns.rdatatype.SOA) == 2
    assert len(msg.answer) - 1 == step.table.records == 22
    assert step.counts["transfer"] == 1


async def test_a_cache_in_front_never_serves_a_transfer_to_others(tmp_path, zone_file):
    chain = chain_of([build_step("cache", {}), make(tmp_path, allow_transfer=["127.0.0.1/32"])])
    mine = await run_chain(chain, make_query("dev.test", "AXFR", transport="tcp"))
    assert mine is not None and mine.rcode == wire.NOERROR and mine.ancount == 23
    other = make_query("dev.test", "AXFR", transport="tcp", client="127.0.0.9")
    theirs = await run_chain(chain, other)
    assert theirs is not None and theirs.rcode == wire.REFUSED


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            DEV_ZONE.replace("web        IN A   192.0.2.80", "web IN BOGUS 192.0.2.80"),
            r"^test.toml: chain\[0\] \(zone\): files: .*dev.test.zone:10: unknown rdatatype",
        ),
        (DEV_ZONE.replace("@          IN SOA", "@ IN TXT x ;"), r"files: .*dev.test.zone.*SOA"),
        (DEV_ZONE.replace("$ORIGIN dev.test.\n", ""), r"files: .*no \$ORIGIN or SOA"),
    ],
)
def test_broken_zone_file_is_one_clear_error(tmp_path, zone_file, text, message):
    zone_file.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        make(tmp_path)
    assert len(info.value.lines) == 1


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"files": ["missing"]}, r"files: .*missing: No such file"),
        ({"files": []}, "needs 'files' or 'records'"),
        ({"records": ["a.test. A 1.2.3"]}, r"records: records\[0\] 'a.test. A 1.2.3'"),
        ({"records": ["rel A 192.0.2.1"]}, r"records\[0\] .*relative name; set 'origin'"),
        ({"records": ["a.test. A 192.0.2.1", "b.example. A 192.0.2.2"]}, "set 'origin'"),
        ({"records": ["a.test. A 192.0.2.1"], "origin": "b.test"}, "outside the zone b.test"),
        ({"records": ["a.test. A 192.0.2.1"], "origin": "x..y"}, "option 'origin'"),
        ({"files": ["dev.test.zone"], "max_records": 3}, "files: more than max_records = 3"),
        ({"files": ["dev.test.zone"], "max_size": 10}, r"over max_size = 10"),
        ({"files": ["dev.test.zone"], "allow_transfer": ["nope"]}, "'nope' is not an IP network"),
        ({"files": ["dev.test.zone"], "max_follow": 0}, "option 'max_follow'"),
        ({"files": ["dev.test.zone", "dev.test.zone"]}, "zone dev.test. is also in"),
        ({"file": ["dev.test.zone"]}, "did you mean 'files'"),
    ],
)
def test_config_errors(tmp_path, zone_file, table, message):
    with pytest.raises(ConfigError, match=message):
        build_step("zone", table, base_dir=tmp_path)


async def test_changed_file_is_reloaded(tmp_path, zone_file, nursery):
    step = make(tmp_path, watch="0.1s")
    nursery.start_soon(step.run)
    zone_file.write_text(DEV_ZONE.replace("192.0.2.80", "192.0.2.81"))
    os.utime(zone_file, ns=(1, 10**18))
    with trio.fail_after(10):
        while section((await ask(step, "web.dev.test"))[1].answer)[0][-10:] != "192.0.2.81":
            await trio.sleep(0.02)
    assert step.reloads == 1 and step.failed_reloads == 0


async def test_broken_file_keeps_the_old_zone_and_logs_once(tmp_path, zone_file, nursery, caplog):
    caplog.set_level(logging.ERROR)
    step = make(tmp_path, watch="0.1s")
    nursery.start_soon(step.run)
    zone_file.write_text(DEV_ZONE + "broken IN A not-an-address\n")
    os.utime(zone_file, ns=(1, 10**18))
    with trio.fail_after(10):
        while "keeping the zones loaded before" not in caplog.text:
            await trio.sleep(0.02)
    await trio.sleep(0.5)  # several more polls: still one line
    errors = [r for r in caplog.records if "keeping the zones" in r.getMessage()]
    assert len(errors) == 1 and "dev.test.zone:" in errors[0].getMessage()
    _, msg = await ask(step, "web.dev.test")
    assert section(msg.answer) == ["web.dev.test. 300 A 192.0.2.80"]
    assert step.failed_reloads == 1 and step.reloads == 0


async def test_check_reports_every_zone(tmp_path, zone_file):
    step = make(tmp_path, records=["api.example.org. A 192.0.2.1"])
    lines = await step.check()
    assert sorted(lines) == [
        "zone dev.test.: 22 records from " + str(zone_file) + ", serial 2024010101",
        "zone example.org.: 2 records from records, serial 1",
    ]
    zone_file.write_text("garbage\n")
    with pytest.raises(ConfigError, match="files: "):
        await step.check()


async def test_metrics(tmp_path, zone_file):
    step = make(tmp_path)
    for name, rdtype in [("web.dev.test", "A"), ("nope.web.dev.test", "A"), ("web.dev.test", "MX")]:
        await ask(step, name, rdtype)
    await ask(step, "foo.sub.dev.test")
    await ask(step, "dev.test", "AXFR")
    values = {(m.name, m.labels): m.value for m in step.metrics()}
    kind = "kind"
    assert values[("answers", ((kind, "answer"),))] == 1
    assert values[("answers", ((kind, "nxdomain"),))] == 1
    assert values[("answers", ((kind, "nodata"),))] == 1
    assert values[("answers", ((kind, "referral"),))] == 1
    assert values[("answers", ((kind, "transfer_refused"),))] == 1
    assert values[("zones", ())] == 1 and values[("records", ())] == 22
    assert values[("reloads", ())] == 0 and values[("failed_reloads", ())] == 0
