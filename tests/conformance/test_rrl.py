"""Response rate limiting against the real proxy (CONFORMANCE.md C4 RRL row, A9).

Clients in different /24s are emulated by binding to 127.0.1.x and 127.0.2.x. Unit tests
of the accounting live with the plugin; this checks the wire: drops and TC=1 slips over
UDP for one prefix only, TCP exempt, recovery after the window.
"""

from __future__ import annotations

import socket
import time

import dns.flags
import dns.message
import dns.query
import pytest
from dnsproxy.plugins import BUILTIN

from tests.conformance.confkit import Proxy, forward_config

pytestmark = pytest.mark.skipif(
    "dnsproxy.plugins.ratelimit" not in BUILTIN, reason="ratelimit plugin not registered"
)

RRL = """
[[chain]]
plugin = "ratelimit"
responses_per_second = 2
window = 1
slip = 2
"""


@pytest.fixture
def rrl_proxy(tmp_path, upstream):
    proxy = Proxy(tmp_path, forward_config(upstream.addr, before=RRL)).start()
    yield proxy
    proxy.stop()


# How long a reply is waited for before it counts as dropped. An answer slower than this
# is miscounted as a drop, so it is as long as the accounting allows: each limited pair
# (a slip, then a drop) earns 2/s * (DROP_WAIT + the slip's round trip) of the 2 it costs,
# so the account stays in debt while the slip comes back in under 1 - DROP_WAIT seconds.
DROP_WAIT = 0.5


def _burst(addr: tuple[str, int], source: str, n: int) -> list[str]:
    """n identical queries from ``source``: "ok", "tc" (slipped) or "drop" for each."""
    out = []
    q = dns.message.make_query("rrl.example.test", "A")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.settimeout(DROP_WAIT)
        for i in range(n):
            q.id = i
            s.sendto(q.to_wire(), addr)
            try:
                while True:
                    msg = dns.message.from_wire(s.recv(65535))
                    if msg.id == i:
                        break
            except TimeoutError:
                out.append("drop")
                continue
            out.append("tc" if msg.flags & dns.flags.TC and not msg.answer else "ok")
    return out


def test_rrl_limits_one_prefix_slips_and_exempts_tcp(rrl_proxy):
    # A first answer from another /24 (its own account): the proxy's first upstream round
    # trip, slow on a loaded machine, is not the burst's.
    assert _burst(rrl_proxy.addr, "127.0.3.5", 1) == ["ok"]
    first = _burst(rrl_proxy.addr, "127.0.1.5", 12)
    # The initial credit answers 2 (a slow proxy earns a little more meanwhile); once
    # limited, the account stays in debt (see DROP_WAIT), so it never recovers.
    answered = next(i for i, r in enumerate(first) if r != "ok")
    assert 2 <= answered <= 5, first
    limited = first[answered:]
    # slip = 2: the first limited reply is TC, then every second one; the others dropped.
    assert limited == [("tc", "drop")[i % 2] for i in range(len(limited))], first
    # Another /24 is accounted apart.
    assert _burst(rrl_proxy.addr, "127.0.2.5", 1) == ["ok"]
    # TCP is exempt: the slipped client's retry over TCP gets the answer.
    q = dns.message.make_query("rrl.example.test", "A")
    r = dns.query.tcp(q, rrl_proxy.addr[0], port=rrl_proxy.addr[1], timeout=3, source="127.0.1.5")
    assert r.answer
    # Recovery after about a window of silence.
    time.sleep(2.2)
    assert _burst(rrl_proxy.addr, "127.0.1.5", 1) == ["ok"]
