"""guards without servers; the real process against nsd is tests/integration/test_listeners_guards.py."""

from __future__ import annotations

from dnsproxy import wire
from dnsproxy.reply import EDE_BLOCKED
from dnsproxy.testing import Answer, build_step, make_query, run_chain


async def test_a_rebinding_answer_counts_as_blocked_and_a_public_one_does_not():
    """guards/README.md: the NXDOMAIN that replaces a private address for a public name is
    counted as blocked (stats, query log); the answers it lets through are not."""
    step = build_step("guards", {})
    upstream = Answer({"lan.example.org": "192.168.1.10", "www.example.org": "192.0.2.1"})
    reply = await run_chain([step, upstream], make_query("lan.example.org"))
    assert reply is not None and reply.rcode == wire.NXDOMAIN
    assert (reply.ede, reply.source, reply.blocked) == (
        ((EDE_BLOCKED, "rebinding"),),
        "guards",
        True,
    )
    reply = await run_chain([step, upstream], make_query("www.example.org"))
    assert reply is not None and reply.rcode == wire.NOERROR and not reply.blocked
