"""What the blocklist says about a decision: the rule as its list writes it, the other
lists that match, the exception that let a name through; and its config errors (issue 21)."""

from __future__ import annotations

import pytest
from dnsproxy.plugins.blocklist.parse import parse_list

from dnsproxy.errors import ConfigError
from dnsproxy.testing import Answer, build_step, make_query, run_chain
from tests.conftest import BLOCKLISTS
from tests.plugins.test_blocklist import UPSTREAM, load_now, write


async def explained(tmp_path, table, name):
    """(trace lines, rule note as text) for one query through a loaded step."""
    step = await load_now(build_step("blocklist", table, base_dir=tmp_path))
    q = make_query(name)
    q.trace = []
    step.query(q)
    notes = q.notes or {}
    return q.trace, str(notes["rule"]) if "rule" in notes else None


@pytest.mark.parametrize(
    ("lines", "name", "rule"),
    [
        (["0.0.0.0 ads.example.org"], "x.ads.example.org", "ads.example.org"),
        (["*.ads.example.org"], "x.ads.example.org", "*.ads.example.org"),
        (["address=/ads.example.org/0.0.0.0"], "ads.example.org", "ads.example.org"),
        (["||ads.example.org^", "||b.example^"], "x.ads.example.org", "||ads.example.org^"),
        (["|ads.example.org^", "||b.example^"], "ads.example.org", "|ads.example.org^"),
        (["||ads.example.org^$important"], "ads.example.org", "||ads.example.org^$important"),
        (["/^track[0-9]+\\./"], "track1.example.org", "/^track[0-9]+\\./"),
    ],
)
async def test_rule_in_the_lists_own_syntax(tmp_path, lines, name, rule):
    write(tmp_path, "list.txt", *lines)
    trace, note = await explained(tmp_path, {"lists": ["list.txt"]}, name)
    assert note == rule
    assert trace == [
        f"test.toml: chain[0] (blocklist): blocked by list.txt: {name} matched {rule!r}"
    ]


async def test_other_lists_and_the_winning_exception(tmp_path):
    write(tmp_path, "a.hosts", "0.0.0.0 example.org")
    write(tmp_path, "b.txt", "||ads.example.org^", "@@||www.example.org^", "||x.example^")
    write(tmp_path, "allow.txt", "cdn.example.org")
    table = {"lists": ["a.hosts", "b.txt"], "allow": ["allow.txt"]}
    trace, note = await explained(tmp_path, table, "t.ads.example.org")
    assert note == "||ads.example.org^"
    assert trace[0].endswith(
        "blocked by b.txt: t.ads.example.org matched '||ads.example.org^'; "
        "also matched: a.hosts 'example.org'"
    )
    trace, note = await explained(tmp_path, table, "www.example.org")
    assert note == "allowed by b.txt: @@||www.example.org^"
    assert trace[0].endswith(
        "allowed by b.txt: www.example.org matched '@@||www.example.org^'; "
        "also matched: a.hosts 'example.org'"
    )
    trace, note = await explained(tmp_path, table, "cdn.example.org")
    assert note == "allowed by allow.txt: cdn.example.org"  # allow lists: no @@
    trace, note = await explained(tmp_path, table, "unlisted.example.net")
    assert (trace, note) == ([], None)


async def test_cname_block_names_the_target_and_the_deciding_step(tmp_path):
    write(tmp_path, "ads.txt", "||tracker.example.net^")
    step = await load_now(build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path))
    q = make_query("cdn.example.org")  # the upstream answers CNAME tracker.example.net
    q.trace = []
    reply = await run_chain([step, Answer(UPSTREAM)], q)
    assert reply.source == "blocklist"
    where = "test.toml: chain[0] (blocklist)"
    assert (
        f"{where}: blocked by ads.txt: CNAME target tracker.example.net matched "
        "'||tracker.example.net^'"
    ) in q.trace
    assert q.trace[-1] == f"{where}: answered (rcode 0) instead of the reply"
    assert str(q.notes["rule"]) == "||tracker.example.net^ (CNAME target tracker.example.net)"


def test_a_network_in_blocklist_allow_points_to_server_allow(tmp_path):
    write(tmp_path, "ads.txt", "ads.example.org")
    with pytest.raises(ConfigError) as exc:
        build_step(
            "blocklist", {"lists": ["ads.txt"], "allow": ["127.0.0.1/32"]}, base_dir=tmp_path
        )
    (line,) = exc.value.lines
    assert line.startswith("test.toml: chain[0] (blocklist): option 'allow': '127.0.0.1/32'")
    assert "blocklist allow takes list files" in line and "use [server] allow" in line
    assert "no such file" not in line


@pytest.mark.parametrize(
    ("name", "adblock"),
    [("basic.hosts", False), ("basic.dnsmasq.conf", False), ("tracking.domains", False),
     ("tracking.adblock", True)],
)  # fmt: skip
def test_list_syntax_is_known_by_both_parsers(name, adblock):
    data = (BLOCKLISTS / name).read_bytes()
    fast, slow = parse_list(data), parse_list(data, fast=False)
    assert fast.in_adblock_syntax is slow.in_adblock_syntax is adblock
