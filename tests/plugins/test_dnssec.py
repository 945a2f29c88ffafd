"""The dnssec step's parts without servers: anchors, options, RRSIG checks and their EDE codes,
the NSEC3 iteration limit, unsupported algorithms, the bounded key store, and what the step
does with CD=1 and with answers no upstream gave. End to end: tests/integration/test_dnssec.py.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import dns.dnssec
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ed25519
from dns.dnssectypes import Algorithm
from dnsproxy.plugins.dnssec import _stripped, anchors
from dnsproxy.plugins.dnssec.validator import (
    BOGUS,
    INSECURE,
    SECURE,
    Budget,
    Validator,
    Verdict,
    supported_algorithms,
)

from dnsproxy import wire
from dnsproxy.chain import AWAIT
from dnsproxy.errors import ConfigError
from dnsproxy.reply import Reply, response_message
from dnsproxy.testing import Answer, build_step, make_query, run_chain

ZONE = dns.name.from_text("example.org.")
NOW = time.time()


def signed(*, inception: float = NOW - 3600, expiration: float = NOW + 3600):
    key = ed25519.Ed25519PrivateKey.generate()
    dnskey = dns.dnssec.make_dnskey(key.public_key(), Algorithm.ED25519, flags=257)
    keys = dns.rrset.from_rdata(ZONE, 300, dnskey)
    rrset = dns.rrset.from_text("www.example.org.", 300, "IN", "A", "192.0.2.1")
    sig = dns.dnssec.sign(
        rrset, key, ZONE, dnskey, inception=int(inception), expiration=int(expiration)
    )
    return keys, rrset, sig


def validator(**kw) -> Validator:
    kw.setdefault("max_keys", 100)
    kw.setdefault("max_iterations", 150)
    kw.setdefault("algorithms", supported_algorithms())
    return Validator(anchors.load([]), [], **kw)


# -- trust anchors ------------------------------------------------------------------------


def test_shipped_root_anchors_are_the_iana_ksks():
    root = anchors.load([])[dns.name.root]
    assert sorted(d.key_tag for d in root.ds) == [20326, 38696]
    assert {d.algorithm for d in root.ds} == {8} and {d.digest_type for d in root.ds} == {2}


def test_xml_anchor_outside_its_validity_is_left_out(tmp_path: Path):
    xml = (Path(anchors.__file__).parent / anchors.ROOT_ANCHORS).read_text()
    path = tmp_path / "anchors.xml"
    path.write_text(xml)
    before_2024 = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    root = anchors.load([path], now=before_2024)[dns.name.root]
    assert [d.key_tag for d in root.ds] == [20326]


def test_zone_file_anchors_ds_and_dnskey(tmp_path: Path):
    keys, _, _ = signed()
    path = tmp_path / "anchors"
    path.write_text(
        "; a private hierarchy\n"
        ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D\n"
        f"example.org. 300 IN DNSKEY {keys[0].to_text()}\n"
    )
    found = anchors.load([path])
    assert len(found[dns.name.root].ds) == 1
    assert found[ZONE].keys == (keys[0],)


def test_bad_anchor_file_is_a_config_error_naming_the_key(tmp_path: Path):
    path = tmp_path / "empty"
    path.write_text("; nothing\n")
    with pytest.raises(ConfigError, match=r"trust_anchors: .*no DS or DNSKEY"):
        build_step("dnssec", {"trust_anchors": [str(path)]})
    with pytest.raises(ConfigError, match="trust_anchors"):
        build_step("dnssec", {"trust_anchors": [str(tmp_path / "missing")]})


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"max_keys": 0}, "max_keys"),
        ({"max_fetches": 1000}, "max_fetches"),
        ({"nsec3_max_iterations": -1}, "nsec3_max_iterations"),
        ({"insecure_zones": ["bad..name"]}, "insecure_zones"),
    ],
)
def test_option_bounds(table, key):
    with pytest.raises(ConfigError, match=key):
        build_step("dnssec", table)


# -- RRSIG checks -------------------------------------------------------------------------


def test_good_signature_is_secure():
    keys, rrset, sig = signed()
    v = validator().verify(rrset, [sig], keys)
    assert v.status == SECURE and f"key {sig.key_tag}" in v.why


@pytest.mark.parametrize(
    ("change", "ede"),
    [
        ("tamper", 6),
        ("expired", 7),
        ("future", 8),
        ("otherkey", 9),
    ],
)
def test_bad_signatures_get_their_ede(change, ede):
    if change == "expired":
        keys, rrset, sig = signed(inception=NOW - 7200, expiration=NOW - 3600)
    elif change == "future":
        keys, rrset, sig = signed(inception=NOW + 3600, expiration=NOW + 7200)
    else:
        keys, rrset, sig = signed()
    if change == "tamper":
        rrset = dns.rrset.from_text("www.example.org.", 300, "IN", "A", "192.0.2.99")
    if change == "otherkey":
        keys = signed()[0]
    v = validator().verify(rrset, [sig], keys)
    assert (v.status, v.ede) == (BOGUS, ede)


def test_rrsig_of_an_unsupported_algorithm_is_not_used():
    keys, rrset, sig = signed()
    v = validator(algorithms=frozenset({8})).verify(rrset, [sig], keys)
    assert (v.status, v.ede) == (BOGUS, 10)


async def test_anchor_of_unsupported_algorithms_makes_the_zone_insecure():
    # RFC 6840 §5.2: no DS of a supported algorithm is an unsigned zone, not a bogus one.
    v = validator(algorithms=frozenset({13}))  # the root anchors are algorithm 8

    async def no_fetch(name, rdtype):
        raise AssertionError("nothing to fetch")

    out = await v.keys(dns.name.root, no_fetch, Budget(4))
    assert out.status == INSECURE and "RFC 6840" in out.why


async def test_nsec3_over_the_iteration_limit_is_insecure():
    n3 = dns.rrset.from_text(
        "0p9mhaveqvm6t7vbl5lop2u3t2rp3tom.example.org.",
        300,
        "IN",
        "NSEC3",
        "1 0 200 ab 2vptu5timamqttgl4luu9kg21e0aor3s A RRSIG",
    )
    v = validator(max_iterations=150)
    out = v._nsec3_denial(dns.name.from_text("nx.example.org."), 1, True, [n3])
    assert out is not None and out[0] == INSECURE and "200 iterations" in out[1]
    # Under a higher limit the same record is judged by its proof (which proves nothing here).
    assert (
        validator(max_iterations=500)._nsec3_denial(
            dns.name.from_text("nx.example.org."), 1, True, [n3]
        )
        is None
    )


# -- the key store ------------------------------------------------------------------------


def test_key_store_is_bounded_and_never_keeps_bogus():
    v = validator(max_keys=2)
    budget = Budget(4)
    for i in range(3):
        v._keep((dns.name.from_text(f"z{i}."), 48), Verdict(SECURE, ttl=60), budget)
    assert [k[0].to_text() for k in v.store] == ["z1.", "z2."]
    v._keep((dns.name.from_text("bad."), 48), Verdict(BOGUS, 6, ttl=60), budget)
    assert len(v.store) == 2 and all(k[0].to_text() != "bad." for k in v.store)


def test_key_store_entries_expire_with_their_ttl():
    clock = [1000.0]
    v = validator(clock=lambda: clock[0])
    v._keep((ZONE, 48), Verdict(SECURE, ttl=60), Budget(1))
    assert v._cached((ZONE, 48), Budget(1)) is not None
    clock[0] += 61
    assert v._cached((ZONE, 48), Budget(1)) is None and not v.store


# -- the step -----------------------------------------------------------------------------


async def test_cd_from_the_client_skips_validation():
    step = build_step("dnssec", {})
    assert step.query(make_query("www.example.org", do=True, cd=True)) is None
    assert step.query(make_query("www.example.org", do=True)) is AWAIT


async def test_answers_made_up_after_the_step_pass_unvalidated_without_ad():
    step = build_step("dnssec", {})
    local = Answer({"www.example.org": "192.0.2.1"})
    with trio.fail_after(5):
        reply = await run_chain([step, local], make_query("www.example.org", do=True))
    assert reply is not None and reply.rcode == wire.NOERROR
    assert not reply.flags & wire.AD
    assert local.seen[0].do and local.seen[0].cd  # asked with DO and CD set
    assert step.unvalidated == 1


def test_metrics_name_the_results():
    step = build_step("dnssec", {})
    names = {(m.name, m.labels) for m in step.metrics()}
    for status in (SECURE, INSECURE, BOGUS):
        assert ("answers", (("result", status),)) in names
    assert ("keys", ()) in names


async def test_names_under_no_anchor_or_under_a_negative_anchor_are_insecure(tmp_path: Path):
    keys = signed()[0]
    path = tmp_path / "anchor"
    path.write_text(f"example.org. 300 IN DNSKEY {keys[0].to_text()}\n")
    v = Validator(
        anchors.load([path]),
        [dns.name.from_text("corp.example.org.")],
        max_keys=10,
        max_iterations=150,
        algorithms=supported_algorithms(),
    )

    async def no_fetch(name, rdtype):
        raise AssertionError("nothing to fetch")

    msg = dns.message.make_response(dns.message.make_query("www.example.net.", "A"))
    out = await v.validate(dns.name.from_text("www.example.net."), 1, msg, no_fetch, Budget(4))
    assert out.status == INSECURE and "no trust anchor" in out.why  # the root is not trusted
    name = dns.name.from_text("www.corp.example.org.")
    out = await v.validate(name, 1, msg, no_fetch, Budget(4))
    assert out.status == INSECURE and "negative trust anchor" in out.why


def test_a_stripped_reply_stays_blocked_and_uncacheable():
    """The RRSIGs left out for a client without DO: everything else about the reply stays."""
    _, rrset, sig = signed()
    msg = response_message(make_query("www.example.org"))
    msg.answer += [rrset, dns.rrset.from_rdata(rrset.name, 300, sig)]
    reply = Reply.from_message(msg, source="policy", blocked=True)
    reply.cacheable = False
    out = _stripped(reply)
    assert [r.rdtype for r in out.message().answer] == [dns.rdatatype.A]
    assert (out.blocked, out.cacheable, out.source) == (True, False, "policy")
