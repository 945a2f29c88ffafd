"""examples/http-policy: the plugin written from docs/writing-a-plugin.md, against a tiny
policy service on loopback, through the real step (`dnsproxy.testing`) and a real process.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import dns.rcode
import pytest
import trio

from dnsproxy.chain import Step
from dnsproxy.errors import ConfigError
from dnsproxy.reply import EDE_BLOCKED
from dnsproxy.testing import Answer, build_step, make_query, run_chain
from tests.conftest import ROOT, read_http_head
from tests.integration.test_third_party import install

EXAMPLE = ROOT / "examples" / "http-policy"
PLUGIN = EXAMPLE / "src" / "dnsproxy_http_policy" / "__init__.py"
NAMES = {"ok.example": "192.0.2.1", "bad.example": "192.0.2.2", "slow.example": "192.0.2.3"}


class PolicyService:
    """GET /check?name=N answers {"allow": N not in denied}; names in ``slow`` never get
    an answer, and ``status`` other than 200 answers that status with no verdict."""

    def __init__(self, denied: Collection[str] = ("bad.example",)) -> None:
        self.denied = set(denied)
        self.slow = {"slow.example"}
        self.status = 200
        self.asked: list[str] = []

    async def handle(self, stream: trio.SocketStream) -> None:
        data = await read_http_head(stream)
        if data is None:
            return
        target = data.split(b" ", 2)[1].decode()
        name = parse_qs(urlsplit(target).query)["name"][0]
        self.asked.append(name)
        if name in self.slow:
            await trio.sleep_forever()
        body = json.dumps({"allow": name not in self.denied}).encode()
        if self.status != 200:
            body = b"broken"
        head = f"HTTP/1.1 {self.status} X\r\nContent-Length: {len(body)}\r\n"
        await stream.send_all(head.encode() + b"Connection: close\r\n\r\n" + body)
        await stream.aclose()


@asynccontextmanager
async def serving(svc: PolicyService) -> AsyncIterator[str]:
    """Serve ``svc`` on a free loopback port; yields its URL."""
    async with trio.open_nursery() as nursery:
        serve = partial(trio.serve_tcp, svc.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        yield f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/check"
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(step: Step) -> AsyncIterator[Step]:
    """The step's background work (which owns its HTTP client), as the server runs it."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(step.run)
        yield step
        nursery.cancel_scope.cancel()


def policy(url: str, **table: object) -> Step:
    return build_step(PLUGIN, {"url": url, **table})


async def ask(step: Step, name: str) -> tuple[int, str, list[int], bool]:
    reply = await run_chain([step, Answer(NAMES)], make_query(name))
    assert reply is not None
    return reply.rcode, reply.source, [code for code, _ in reply.ede], reply.blocked


def counts(step: Step) -> dict[str, float]:
    return {m.name: m.value for m in step.metrics()}


async def test_allowed_names_pass_on_denied_names_are_refused_as_blocked():
    svc = PolicyService()
    async with serving(svc) as url, running(policy(url)) as step:
        assert await ask(step, "ok.example") == (0, "answer", [], False)
        assert await ask(step, "bad.example") == (5, "http_policy", [EDE_BLOCKED], True)
    assert svc.asked == ["ok.example", "bad.example"]
    assert counts(step) == {
        "allowed": 1, "denied": 1, "cached": 0, "errors": 0, "timeouts": 0, "verdicts": 2,
    }  # fmt: skip


async def test_verdicts_are_cached_for_cache_ttl_within_max_cache():
    svc = PolicyService()
    async with serving(svc) as url, running(policy(url, cache_ttl=0.3, max_cache=1)) as step:
        for _ in range(3):
            assert (await ask(step, "bad.example"))[0] == dns.rcode.REFUSED
        assert svc.asked == ["bad.example"] and counts(step)["cached"] == 2
        await trio.sleep(0.4)  # expired: asked again
        assert (await ask(step, "bad.example"))[0] == dns.rcode.REFUSED
        assert svc.asked == ["bad.example"] * 2
        await ask(step, "ok.example")  # max_cache = 1: the older verdict goes
        assert counts(step)["verdicts"] == 1
        await ask(step, "bad.example")
        assert svc.asked == ["bad.example", "bad.example", "ok.example", "bad.example"]


@pytest.mark.parametrize(("on_error", "rcode"), [("allow", 0), ("deny", 5)])
async def test_a_slow_or_broken_service_fails_open_or_closed(on_error, rcode):
    svc = PolicyService()
    async with (
        serving(svc) as url,
        running(policy(url, timeout="200ms", on_error=on_error)) as step,
    ):
        with trio.fail_after(2):  # the step's timeout, far below its 10 s deadline
            assert (await ask(step, "slow.example"))[0] == rcode
        svc.status = 500
        assert (await ask(step, "ok.example"))[0] == rcode
        assert (await ask(step, "ok.example"))[0] == rcode  # failures are not cached
    assert counts(step)["timeouts"] == 1 and counts(step)["errors"] == 2
    assert counts(step)["verdicts"] == 0


async def test_an_unreachable_service_applies_on_error():
    async with running(policy("http://127.0.0.1:9/check", on_error="deny")) as step:
        assert (await ask(step, "ok.example"))[0] == dns.rcode.REFUSED
    assert counts(step)["errors"] == 1


def test_timeout_must_stay_below_the_deadline():
    with pytest.raises(ConfigError, match=r"chain\[0\] \(http_policy\): timeout: 3 s must be"):
        policy("http://127.0.0.1:9/check", timeout="3s", deadline="2s")
    with pytest.raises(ConfigError, match="url"):
        policy("ftp://127.0.0.1/check")
    with pytest.raises(ConfigError, match="on_error"):
        policy("http://127.0.0.1:9/check", on_error="maybe")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install(EXAMPLE, tmp_path_factory.mktemp("site"))


async def test_installed_plugin_in_a_real_process(site, nsd, make_proxy):
    svc = PolicyService(denied={"ads.example.test"})
    async with serving(svc) as url:
        proxy = make_proxy(
            f"""
[server]
listen = ["127.0.0.1:{{port}}"]
[[chain]]
plugin = "http_policy"
url = "{url}"
[[chain]]
plugin = "forward"
upstreams = ["{nsd.addr}"]
""",
            env={"PYTHONPATH": str(site)},
        )
        ok = await trio.to_thread.run_sync(proxy.ask, "www.example.test")
        assert [rd.address for rd in ok.answer[0]] == ["192.0.2.10"]
        denied = await trio.to_thread.run_sync(proxy.ask, "ads.example.test")
        assert denied.rcode() == dns.rcode.REFUSED
        assert [(o.code, o.text) for o in denied.options] == [(EDE_BLOCKED, "denied by policy")]
        again = await trio.to_thread.run_sync(proxy.ask, "ads.example.test")
        assert again.rcode() == dns.rcode.REFUSED
    assert svc.asked == ["www.example.test", "ads.example.test"]  # the second from memory
