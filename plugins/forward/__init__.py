"""forward: send queries to upstream resolvers (README.md beside this file).

The step is here; the per-query state machine is `ask.Ask`, the trimming of answers
`trim.trim`, the plain UDP/TCP transports `transport`, loop detection `loop`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any, Literal

import attrs
import trio

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step, Suspended
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_OTHER,
    Reply,
    respond,
    response_message,
)
from dnsproxy.upstream import Upstream, UpstreamSpec
from dnsproxy.wire import Query

from . import transport
from .ask import Ask, Done, Health
from .loop import loop_marker
from .transport import own_listener, plain


def _upstream_list(value: object) -> tuple[str | Mapping[str, Any], ...]:
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("needs at least one upstream")
    for item in value:
        UpstreamSpec.parse(item)  # raises ValueError with the offending entry
    return tuple(value)


@attrs.frozen
class ForwardOptions:
    upstreams: tuple[str | Mapping[str, Any], ...] = attrs.field(converter=_upstream_list)
    policy: Literal["sequential", "random", "round_robin", "fastest"] = "sequential"
    timeout: float = options.seconds(2.0, 0.01, 60)
    budget: float = options.seconds(5.0, 0.01, 300)
    loop_detect: bool = True
    max_follow: int = attrs.field(default=8, validator=options.in_range(1, 16))


class Forward(Step):
    Options = ForwardOptions

    def __init__(self, opts: ForwardOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.upstreams: list[Upstream] = []
        for item in opts.upstreams:
            if item == "system":
                self.upstreams.extend(self._system(setup))
            else:
                self.upstreams.append(setup.make_upstream(UpstreamSpec.parse(item), setup))
        self.health = {u.name: Health() for u in self.upstreams}
        self.flights: dict[tuple[Any, ...], list[Done]] = {}  # one upstream query, its clients
        self._zone_set: frozenset[bytes] | None = None
        self.loops = 0
        self.coalesced = 0
        self._loop_logged = -1e9
        self._rr = 0
        self._rand = random.Random()

    def _system(self, setup: Setup) -> list[Upstream]:
        found = [h for h in transport.system_nameservers() if not own_listener(h, 53, setup)]
        if not found:
            where = transport.RESOLV_CONF
            raise setup.error(
                "upstreams", f"'system': no usable nameserver in {where}; name one instead"
            )
        return [setup.make_upstream(UpstreamSpec.parse(h), setup) for h in found]

    @property
    def zone_set(self) -> frozenset[bytes]:
        """The ``zones`` scope as a set (``zones`` is set by the builder after __init__)."""
        if self._zone_set is None:
            self._zone_set = frozenset(self.setup.scope.zones)
        return self._zone_set

    def query(self, q: Query) -> Any:
        return AWAIT

    def begin(self, q: Query, done: Done) -> None:
        hops = b""
        if self.options.loop_detect:  # before coalescing: a looped query must not wait on itself
            hops = loop_marker(q)
            if hops is None:
                done(self._loop(q))
                return
        key = (q.key, q.qtype, q.qclass, q.flags & wire.CD, q.do)
        waiting = self.flights.get(key)
        if waiting is not None:
            q.note("coalesced", True)
            self.coalesced += 1
            waiting.append(done)
            return
        self.flights[key] = [done]
        Ask(self, q, key, hops).next()

    def complete(self, key: tuple[Any, ...], reply: Reply) -> None:
        """Hand ``reply`` to every client query that waited for this upstream query."""
        for done in self.flights.pop(key):
            done(reply)

    async def follow(
        self, q: Query, key: tuple[Any, ...], reply: Reply, kept: list[Any], target: Any
    ) -> None:
        """Finish an answer whose CNAME chain leaves this step's zones: the upstream's
        CNAMEs up to the exit, plus the target resolved through the chain from its start,
        so the step that owns the target answers for it (a system task, like
        `exchange_task`; the budget bounds it)."""
        result: Reply | None = None
        try:
            with trio.move_on_after(self.options.budget):
                result = await self._follow(q, reply, kept, target)
        except trio.Cancelled:  # the run is ending
            self.complete(key, respond(q, wire.SERVFAIL, source=self.setup.name))
            raise
        except Exception as exc:  # a step failed on the target: SERVFAIL, as for a query
            self.log.debug("following %s failed: %r", target, exc)
        if result is None:
            text = f"CNAME target {target} not resolved"
            q.explain(f"{self.setup.where}: {text}")
            ede = [(EDE_NO_REACHABLE_AUTHORITY, text[:80])]
            result = respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name)
        self.complete(key, result)

    async def _follow(self, q: Query, reply: Reply, kept: list[Any], target: Any) -> Reply | None:
        # The names of this query's chain so far, shared with its subqueries (notes are):
        # a target among them would wait on itself (coalescing) until the budget ran out.
        followed = list((q.notes or {}).get("followed", ())) or [q.text]
        text = target.to_text().lower()
        if len(followed) > self.options.max_follow or text in followed:
            q.explain(f"{self.setup.where}: CNAME chain too long or looping at {text}")
            return None
        q.explain(f"{self.setup.where}: CNAME target {text} is outside this step's zones")
        q.note("followed", [*followed, text])
        chain = self.chain
        assert chain is not None
        sub = q.derive(target.to_wire())
        result = chain.start(sub)
        if isinstance(result, Suspended):
            result = await chain.resume(sub, result)
        if result is None:
            return None
        if result.rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return respond(q, result.rcode, ede=result.ede, source=self.setup.name)
        other = result.message()
        msg = response_message(q, result.rcode)
        msg.flags |= reply.flags & result.flags & wire.AD
        msg.answer = [*kept, *other.answer]
        msg.authority = list(other.authority)
        return Reply.from_message(msg, ede=result.ede, source=self.setup.name)

    def order(self) -> list[Upstream]:
        """The upstreams in the order the policy asks them for one query."""
        ups = self.upstreams
        policy = self.options.policy
        if policy == "sequential" or len(ups) == 1:
            return ups
        if policy == "random":
            return self._rand.sample(ups, len(ups))
        if policy == "round_robin":
            self._rr = (self._rr + 1) % len(ups)
            return ups[self._rr :] + ups[: self._rr]
        return sorted(ups, key=lambda u: self.health[u.name].srtt)

    def _loop(self, q: Query) -> Reply:
        self.loops += 1
        now = time.monotonic()
        if now - self._loop_logged > 10:
            self._loop_logged = now
            self.log.warning(
                "forwarding loop: %s came back to this proxy through its upstreams %s;"
                " check the upstreams of every proxy on the path",
                q.text,
                ", ".join(u.name for u in self.upstreams),
            )
        q.explain(f"{self.setup.where}: forwarding loop detected")
        ede = [(EDE_OTHER, "forwarding loop detected")]
        return respond(q, wire.SERVFAIL, ede=ede, source=self.setup.name, cacheable=False)

    def ready(self) -> bool:
        return any(h.failures < 3 for h in self.health.values())

    def metrics(self) -> list[Metric]:
        out = [
            Metric("inflight", len(self.flights), "gauge", help="Upstream queries in flight."),
            Metric("coalesced", self.coalesced, help="Client queries that joined one in flight."),
            Metric("loops", self.loops, help="Queries that came back through a forwarding loop."),
        ]
        for name, h in self.health.items():
            labels = (("upstream", name),)
            out += [
                Metric("upstream_queries", h.queries, labels=labels, help="Attempts sent."),
                Metric("upstream_errors", h.errors, labels=labels, help="Failed attempts."),
                Metric("upstream_rtt_seconds", h.srtt, "gauge", labels, "Smoothed latency."),
            ]
        return out

    def close(self) -> None:
        for up in self.upstreams:
            up.close()


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("forward", Forward)


@hookimpl
def dnsproxy_add_upstream_schemes(registry: Registry) -> None:
    registry.add_scheme("udp", plain(tcp_only=False))
    registry.add_scheme("tcp", plain(tcp_only=True))
