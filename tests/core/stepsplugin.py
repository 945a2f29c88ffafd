"""Test steps loaded from a plugin file named in the config (as a user would)."""

from __future__ import annotations

import attrs
import trio

from dnsproxy.chain import AWAIT, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.reply import respond, rr


@attrs.frozen
class StaticOptions:
    address: str = "192.0.2.1"
    ttl: int = 60


class Static(Step):
    """A for every name; a 1.5 kB TXT RRset for TXT queries."""

    Options = StaticOptions

    def query(self, q):
        if q.qtype == 16:
            txts = [rr(16, 60, bytes([90]) + b"%02d" % i + b"x" * 88) for i in range(16)]
            return respond(q, answers=txts, source="static")
        if q.qtype != 1:
            return respond(q, source="static")
        octets = bytes(int(x) for x in self.options.address.split("."))
        return respond(q, answers=[rr(1, self.options.ttl, octets)], source="static")


@attrs.frozen
class PureStaticOptions:
    address: str = "192.0.2.1"
    ttl: int = 60
    cacheable: bool = True
    blocked: bool = False


class PureStatic(Step):
    """`Static`'s A answer from a step declared pure; ``cacheable`` and ``blocked`` (a
    policy's answer without an EDE) mark its replies."""

    Options = PureStaticOptions
    pure = True

    def query(self, q):
        octets = bytes(int(x) for x in self.options.address.split("."))
        answers = [rr(1, self.options.ttl, octets)]
        opts = self.options
        return respond(
            q, answers=answers, source="purestatic", cacheable=opts.cacheable, blocked=opts.blocked
        )


@attrs.frozen
class SlowOptions:
    delay: float = 0.5
    only: str = ""


class Slow(Step):
    """Answers after ``delay`` seconds (only names starting with ``only``)."""

    Options = SlowOptions

    def query(self, q):
        if self.options.only and not q.text.startswith(self.options.only):
            return None
        return AWAIT

    async def resolve(self, q):
        await trio.sleep(self.options.delay)
        return respond(q, answers=[rr(1, 60, b"\xc0\x00\x02\x63")], source="slow")


class Later(Slow):
    """`slow` through `Step.begin`: answered from a task of the step's own, not the query's.

    Names starting with "boom" make ``begin`` raise.
    """

    async def resolve(self, q):
        raise AssertionError("a begin step is never resolved")

    def begin(self, q, done):
        if q.text.startswith("boom"):
            raise RuntimeError("kaboom in begin")

        async def later():
            await trio.sleep(self.options.delay)
            done(respond(q, answers=[rr(1, 60, b"\xc0\x00\x02\x63")], source="later"))

        trio.lowlevel.spawn_system_task(later)


class Boom(Step):
    """Raises for names starting with "boom"."""

    def query(self, q):
        if q.text.startswith("boom"):
            raise RuntimeError("kaboom")
        return None


class Hang(Step):
    """I/O that never ends: ``resolve`` waits for ever (only the step deadline stops it)."""

    def query(self, q):
        return AWAIT

    async def resolve(self, q):
        await trio.sleep_forever()


class Stuck(Step):
    """A ``begin`` that starts nothing and never calls ``done``."""

    def query(self, q):
        return AWAIT

    def begin(self, q, done):
        pass


@hookimpl
def dnsproxy_add_steps(registry):
    registry.add_step("static", Static)
    registry.add_step("slow", Slow)
    registry.add_step("later", Later)
    registry.add_step("boom", Boom)
    registry.add_step("crashy", Crashy)
    registry.add_step("hang", Hang)
    registry.add_step("stuck", Stuck)
    registry.add_step("purestatic", PureStatic)


class Crashy(Step):
    """Background work that fails at once (a bug in a plugin's loader)."""

    async def run(self):
        raise RuntimeError("loader bug")
