"""ttl_cap: cap the TTL of every record in the answers passing back through this step.

The "changing a reply" case of docs/writing-a-plugin.md: a `response` step that builds a
new `Reply` (`Reply.evolve`) and never writes into the one it was given, which a cache
before it may hold and serve to other clients.
"""

from __future__ import annotations

import struct

import attrs

from dnsproxy import options
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import Reply
from dnsproxy.wire import Query

TTL = struct.Struct("!I")


@attrs.frozen
class TtlCapOptions:
    max_ttl: int = attrs.field(default=300, validator=options.in_range(0, 604800))


class TtlCap(Step):
    """Answers leave with no TTL above ``max_ttl``."""

    Options = TtlCapOptions

    def __init__(self, opts: TtlCapOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.capped = 0

    def response(self, q: Query, reply: Reply) -> Reply | None:
        cap = self.options.max_ttl
        try:
            records = reply.records()  # offsets into reply.wire, walked once and kept
        except ValueError:
            return reply  # malformed: pass it on untouched
        data = reply.wire
        over = [r for r in records if TTL.unpack_from(data, r.ttl_off)[0] > cap]
        if not over:
            return reply  # unchanged: the same object goes on
        patched = bytearray(data)  # a copy; reply.wire itself is never written
        for r in over:
            TTL.pack_into(patched, r.ttl_off, cap)
        self.capped += 1
        return reply.evolve(wire_=bytes(patched))

    def metrics(self) -> list[Metric]:
        return [Metric("capped", self.capped, help="answers whose TTLs were lowered")]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("ttl_cap", TtlCap)
