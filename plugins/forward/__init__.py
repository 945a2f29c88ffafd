"""forward: send queries to upstream resolvers (README.md beside this file).

The step is here; the per-query state machine is `ask.Ask`, the trimming of answers
`trim.trim`, the plain UDP/TCP transports `transport`, loop detection `loop`.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs
import trio

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step
from dnsproxy.errors import UpstreamError
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import (
    EDE_NO_REACHABLE_AUTHORITY,
    EDE_OTHER,
    Reply,
    respond,
    response_message,
)
from dnsproxy.upstream import Addresses, Request, Upstream, UpstreamSpec
from dnsproxy.wire import Query

from . import transport
from .ask import Ask, Done, Health, Race
from .bootstrap import needs_bootstrap, resolve_host
from .loop import LOOP_KEY_USE, LoopKey, loop_marker
from .transport import own_listener, plain

BACKED_OFF = "backed off"
UNRESOLVED = "host name not resolved yet"
PROBE = (b"\x00\x00\x02\x00\x01", b"\x00", wire.NS, 1)  # ". NS": a Request's fields


def _upstream_list(value: object) -> tuple[str | Mapping[str, Any], ...]:
    if isinstance(value, str | Mapping):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("needs at least one upstream")
    for item in value:
        UpstreamSpec.parse(item)  # raises ValueError with the offending entry
    return tuple(value)


def _bootstrap_list(value: object) -> tuple[str, ...]:
    out = options.string_tuple(value)
    for item in out:
        spec = UpstreamSpec.parse(item)
        try:
            ipaddress.ip_address(spec.host)
        except ValueError as exc:
            raise ValueError(f"{item!r}: a bootstrap resolver is a plain IP address") from exc
        if spec.scheme not in ("udp", "tcp"):
            raise ValueError(f"{item!r}: a bootstrap resolver is plain DNS (udp or tcp)")
    return out


@attrs.frozen
class ForwardOptions:
    upstreams: tuple[str | Mapping[str, Any], ...] = attrs.field(converter=_upstream_list)
    policy: Literal["sequential", "random", "round_robin", "fastest", "parallel"] = "sequential"
    timeout: float = options.seconds(2.0, 0.01, 60)
    budget: float = options.seconds(5.0, 0.01, 300)
    loop_detect: bool = True
    max_follow: int = attrs.field(default=8, validator=options.in_range(1, 16))
    backoff_after: int = attrs.field(default=3, validator=options.in_range(1, 1000))
    backoff_min: float = options.seconds(1.0, 0.01, 3600)
    backoff_max: float = options.seconds(60.0, 0.01, 86400)
    bootstrap: tuple[str, ...] = attrs.field(default=(), converter=_bootstrap_list)
    bootstrap_min_ttl: float = options.seconds(30.0, 0.1, 86400)
    bootstrap_max_ttl: float = options.seconds(3600.0, 0.1, 86400)

    def __attrs_post_init__(self) -> None:
        if self.backoff_max < self.backoff_min:
            raise ValueError("backoff_max is below backoff_min")
        if self.bootstrap_max_ttl < self.bootstrap_min_ttl:
            raise ValueError("bootstrap_max_ttl is below bootstrap_min_ttl")


class Forward(Step):
    Options = ForwardOptions

    def __init__(self, opts: ForwardOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        self.upstreams: list[Upstream] = []
        # Upstreams named by host name, kept current through the bootstrap resolvers.
        self.named: list[tuple[Upstream, Addresses]] = []
        for item in opts.upstreams:
            if item == "system":
                self.upstreams.extend(self._system(setup))
                continue
            spec = UpstreamSpec.parse(item)
            if needs_bootstrap(spec):
                spec = attrs.evolve(spec, addresses=Addresses(spec.host))
            up = setup.make_upstream(spec, setup)
            self.upstreams.append(up)
            if spec.addresses is not None:
                self.named.append((up, spec.addresses))
        self.bootstrap: list[Upstream] = []
        if self.named:
            self.bootstrap = self._bootstrap(setup)
        self.health = {u.name: Health() for u in self.upstreams}
        # Upstreams no client query is sent to, and why: backed off, or not resolved yet.
        self.down: dict[str, str] = {up.name: UNRESOLVED for up, _ in self.named}
        self._wake = trio.Event()  # set when an upstream is backed off: the prober's cue
        self.flights: dict[tuple[Any, ...], list[Done]] = {}  # one upstream query, its clients
        self._zone_set: frozenset[bytes] | None = None
        self.loops = 0
        self.coalesced = 0
        self._loop_logged = -1e9
        self._rr = 0
        self._rand = random.Random()
        # The Trio clock: the run's clock object while `run` runs (a direct read costs half
        # of `trio.current_time`'s), `trio.current_time` otherwise.
        self.now: Callable[[], float] = trio.current_time
        # The server's loop key: every forward step of a server (its reloads, its workers) has it.
        self.loop_key = LoopKey(setup.shared.key(LOOP_KEY_USE))

    def _system(self, setup: Setup) -> list[Upstream]:
        found = [h for h in transport.system_nameservers() if not own_listener(h, 53, setup)]
        if not found:
            where = transport.RESOLV_CONF
            raise setup.error(
                "upstreams", f"'system': no usable nameserver in {where}; name one instead"
            )
        return [setup.make_upstream(UpstreamSpec.parse(h), setup) for h in found]

    def _bootstrap(self, setup: Setup) -> list[Upstream]:
        """The resolvers of upstream host names: ``bootstrap``, or else "system"."""
        if not self.options.bootstrap:
            found = [h for h in transport.system_nameservers() if not own_listener(h, 53, setup)]
            if not found:
                names = ", ".join(a.host for _, a in self.named)
                raise setup.error(
                    "bootstrap",
                    f"{names} must be resolved, and {transport.RESOLV_CONF} names no"
                    ' nameserver but this proxy: set bootstrap = ["<IP>", ...]',
                )
            return [setup.make_upstream(UpstreamSpec.parse(h), setup) for h in found]
        return [setup.make_upstream(UpstreamSpec.parse(h), setup) for h in self.options.bootstrap]

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
            hops = loop_marker(q, self.loop_key)
            if hops is None:
                done(self._loop(q))
                return
        key = (q.key, q.qtype, q.qclass, q.cd, q.do)
        waiting = self.flights.get(key)
        if waiting is not None:
            q.note("coalesced", True)
            self.coalesced += 1
            waiting.append(done)
            return
        self.flights[key] = [done]
        ups = self.order(q)
        if self.options.policy == "parallel" and len(ups) > 1:
            race = Race()
            if q.trace is not None:
                q.explain(f"{self.setup.where}: asking {ups[0].name} and {ups[1].name} at once")
            Ask(self, q, key, hops, ups[0::2], race)
            Ask(self, q, key, hops, ups[1::2], race)
        else:
            Ask(self, q, key, hops, ups)

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
        chain = self.chain
        assert chain is not None
        result = await chain.follow(
            q,
            target.to_wire(),
            max_follow=self.options.max_follow,
            where=self.setup.where,
            why="this step's zones",
        )
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

    def order(self, q: Query) -> list[Upstream]:
        """The upstreams in the order the policy asks them for ``q``, those down left out.

        ``parallel`` orders by score: the first two are raced, and each takes every second
        of the rest as its failover.
        """
        ups = self.upstreams
        if self.down:
            ups = self._usable(q)
        policy = self.options.policy
        if policy == "sequential" or len(ups) == 1:
            return ups
        if policy == "random":
            return self._rand.sample(ups, len(ups))
        if policy == "round_robin":
            self._rr = (self._rr + 1) % len(ups)
            return ups[self._rr :] + ups[: self._rr]
        if policy == "parallel":
            timeout = self.options.timeout
            return sorted(ups, key=lambda u: self.health[u.name].score(timeout))
        return sorted(ups, key=lambda u: self.health[u.name].srtt)

    def _usable(self, q: Query) -> list[Upstream]:
        """The upstreams not down; all of them if every one is (better than no answer)."""
        ups = [u for u in self.upstreams if u.name not in self.down]
        if q.trace is not None:
            for name, why in self.down.items():
                q.explain(f"{self.setup.where}: skipped {name}: {self._why_down(name, why)}")
        if not ups:
            q.explain(f"{self.setup.where}: every upstream is down: asking them all")
            return self.upstreams
        return ups

    def _why_down(self, name: str, why: str) -> str:
        h = self.health[name]
        if why == BACKED_OFF:
            left = max(0.0, h.probe_at - trio.current_time())
            return f"backed off after {h.failures} failures (next probe in {left:.1f}s)"
        error = next((a.error for u, a in self.named if u.name == name), "")
        return f"{why}: {error}" if error else why

    def failed(self, name: str, health: Health, timeout: float) -> None:
        """An attempt failed: count it, and back the upstream off after too many in a row."""
        health.failed(timeout)
        if health.failures >= self.options.backoff_after and not health.backoff:
            health.backoff = self.options.backoff_min
            health.probe_at = trio.current_time() + health.backoff
            self.down.setdefault(name, BACKED_OFF)
            self._wake.set()
            self.log.warning(
                "upstream %s backed off after %d failures in a row", name, health.failures
            )

    def recovered(self, name: str, health: Health) -> None:
        """An upstream that was backed off answered: use it again."""
        health.backoff = 0.0
        health.failures = 0
        if self.down.get(name) == BACKED_OFF:
            del self.down[name]
        self.log.info("upstream %s answers again: back in use", name)

    async def run(self) -> None:
        """Probe backed-off upstreams, and keep host names resolved (`bootstrap`)."""
        self.now = trio.lowlevel.current_clock().current_time
        try:
            async with trio.open_nursery() as nursery:
                for up, addresses in self.named:
                    nursery.start_soon(self._resolve_loop, up, addresses)
                while True:
                    self._wake = trio.Event()
                    now = trio.current_time()
                    due = math.inf
                    for up in self.upstreams:
                        h = self.health[up.name]
                        if not h.backoff:
                            continue
                        if h.probe_at <= now:
                            h.probe_at = math.inf  # being probed
                            nursery.start_soon(self._probe, up, h)
                        due = min(due, h.probe_at)
                    with trio.move_on_at(due):
                        await self._wake.wait()
        finally:
            self.now = trio.current_time

    async def _probe(self, up: Upstream, health: Health) -> None:
        """Ask a backed-off upstream its last question (or ". NS") in the background: an
        answer brings it back, a failure doubles its back-off."""
        last = health.last
        req = attrs.evolve(last, options=b"", flags=wire.RD) if last else Request(*PROBE)
        health.probes += 1
        err = "timeout"
        with trio.move_on_after(self.options.timeout):
            try:
                data = await up.exchange(req)
            except Exception as exc:  # a transport error or bug: the probe failed
                err = str(exc) or type(exc).__name__
            else:
                rcode = data[3] & 0xF
                if rcode in (wire.NOERROR, wire.NXDOMAIN):
                    self.recovered(up.name, health)
                    return
                err = f"rcode {rcode}"
        health.backoff = min(health.backoff * 2, self.options.backoff_max)
        health.probe_at = trio.current_time() + health.backoff
        self._wake.set()
        self.log.debug("probe of %s failed (%s): next in %.1fs", up.name, err, health.backoff)

    async def _resolve_loop(self, up: Upstream, addresses: Addresses) -> None:
        """Resolve ``addresses.host`` now and again at its TTL (clamped to the
        bootstrap_min_ttl..bootstrap_max_ttl range); a failure keeps the last good ones."""
        opts = self.options
        while True:
            try:
                found, ttl = await resolve_host(addresses.host, self.bootstrap, opts.timeout)
            except UpstreamError as exc:
                addresses.error = str(exc)
                ttl = opts.bootstrap_min_ttl
                kept = ", ".join(addresses.current) or "none"
                self.log.warning("bootstrap: %s: %s (kept: %s)", addresses.host, exc, kept)
            else:
                addresses.error = ""
                if found != addresses.current:
                    changed = bool(addresses.current)
                    addresses.current = found
                    if changed:  # the open connection goes to the old address
                        drop = getattr(up, "drop", None)
                        if drop is not None:
                            drop()
                    self.log.info("bootstrap: %s is %s", addresses.host, ", ".join(found))
                if self.down.get(up.name) == UNRESOLVED:
                    del self.down[up.name]
            await trio.sleep(min(max(ttl, opts.bootstrap_min_ttl), opts.bootstrap_max_ttl))

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
        return any(u.name not in self.down for u in self.upstreams)

    def not_ready_reason(self) -> str | None:
        if self.ready():
            return None
        return "; ".join(f"{n}: {self._why_down(n, why)}" for n, why in self.down.items())

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
                Metric("upstream_answers", h.answers, labels=labels, help="Attempts answered."),
                Metric("upstream_errors", h.errors, labels=labels, help="Failed attempts."),
                Metric("upstream_probes", h.probes, labels=labels, help="Probes while down."),
                Metric("upstream_rtt_seconds", h.srtt, "gauge", labels, "Smoothed latency."),
                Metric(
                    "upstream_up",
                    float(name not in self.down),
                    "gauge",
                    labels,
                    "1 if client queries go to it; 0 if backed off or not resolved yet.",
                ),
                Metric("upstream_backoff_seconds", h.backoff, "gauge", labels, "Current back-off."),
            ]
            for fraction in (0.5, 0.99):
                out.append(
                    Metric(
                        "upstream_latency_seconds",
                        h.quantile(fraction),
                        "gauge",
                        (*labels, ("quantile", str(fraction))),
                        "Answer latency quantile (upper bound of its histogram bucket).",
                    )
                )
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
