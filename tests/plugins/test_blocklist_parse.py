"""Blocklist parsing: line formats, semantics, cross-format equality, fast vs reference path."""

from __future__ import annotations

import time

import dns.message
import numpy as np
import pytest
from dnsproxy.plugins.blocklist.domainset import (
    NO_MATCH,
    cname_rdata,
    merge,
    pattern_text,
)
from dnsproxy.plugins.blocklist.parse import (
    ALLOW,
    EXACT,
    IMPORTANT,
    SUBONLY,
    BadList,
    parse_line,
    parse_list,
    to_wire,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsproxy.wire import name_to_key, read_name
from tests.conftest import BLOCKLISTS

SUB = 0


@pytest.mark.parametrize(
    ("line", "names"),
    [
        ("ads.example.org", [("ads.example.org", SUB)]),
        ("  Ads.Example.ORG.  ", [("ads.example.org", SUB)]),
        ("ads.example.org # trailing comment", [("ads.example.org", SUB)]),
        ("0.0.0.0 ads.example.org", [("ads.example.org", SUB)]),
        (
            "127.0.0.1\tads.example.org  t.example.org",
            [("ads.example.org", SUB), ("t.example.org", SUB)],
        ),
        (":: ads.example.org", [("ads.example.org", SUB)]),
        ("192.0.2.1 ads.example.org", [("ads.example.org", SUB)]),
        ("address=/ads.example.org/0.0.0.0", [("ads.example.org", SUB)]),
        (
            "address=/ads.example.org/t.example.org/",
            [("ads.example.org", SUB), ("t.example.org", SUB)],
        ),
        ("server=/ads.example.org/", [("ads.example.org", SUB)]),
        ("local=/ads.example.org/", [("ads.example.org", SUB)]),
        ("||ads.example.org^", [("ads.example.org", SUB)]),
        ("|ads.example.org^", [("ads.example.org", EXACT)]),
        ("@@||ads.example.org^", [("ads.example.org", ALLOW)]),
        ("||ads.example.org^$important", [("ads.example.org", IMPORTANT)]),
        ("@@||ads.example.org^$important", [("ads.example.org", ALLOW | IMPORTANT)]),
        ("*.ads.example.org", [("ads.example.org", SUBONLY)]),
        ("||*.ads.example.org^", [("ads.example.org", SUBONLY)]),
        ("bücher.example", [("xn--bcher-kva.example", SUB)]),
    ],
)
def test_line_formats(line, names):
    result = parse_line(line.encode())
    assert [(n.decode(), k) for n, k in result.names] == names
    assert not result.skipped and not result.error


@pytest.mark.parametrize(
    "line",
    [
        "",
        "# comment",
        "! adblock comment",
        "[Adblock Plus 2.0]",
        "127.0.0.1 localhost",
        "::1 ip6-localhost ip6-loopback",
        "0.0.0.0 0.0.0.0",
        "255.255.255.255 broadcasthost",
    ],
)
def test_lines_that_add_nothing(line):
    result = parse_line(line.encode())
    assert result.names == () and result.patterns == () and not result.error and not result.skipped


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("||ads.example.org^$third-party", "unsupported modifier $third-party"),
        ("||ads.example.org^$dnstype=AAAA", "unsupported modifier $dnstype=AAAA"),
        ("@@||ads.example.org^$client=10.0.0.1", "unsupported modifier"),
        ("example.org##.banner", "cosmetic rule"),
        ("server=/corp.example.org/10.0.0.1", "forwards"),
        ("address=/#/0.0.0.0", "every name"),
        ("||ads.example.org/path^", "URL path"),
        ("||ads.example.org", "without ^"),
        ("ads^", "unanchored"),
    ],
)
def test_unsupported_rules_are_skipped_whole(line, reason):
    result = parse_line(line.encode())
    assert reason in result.skipped
    assert result.names == () and result.patterns == ()


@pytest.mark.parametrize(
    "line",
    [
        "not a domain!",
        "0.0.0.0 bad..name",
        "0.0.0.0",
        "/unclosed(/",
        "/no-end",
        "a" * 64 + ".example.org",
        "10.0.0.1.2 x",
        "0.0.0.0 good.example.org b@d",
    ],
)
def test_errors(line):
    result = parse_line(line.encode())
    assert result.error and result.names == ()


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("/(a+)+$/", "regex with nested repetition"),
        ("/^(ad|ads)*x/", "regex with repeated alternation"),
        ("/a.*b.*c.*d.*e/", "regex with more than 3 unbounded repeats"),
        ("||a*b*c*d*.example^", "wildcard rule with more than 3 '*'"),
    ],
)
def test_slow_patterns_are_refused(line, reason):
    result = parse_line(line.encode())
    assert result.skipped == reason and result.patterns == ()


def test_long_lines_are_errors():
    assert parse_line(b"a" * 5000).error == "line longer than 4096 bytes"


