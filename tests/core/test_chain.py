"""The chain contract: answer, pass, AWAIT, post-processing, drop, errors, scoping."""

from __future__ import annotations

import inspect

import pytest
import trio

from dnsproxy import hookspecs, wire
from dnsproxy.chain import AWAIT, Step, StepFailed, Suspended
from dnsproxy.errors import ConfigError
from dnsproxy.registry import Registry, build_registry, load_file, make_plugin_manager
from dnsproxy.reply import Reply, respond
from dnsproxy.testing import Answer, chain_of, make_query, make_setup, run_chain


class Recorder(Step):
    """Passes everything on and tags replies on the way back."""

    def __init__(self, tag: str) -> None:
        super().__init__(None, make_setup(tag, reg=Registry()))
        self.tag = tag
        self.seen: list[str] = []

    def query(self, q):
        self.seen.append("query")
        return None

    def response(self, q, reply):
        self.seen.append("response")
        return reply.evolve(source=reply.source + ">" + self.tag)


class Slow(Step):
    def __init__(self) -> None:
        super().__init__(None, make_setup("slow", reg=Registry()))

    def query(self, q):
        return AWAIT

    async def resolve(self, q):
        await trio.sleep(0.01)
        return respond(q, wire.NOERROR, source="slow")


class Passer(Slow):
    async def resolve(self, q):
        await trio.sleep(0)
        return None


class Later(Step):
    """I/O through `Step.begin`: the answer (or a pass) comes from a task of its own."""

    def __init__(self, answer: bool = True) -> None:
        super().__init__(None, make_setup("later", reg=Registry()))
        self.answer = answer

    def query(self, q):
        return AWAIT

    def begin(self, q, done):
        async def later() -> None:
            await trio.sleep(0.01)
            done(respond(q, wire.NOERROR, source="later") if self.answer else None)

        trio.lowlevel.spawn_system_task(later)


class Boom(Step):
    def __init__(self) -> None:
        super().__init__(None, make_setup("boom", reg=Registry()))

    def query(self, q):
        raise RuntimeError("kaboom")


class Dropper(Recorder):
    def response(self, q, reply):
        return None


async def test_first_answer_wins_and_unwinds_in_reverse():
    a, b = Recorder("a"), Recorder("b")
    answer = Answer({"example.org": "192.0.2.1"})
    reply = await run_chain([a, b, answer, Recorder("never")], make_query("example.org"))
    assert reply.source == "answer>b>a"
    assert a.seen == b.seen == ["query", "response"]


async def test_falling_off_the_end_is_refused():
    reply = await run_chain([Recorder("a")], make_query("example.org"))
    assert reply.rcode == wire.REFUSED


async def test_await_runs_resolve_then_unwinds():
    a = Recorder("a")
    reply = await run_chain([a, Slow()], make_query("example.org"))
    assert reply.source == "slow>a"


async def test_resolve_returning_none_passes_on():
    reply = await run_chain(
        [Passer(), Answer({"example.org": "192.0.2.1"})], make_query("example.org")
    )
    assert reply.source == "answer"


async def test_begin_answers_by_callback_then_unwinds():
    reply = await run_chain([Recorder("a"), Later()], make_query("example.org"))
    assert reply.source == "later>a"


async def test_begin_passing_none_walks_on():
    chain = chain_of([Recorder("a"), Later(answer=False), Answer({"example.org": "192.0.2.1"})])
    q = make_query("example.org")
    sus = chain.start(q)
    assert isinstance(sus, Suspended) and sus.link.on_begin is not None
    replies = []
    sus.link.on_begin(q, replies.append)
    with trio.fail_after(1):
        while not replies:
            await trio.sleep(0.005)
    # What the server does with the outcome: go on synchronously, no task of the query's.
    assert chain.proceed(q, sus, replies[0]).source == "answer>a"


