"""docs/writing-a-plugin.md: its example plugins work, and every Python block in it is
an excerpt of a file in the tree (so the guide cannot drift from code that runs)."""

from __future__ import annotations

import re

import dns.rcode
import pytest

from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_BLOCKED
from dnsproxy.testing import Answer, build_step, chain_of, make_query, run_chain
from tests.conftest import ROOT

GUIDE = ROOT / "docs" / "writing-a-plugin.md"
EXAMPLES = ROOT / "docs" / "examples"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
GAP = re.compile(r"^\s*# \.\.\.$", re.M)  # a line "# ..." leaves out lines of the file


def test_every_python_block_of_the_guide_is_an_excerpt_of_a_real_file():
    blocks = BLOCK.findall(GUIDE.read_text())
    assert len(blocks) >= 8
    for block in blocks:
        first, _, body = block.partition("\n")
        assert first.startswith("# "), f"a block must start with '# <path>': {first!r}"
        source = (ROOT / first[2:].strip()).read_text()
        pos = 0
        for part in GAP.split(body):
            part = part.strip("\n")
            found = source.find(part, pos)
            assert found >= 0, f"{first[2:]}: not in the file (in this order):\n{part}"
            pos = found + len(part)


async def test_deny_names_answers_nxdomain_for_names_and_subdomains():
    step = build_step(EXAMPLES / "deny_names.py", {"names": ["ads.example"]})
    upstream = Answer({"www.example": "192.0.2.1"})
    reply = await run_chain([step, upstream], make_query("x.ads.example"))
    assert reply is not None and reply.rcode == dns.rcode.NXDOMAIN
    assert reply.ede == ((EDE_BLOCKED, "denied"),) and reply.source == "deny_names"
    assert reply.blocked  # EDE 15: counted as blocked in the stats and the query log
    reply = await run_chain([step, upstream], make_query("www.example"))
    assert reply is not None and reply.rcode == dns.rcode.NOERROR
    assert [q.text for q in upstream.seen] == ["www.example."]
    assert {m.name: m.value for m in step.metrics()} == {"denied": 1}


def test_deny_names_reports_bad_options_like_the_loader():
    with pytest.raises(ConfigError, match=r"\(deny_names\): missing required option 'names'"):
        build_step(EXAMPLES / "deny_names.py", {})
    with pytest.raises(ConfigError, match=r"option 'ttl': must be between 0 and 86400"):
        build_step(EXAMPLES / "deny_names.py", {"names": ["a.example"], "ttl": -1})
    with pytest.raises(ConfigError, match=r"\(deny_names\): names: "):
        build_step(EXAMPLES / "deny_names.py", {"names": ["a" * 64 + ".example"]})


async def test_deny_names_respects_its_scope():
    step = build_step(
        EXAMPLES / "deny_names.py", {"names": ["games.example"], "clients": ["10.0.0.0/8"]}
    )
    chain = chain_of([step, Answer({"games.example": "192.0.2.7"})])
    kid = await run_chain(chain, make_query("games.example", client="10.1.2.3"))
    adult = await run_chain(chain, make_query("games.example", client="192.168.1.9"))
    assert (kid.rcode, adult.rcode) == (dns.rcode.NXDOMAIN, dns.rcode.NOERROR)


async def test_ttl_cap_lowers_ttls_without_touching_the_reply_it_was_given():
    step = build_step(EXAMPLES / "ttl_cap.py", {"max_ttl": 60})
    upstream = Answer({"www.example": ["CNAME web.example.", "A 192.0.2.1"]}, ttl=3600)
    q = make_query("www.example")
    original = upstream.query(q)
    kept = original.wire
    capped = step.response(q, original)
    assert capped is not original and original.wire == kept  # the given reply is untouched
    assert [rrset.ttl for rrset in capped.message().answer] == [60, 60]
    reply = await run_chain([step, upstream], make_query("www.example"))
    assert [rrset.ttl for rrset in reply.message().answer] == [60, 60]
    short = Answer({"www.example": "192.0.2.1"}, ttl=30)
    same = short.query(q)
    assert step.response(q, same) is same  # nothing to cap: the same object goes on
    assert {m.name: m.value for m in step.metrics()} == {"capped": 2}