def test_wildcards_and_regexes():
    assert parse_line(b"||ad*.example.org^").patterns == ((r"(?:^|\.)ad.*\.example\.org$", 0),)
    assert parse_line(b"|ad*.example.org^").patterns == ((r"^ad.*\.example\.org$", 0),)
    assert parse_line(rb"/^ads?[0-9]+\./").patterns == ((r"^ads?[0-9]+\.", 0),)
    assert parse_line(rb"@@/tracker/$important").patterns == (("tracker", ALLOW | IMPORTANT),)


def _sets(*lines: str, subdomains: bool = True, fast: bool = True):
    return parse_list("\n".join(lines).encode(), subdomains=subdomains, fast=fast)


def test_counts_and_problems_name_lines():
    parsed = _sets("# header", "ads.example.org", "||x.example.org^$third-party", "bad name here")
    assert (parsed.rules, parsed.skipped, parsed.errors) == (1, 1, 1)
    assert parsed.problems[0].startswith("line 3: unsupported modifier")
    assert parsed.problems[1].startswith("line 4: ")


def test_bounds():
    with pytest.raises(BadList, match="max_entries = 2"):
        parse_list(b"a.example\nb.example\nc.example\n", max_entries=2)
    with pytest.raises(BadList, match="max_patterns = 1"):
        parse_list(b"||a*.example^\n||b*.example^\n", max_patterns=1)


TRICKY = [
    "ads.example.org",
    "ads.example.org\r",
    "ADS.Example.org",
    "-ads.example.org",
    "ads-.example.org",
    "ads..example.org",
    ".ads.example.org",
    "ads.example.org.",
    "ads.example1",
    "ads1.example",
    "localhost",
    "0.0.0.0 localhost",
    "0.0.0.0 ads.example.org",
    "0.0.0.0  ads.example.org",
    "127.0.0.1 ads.example.org",
    ":: ads.example.org",
    "::1 ads.example.org",
    "||ads.example.org^",
    "@@||ads.example.org^",
    "server=/ads.example.org/",
    "address=/ads.example.org/#",
    "address=/ads.example.org/0.0.0.0",
    "local=/ads.example.org/",
    "||ads.example.org^|",
    "a" * 63 + ".example",
    "a" * 60 + ".example.org",
    "x_y.example.org",
    "1.2.3.4",
    "0.0.0.0 1.2.3.4",
    "server=//",
    "||^",
    "*.ads.example.org",
    "ads.example.org#c",
]


@pytest.mark.parametrize("subdomains", [True, False])
def test_fast_path_matches_reference(subdomains):
    for text in [*TRICKY, *(f"{line}\n" for line in TRICKY)]:
        fast = _sets(text, subdomains=subdomains)
        slow = _sets(text, subdomains=subdomains, fast=False)
        assert np.array_equal(fast.hashes, slow.hashes), text
        assert np.array_equal(fast.kinds, slow.kinds), text
        assert (fast.rules, fast.skipped, fast.errors) == (slow.rules, slow.skipped, slow.errors)


@pytest.mark.parametrize(
    "name", ["basic.hosts", "basic.dnsmasq.conf", "tracking.domains", "tracking.adblock"]
)
def test_fast_path_matches_reference_on_real_lists(name):
    head = b"\n".join((BLOCKLISTS / name).read_bytes().split(b"\n")[:4000])
    fast, slow = parse_list(head), parse_list(head, fast=False)
    assert np.array_equal(fast.hashes, slow.hashes)
    assert np.array_equal(fast.kinds, slow.kinds)
    assert fast.rules == slow.rules > 3900


@pytest.mark.parametrize(
    ("a", "b", "entries"),
    [
        ("basic.hosts", "basic.dnsmasq.conf", 76036),
        ("tracking.domains", "tracking.adblock", 143876),
    ],
)
def test_cross_format_equality(a, b, entries):
    start = time.monotonic()
    pa = parse_list((BLOCKLISTS / a).read_bytes())
    pb = parse_list((BLOCKLISTS / b).read_bytes())
    assert time.monotonic() - start < 10  # about 0.3 s on an idle machine
    assert pa.names == pb.names == entries
    assert np.array_equal(pa.hashes, pb.hashes)
    assert np.array_equal(pa.kinds, pb.kinds)
    assert pa.errors == pb.errors == 0


@pytest.mark.parametrize(
    "name", ["basic.hosts", "basic.dnsmasq.conf", "tracking.domains", "tracking.adblock"]
)
def test_every_domain_of_a_real_list_matches(name):
    data = (BLOCKLISTS / name).read_bytes()
    parsed = parse_list(data)
    ds = merge([(2, parsed.hashes, parsed.kinds, parsed.patterns)])
    domains = [
        line.split()[-1].strip(b"|^").removeprefix(b"server=/").rstrip(b"/").lower()
        for line in data.splitlines()
        if line and line[:1] not in b"#!"
    ]
    assert len(domains) == parsed.names
    missed = [d for d in domains if ds.verdict(to_wire(d)) >> 4 != 2]
    assert missed == []
    for domain in domains[::499]:
        assert ds.verdict(to_wire(b"deep.sub." + domain)) >> 4 == 2, domain
        assert ds.verdict(to_wire(domain + b".example.invalid")) == NO_MATCH, domain
    assert ds.verdict(name_to_key("not-listed.example.org")) == NO_MATCH