async def test_sync_answer_needs_no_task():
    chain = chain_of([Recorder("a"), Answer({"example.org": "192.0.2.1"})])
    result = chain.start(make_query("example.org"))
    assert isinstance(result, Reply)  # no Suspended: answered without a task


async def test_response_can_drop():
    reply = await run_chain(
        [Recorder("outer"), Dropper("d"), Answer({})], make_query("example.org")
    )
    assert reply is None


async def test_step_exception_names_the_step():
    with pytest.raises(StepFailed) as exc:
        await run_chain([Recorder("a"), Boom()], make_query("example.org"))
    assert exc.value.step.setup.name == "boom"
    assert "kaboom" in str(exc.value)


async def test_zone_scope():
    scoped = Answer({"www.corp.example.org": "10.0.0.1"})
    general = Answer({"www.corp.example.org": "192.0.2.1", "example.org": "192.0.2.2"})
    chain = chain_of([(scoped, {"zones": ["corp.example.org"]}), general])
    r1 = await run_chain(chain, make_query("WWW.Corp.Example.org"))
    r2 = await run_chain(chain, make_query("example.org"))
    assert r1.message().answer[0][0].address == "10.0.0.1"
    assert r2.message().answer[0][0].address == "192.0.2.2"
    assert len(scoped.seen) == 1  # the out-of-zone query never reached the scoped step


async def test_client_scope():
    kid = Answer({"example.org": "0.0.0.0"})
    everyone = Answer({"example.org": "192.0.2.2"})
    chain = chain_of([(kid, {"clients": ["192.168.1.50/32"]}), everyone])
    r1 = await run_chain(chain, make_query("example.org", client="192.168.1.50"))
    r2 = await run_chain(chain, make_query("example.org", client="192.168.1.51"))
    r3 = await run_chain(chain, make_query("example.org", client="::ffff:192.168.1.50"))
    assert r1.message().answer[0][0].address == "0.0.0.0"
    assert r2.message().answer[0][0].address == "192.0.2.2"
    assert r3.message().answer[0][0].address == "0.0.0.0"


async def test_pass_on_runs_only_later_steps():
    first = Recorder("first")
    chain = chain_of([first, Recorder("mid"), Answer({"example.org": "192.0.2.1"})])
    reply = await chain.pass_on(first, make_query("example.org"))
    assert reply.source == "answer>mid"
    assert first.seen == []


def test_builtin_plugins_register_through_hooks():
    reg = build_registry(make_plugin_manager())
    assert "forward" in reg.steps
    assert {"udp", "tcp"} <= set(reg.schemes)


def test_every_hookspec_is_documented_and_prefixed():
    specs = [
        f
        for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("dnsproxy_")
    ]
    assert len(specs) >= 7
    for f in specs:
        assert f.__doc__ and "Return" in f.__doc__, f.__name__


def test_misspelled_hook_fails_loudly(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from dnsproxy.hookspecs import hookimpl\n"
        "@hookimpl\ndef dnsproxy_add_step(registry):\n    pass\n"
    )
    with pytest.raises(ConfigError, match="dnsproxy_add_step"):
        make_plugin_manager([path])


def test_plugin_file_registers_a_step(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(
        "import attrs\n"
        "from dnsproxy.chain import Step\n"
        "from dnsproxy.hookspecs import hookimpl\n"
        "class Mine(Step):\n    pass\n"
        "@hookimpl\ndef dnsproxy_add_steps(registry):\n    registry.add_step('mine', Mine)\n"
    )
    reg = build_registry(make_plugin_manager([path]))
    assert reg.steps["mine"].__name__ == "Mine"


def test_broken_plugin_file_is_a_config_error(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(ConfigError, match=r"broken\.py: plugin failed to import"):
        load_file(path)


def test_two_plugins_claiming_one_name_conflict():
    reg = Registry()
    reg.add_step("x", Recorder)
    with pytest.raises(ConfigError, match="two plugins register the step 'x'"):
        reg.add_step("x", Slow)
