"""Plugin files: built by the test kit from a path, and re-imported when edited, so a
SIGHUP runs the new code (and a broken edit keeps the running chain)."""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from dnsproxy.errors import ConfigError
from dnsproxy.loader import build_chain, load
from dnsproxy.testing import build_step, make_query, run_chain
from tests.core.test_server import PLUGIN

POLICY = """
import attrs

from dnsproxy.chain import Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.reply import respond, rr


@attrs.frozen
class PolicyOptions:
    ttl: int = 60


class Policy(Step):
    Options = PolicyOptions

    def query(self, q):
        return respond(q, answers=[rr(1, self.options.ttl, bytes([{octet}] * 4))], source="policy")


@hookimpl
def dnsproxy_add_steps(registry):
    registry.add_step("policy", Policy)
"""


def write_policy(path: Path, octet: int) -> Path:
    path.write_text(POLICY.replace("{octet}", str(octet)))
    return path


def address(reply) -> str:
    return reply.message().answer[0][0].address


async def test_build_step_from_a_plugin_file(tmp_path):
    policy = write_policy(tmp_path / "my_policy.py", 1)
    step = build_step(policy, {"ttl": 5, "zones": ["example.org"]})
    assert step.setup.name == "policy" and step.options.ttl == 5
    assert address(await run_chain([step], make_query("www.example.org"))) == "1.1.1.1"
    assert (await run_chain([step], make_query("example.net"))).source == "chain"  # scoped
    assert build_step(str(policy), {}).options.ttl == 60  # a string path works too
    with pytest.raises(ConfigError, match=r"chain\[0\] \(policy\): .*ttl"):
        build_step(policy, {"ttl": "soon"})


async def test_build_step_picks_a_step_of_a_file_that_registers_several():
    with pytest.raises(ConfigError, match="pass name= to pick one"):
        build_step(PLUGIN, {})
    step = build_step(PLUGIN, {"address": "192.0.2.7"}, name="static")
    assert address(await run_chain([step], make_query("example.org"))) == "192.0.2.7"


async def test_an_edited_plugin_file_is_imported_again(tmp_path):
    policy = write_policy(tmp_path / "my_policy.py", 1)
    config = tmp_path / "config.toml"
    config.write_text(f'plugins = ["{policy}"]\n[[chain]]\nplugin = "policy"\n')
    first = build_chain(*load(config)[:2]).steps[0]
    same = build_chain(*load(config)[:2]).steps[0]
    assert type(same) is type(first)  # unchanged: one module, so reloads pair the steps
    write_policy(policy, 2)
    edited = build_chain(*load(config)[:2]).steps[0]
    assert address(await run_chain([edited], make_query("example.org"))) == "2.2.2.2"
    assert address(await run_chain([first], make_query("example.org"))) == "1.1.1.1"


def test_sighup_runs_the_edited_plugin_file(make_proxy, tmp_path):
    policy = write_policy(tmp_path / "my_policy.py", 1)
    proxy = make_proxy(
        f'plugins = ["{policy}"]\n[server]\nlisten = ["127.0.0.1:{{port}}"]\n'
        '[[chain]]\nplugin = "policy"\n'
    )
    assert proxy.ask("example.org").answer[0][0].address == "1.1.1.1"

    def reloaded(times: int, what: str) -> None:
        proxy.signal(signal.SIGHUP)
        deadline = time.monotonic() + 20
        while len(re.findall(what, proxy.log())) < times:
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.05)

    write_policy(policy, 2)
    reloaded(1, "reloaded config.toml")
    assert proxy.ask("example.org").answer[0][0].address == "2.2.2.2"
    policy.write_text(POLICY.replace("{octet}", "3") + "\ndef broken(:\n")
    reloaded(1, "reload failed")
    [line] = [ln for ln in proxy.log().splitlines() if "reload failed" in ln]
    assert "my_policy.py: plugin failed to import: SyntaxError" in line
    assert proxy.ask("example.org").answer[0][0].address == "2.2.2.2"  # the old chain serves