def _verdict(lines, name, subdomains=True):
    parsed = _sets(*lines, subdomains=subdomains)
    ds = merge([(1, parsed.hashes, parsed.kinds, parsed.patterns)])
    tag = ds.verdict(name_to_key(name))
    return tag if tag == NO_MATCH else "blocked"


@pytest.mark.parametrize(
    ("lines", "name", "expected"),
    [
        (["ads.example.org"], "ads.example.org", "blocked"),
        (["ads.example.org"], "x.ADS.example.org", "blocked"),
        (["ads.example.org"], "example.org", NO_MATCH),
        (["ads.example.org"], "xads.example.org", NO_MATCH),
        (["|ads.example.org^"], "ads.example.org", "blocked"),
        (["|ads.example.org^"], "x.ads.example.org", NO_MATCH),
        (["*.ads.example.org"], "ads.example.org", NO_MATCH),
        (["*.ads.example.org"], "x.ads.example.org", "blocked"),
        (["||example.org^", "@@||www.example.org^"], "www.example.org", NO_MATCH),
        (["||example.org^", "@@||www.example.org^"], "x.www.example.org", NO_MATCH),
        (["||example.org^", "@@||www.example.org^"], "ads.example.org", "blocked"),
        (["||ads.example.org^", "@@||example.org^"], "ads.example.org", NO_MATCH),
        (["||ads.example.org^$important", "@@||example.org^"], "ads.example.org", "blocked"),
        (
            ["||ads.example.org^$important", "@@||example.org^$important"],
            "ads.example.org",
            NO_MATCH,
        ),
        (["||ad*.example.org^"], "adserver.example.org", "blocked"),
        (["||ad*.example.org^"], "x.adserver.example.org", "blocked"),
        (["||ad*.example.org^"], "bad.example.org", NO_MATCH),
        (["ad*.example.org"], "x.ad1.example.org", "blocked"),
        (["ad*.example.org"], "bad1.example.org", NO_MATCH),
        (["||ad*.example.org^"], "adserver.example.org.evil.net", NO_MATCH),
        (["/^track[0-9]+\\./"], "track42.example.org", "blocked"),
        (["/^track[0-9]+\\./"], "tracker.example.org", NO_MATCH),
        (["/^track[0-9]+\\./", "@@|track1.example.org^"], "track1.example.org", NO_MATCH),
    ],
)
def test_semantics(lines, name, expected):
    assert _verdict(lines, name) == expected


def test_subdomains_false_makes_plain_entries_exact():
    assert _verdict(["ads.example.org"], "x.ads.example.org", subdomains=False) == NO_MATCH
    assert _verdict(["ads.example.org"], "ads.example.org", subdomains=False) == "blocked"
    assert _verdict(["||ads.example.org^"], "x.ads.example.org", subdomains=False) == "blocked"


def test_cname_rdata_walks_only_the_answer_section():
    msg = dns.message.from_text(
        """id 1
opcode QUERY
rcode NOERROR
flags QR RD RA
;QUESTION
a.example.org. IN A
;ANSWER
a.example.org. 60 IN CNAME b.example.org.
b.example.org. 60 IN CNAME c.example.net.
c.example.net. 60 IN A 192.0.2.1
;AUTHORITY
example.org. 60 IN CNAME d.example.org.
"""
    ).to_wire()
    found = cname_rdata(msg, 16)
    assert [read_name(msg, off) for off in found] == [
        name_to_key("b.example.org"),
        name_to_key("c.example.net"),
    ]
    assert len(cname_rdata(msg, 1)) == 1
    with pytest.raises(ValueError):
        cname_rdata(msg[:40], 16)


def test_wire_helpers():
    assert to_wire(b"ads.example") == b"\x03ads\x07example\x00"
    assert pattern_text(b"\x03a.b\x03org\x00") is None
    assert pattern_text(b"\x03a\xffb\x03org\x00") is None
    assert pattern_text(name_to_key("ads.example.org")) == "ads.example.org"
    assert pattern_text(b"\x00") is None


PREFIXES = ["", "0.0.0.0 ", "127.0.0.1 ", ":: ", "::1 ", "||", "@@||", "server=/", "address=/"]
SUFFIXES = ["", "^", "/", "/#", "/0.0.0.0", "^$important", " # c", "."]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(PREFIXES),
            st.one_of(
                st.from_regex(r"[a-zA-Z0-9_.\-]{1,70}", fullmatch=True),
                st.text(alphabet="aZ0.-_*|^@$/# \t\r", max_size=70),
            ),
            st.sampled_from(SUFFIXES),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_fast_path_matches_reference_on_generated_lines(parts, subdomains):
    text = "\n".join(p + body + s for p, body, s in parts).encode()
    fast = parse_list(text, subdomains=subdomains)
    slow = parse_list(text, subdomains=subdomains, fast=False)
    assert np.array_equal(fast.hashes, slow.hashes)
    assert np.array_equal(fast.kinds, slow.kinds)
    assert (fast.rules, fast.skipped, fast.errors) == (slow.rules, slow.skipped, slow.errors)
