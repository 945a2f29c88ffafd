"""The plugin chain: the `Step` contract and the compiled `Chain` that runs queries.

A step sees a query on the way in and, if it passed the query on, the reply on the way
back — the same shape as CoreDNS's handler/next, but split into phases so the common
case never leaves synchronous code (DESIGN.md §3):

``query(q)``
    Synchronous. Return a `Reply` to answer, ``None`` to pass the query on, `AWAIT`
    when the step needs I/O (an upstream, an API; the chain then calls ``resolve``), or
    `DROP` to send nothing (rate limiting).
``async resolve(q)``
    Only for steps that returned `AWAIT`; runs inside a Trio task. Return a `Reply`, or
    ``None`` to pass the query on after all.
``begin(q, done)``
    The same I/O phase without a task, for steps that can drive their I/O from callbacks
    (``forward`` over UDP), which spares a cache miss the cost of starting a task. Start
    the I/O and call ``done(reply)`` exactly once, from synchronous code (a reader task of
    the step's own, or before returning). A step overrides `resolve` or `begin`, not both.
``response(q, reply)``
    Synchronous, called on the way back for steps that passed the query on: store it,
    count it, rewrite it. Return the reply to send on (a new `Reply` if it changed it), or
    ``None`` to drop the response altogether (rate limiting).

A query that no step answers gets REFUSED, as DESIGN.md says (no EDE: 18 is reserved for
the ACL). Steps are constructed once per (re)load with their validated options and a
`Setup`, and may run background work for the life of that chain in ``run()``.

Every step's generic keys are applied here, so every plugin gets them: its `Scope`
(``zones``, ``clients``, ``active``: which queries it sees, and when) and its
``deadline`` (how long its I/O phase may take before the query is answered SERVFAIL,
so a hung plugin cannot hold a ``max_inflight`` slot for ever).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import trio

from dnsproxy import wire
from dnsproxy.blocking import Blocking
from dnsproxy.clients import Clients, client_address
from dnsproxy.errors import ConfigError, StepFailed, StepTimeout
from dnsproxy.reply import Reply, respond
from dnsproxy.shared import Shared
from dnsproxy.wire import Query

if TYPE_CHECKING:
    from dnsproxy.clients import ClientRecord
    from dnsproxy.config import ServerConfig
    from dnsproxy.schedule import Schedule
    from dnsproxy.upstream import Upstream, UpstreamSpec

__all__ = ["AWAIT", "DROP", "Chain", "Metric", "Scope", "Setup", "Step", "StepFailed"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEADLINE = 10.0  # seconds a step's I/O phase may take (above forward's own 5 s budget)
DEADLINE_RANGE = (0.01, 3600.0)  # what the ``deadline`` key accepts


class _Await:
    __slots__ = ()

    def __repr__(self) -> str:
        return "AWAIT"


AWAIT: Any = _Await()
"""Returned by `Step.query` to ask the chain to call ``await step.resolve(q)``."""


class _Drop:
    __slots__ = ()

    def __repr__(self) -> str:
        return "DROP"


DROP: Any = _Drop()
"""Returned by `Step.query` to send no response at all (a rate limiter dropping a query)."""


@attrs.frozen
class Metric:
    """One sample a step exposes; the metrics plugin names it dnsproxy_<plugin>_<name>."""

    name: str  # e.g. "hits", "blocked", "entries"
    value: float
    kind: str = "counter"  # "counter" or "gauge"
    labels: tuple[tuple[str, str], ...] = ()  # e.g. (("list", "ads"),)
    help: str = ""


@attrs.frozen
class NoOptions:
    """Options class of a step that takes none."""


def _schedule_key(schedule: Schedule | None) -> object:
    return None if schedule is None else schedule.key()


@attrs.frozen
class Scope:
    """Which queries a step sees: names at or under ``zones`` (wire keys), from clients in
    ``clients`` (networks) or named in ``names`` (client and group names, resolved by
    ``lookup``), while its ``active`` schedule is on; an empty value does not restrict.
    Equal scopes are equal configs (reloads pair steps by it). ``scope(q)`` says whether
    ``q`` is in scope.
    """

    zones: tuple[bytes, ...] = ()
    clients: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()
    active: Schedule | None = attrs.field(default=None, eq=_schedule_key)
    # The server's client records (`Clients.record`), needed when ``names`` is not empty.
    lookup: Callable[[Query], ClientRecord] | None = attrs.field(default=None, eq=False, repr=False)
    # The compiled test the chain calls per query; None when the scope is everything.
    match: Callable[[Query], bool] | None = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.names and self.lookup is None:
            raise ValueError("a Scope with client names needs a lookup")
        test = scope_test(self.zones, self.clients, self.names, self.lookup, self.active)
        object.__setattr__(self, "match", test)

    @property
    def depends_on_client(self) -> bool:
        """Whether two clients asking the same question can be in and out of scope (a
        cache in front of this step must key its answers by it)."""
        return bool(self.clients or self.names)

    def covers(self, key: bytes) -> bool:
        """Whether the name ``key`` (wire form) is in ``zones``, ignoring ``clients``."""
        zones = self.zones
        return not zones or any(p in zones for p in wire.parents(key))

    def why_not(self, q: Query) -> str | None:
        """Why ``q`` is out of scope when the reason is the schedule (for the trace)."""
        active = self.active
        if active is None or active():
            return None
        return f"inactive until {active.next_change()}"

    def __call__(self, q: Query) -> bool:
        return self.match is None or self.match(q)


@attrs.frozen(eq=False)
class Setup:
    """What a step is given besides its options when it is built."""

    where: str  # "config.toml: chain[2] (blocklist)", the prefix of every error and log line
    index: int
    name: str  # the step's plugin name
    base_dir: Path  # relative paths in the config are relative to the config file
    state_dir: Path  # where a step may keep files across restarts (downloaded lists)
    server: ServerConfig
    make_upstream: Callable[[UpstreamSpec | str, Setup], Upstream]
    log: logging.Logger
    # The server's pause state (the HTTP API's /api/blocking): steps that block consult it
    # so a pause outlives reloads. A fresh one for steps built outside a server.
    blocking: Blocking = attrs.field(factory=Blocking)
    # The server's store of long-lived objects its steps share across reloads (parsed
    # lists); a fresh one for steps built outside a server.
    shared: Shared = attrs.field(factory=Shared)
    # Build another step as the config loader would (a helper step a plugin delegates
    # to): ``make_step("forward", {"upstreams": [...]}, setup)``; ConfigError on bad options.
    make_step: Callable[[str, Mapping[str, Any], Setup], Step] | None = None
    scope: Scope = attrs.field(factory=Scope)  # the ``zones``, ``clients``, ``active`` keys
    # The server's client records (names and groups, `Clients.record`); an empty one for
    # steps built outside a server.
    clients: Clients = attrs.field(factory=Clients)
    deadline: float = DEADLINE  # the ``deadline`` key: seconds for `Step.resolve`/`begin`
    # With ``[server] workers`` > 1, the index of the worker process this step serves in;
    # None in the process that runs the observers (one process, or the supervisor): a
    # worker's queries are observed there, so a step writing what it observes stays idle.
    worker: int | None = None

    def error(self, key: str | None, message: str) -> ConfigError:
        """A config error naming this step and ``key``."""
        return ConfigError(f"{self.where}: {key}: {message}" if key else f"{self.where}: {message}")

    def path(self, value: str) -> Path:
        """Resolve a path from the config relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p


class Step:
    """Base class of every chain step; override what the step needs.

    Class attributes: ``Options`` (an ``attrs.frozen`` class; its fields are the step's
    config keys besides the generic ``plugin``, ``zones``, ``clients`` and ``deadline``,
    which the chain applies and which ``setup.scope`` and ``setup.deadline`` hold); ``pausable``
    (True for a step that stops blocking while ``setup.blocking`` is paused: the HTTP
    API's /api/blocking routes answer 409 when no step is); ``pure`` (True for a step
    whose answers, and whether it passes a query on, depend only on the question and the
    client's view (its scope), and change only when it calls `changed`: the server's packet
    cache may then replay the chain's reply without calling it; see dnsproxy/packetcache.py).

    On a reload (SIGHUP) a step that replaces one of the same plugin with equal options
    and scope is handed the old step through `inherit` before the new chain
    serves, so state that is not config (a cache, rate accounts, counters) carries over.
    """

    Options: ClassVar[type] = NoOptions
    pausable: ClassVar[bool] = False
    pure: ClassVar[bool] = False

    def __init__(self, options: Any, setup: Setup) -> None:
        self.options = options
        self.setup = setup
        self.log = setup.log
        self.chain: Chain | None = None  # set when the chain is compiled (see `attached`)

    def attached(self, chain: Chain) -> None:
        """Called once the chain holding this step is compiled (``self.chain`` is set):
        the place to ask about the steps after this one (`Chain.after`)."""

    def query(self, q: Query) -> Reply | None:
        """Answer now (a Reply), pass on (None), or return AWAIT to do I/O in `resolve`."""
        return None

    async def resolve(self, q: Query) -> Reply | None:
        """The I/O phase, for steps whose `query` returned AWAIT."""
        raise NotImplementedError(f"{type(self).__name__} returned AWAIT without resolve()")

    def begin(self, q: Query, done: Callable[[Reply | None], None]) -> None:
        """The I/O phase without a task, instead of `resolve`: call ``done`` exactly once."""
        raise NotImplementedError(f"{type(self).__name__} returned AWAIT without begin()")

    def response(self, q: Query, reply: Reply) -> Reply | None:
        """Post-process a reply from further down the chain (only if overridden)."""
        return reply

    async def run(self) -> None:
        """Background work for the life of this chain; cancelled when it is retired."""

    async def check(self) -> list[str]:
        """For ``dnsproxy check``: load what the step names and report, one line each.

        Raise ConfigError (``self.setup.error``) for anything that would stop it working.
        """
        return []

    def flush(self) -> None:
        """Forget cached state (SIGUSR1 and the HTTP API's flush)."""

    def ready(self) -> bool:
        """Whether the step is fully operational (lists loaded, an upstream healthy)."""
        return True

    def not_ready_reason(self) -> str | None:
        """Why `ready` is False, one line for /ready; None when ready or not known."""
        return None

    def inherit(self, previous: Step) -> None:
        """Called on reload when this step replaces ``previous``, a step of the same plugin
        with equal options and scope, before this step's chain serves: take over its state
        (entries, accounts, counters). ``previous`` keeps finishing its in-flight queries.
        """

    def metrics(self) -> list[Metric]:
        """Samples for /metrics, read at scrape time (so counting costs only an increment)."""
        return []

    def changed(self) -> None:
        """Say that this step's answers changed (a list or file reloaded): the packet cache
        in front of its chain forgets what it holds before the next query."""
        if self.chain is not None:
            self.chain.generation += 1

    # --- the packet cache's questions (dnsproxy/packetcache.py); override only if needed ---

    def packet_lifetime(self, q: Query) -> tuple[float, float, int] | None:
        """For a step that keeps answers for the steps after it (the cache): how long the
        answer it just gave ``q`` holds, as (seconds it stays as it is, seconds until its
        TTLs run out, the TTL it shows now), or None when it must not be replayed. A step
        overriding this stands for the steps after it in the packet cache."""
        return None

    def packet_account(self, q: Query, reply: Reply) -> Any:
        """For a step that must see every response (ratelimit): what a packet-cache replay
        of ``reply`` to ``q`` is charged to (see `packet_charge`), or None when the reply
        must not be replayed. A step overriding this may be impure."""
        return None

    def packet_charge(
        self, host: str, account: Any
    ) -> Callable[[Query, Reply], Reply | None] | None:
        """Account one packet-cache replay to client ``host`` (``account`` from
        `packet_account`). None: send the stored reply; else a function that, given the
        parsed query and the stored reply, returns the reply to send (None: drop)."""
        return None

    def packet_recount(self, q: Query, reply: Reply) -> Callable[[], None] | None:
        """For the step whose answer ``reply`` to ``q`` the packet cache keeps (the one
        that answered, or the cache that kept it): a function that counts one more of it
        in the step's own metrics, called per replay, as `query` counted the first.
        None: the step counts nothing per answer."""
        return None

    def close(self) -> None:
        """Release resources when the chain is retired (sockets, files)."""


async def _begun(
    begin: Callable[[Query, Callable[[Reply | None], None]], None], q: Query
) -> Reply | None:
    """Wait in this task for a `Step.begin` I/O phase (for `Chain.pass_on` callers)."""
    result: list[Reply | None] = []
    arrived = trio.Event()

    def done(reply: Reply | None) -> None:
        result.append(reply)
        arrived.set()

    begin(q, done)
    await arrived.wait()
    return result[0]


def _overrides(step: Step, method: str) -> bool:
    return getattr(type(step), method) is not getattr(Step, method)


class Link:
    """A compiled step: the bound methods the hot path calls, its scope test, deadline."""

    __slots__ = ("deadline", "in_scope", "on_begin", "on_query", "on_response", "step")

    def __init__(self, step: Step) -> None:
        self.step = step
        self.on_query = step.query
        self.on_response = step.response if _overrides(step, "response") else None
        self.on_begin = step.begin if _overrides(step, "begin") else None
        self.in_scope = step.setup.scope.match
        self.deadline = step.setup.deadline


class Suspended:
    """Where a query waits for I/O: the step to resolve, the next index, the unwind stack."""

    __slots__ = ("index", "link", "unwind")

    def __init__(self, link: Link, index: int, unwind: list[Link]) -> None:
        self.link = link
        self.index = index
        self.unwind = unwind


def scope_test(
    zones: Sequence[bytes],
    clients: Sequence[Network],
    names: frozenset[str] = frozenset(),
    lookup: Callable[[Query], ClientRecord] | None = None,
    active: Schedule | None = None,
) -> Callable[[Query], bool] | None:
    """The scope predicate of a step, or None when it applies to every query.

    Scopes of networks and zones only compile as they always did; client names cost one
    record lookup per query (cached on the query), a schedule one clock read.
    """
    if not names and active is None:
        return _zones_clients(zones, clients)
    tests = []
    if active is not None:
        tests.append(lambda q: active())
    where = _zones_clients(zones, ())
    if where is not None:
        tests.append(where)
    if names:
        assert lookup is not None
        nets = client_matcher(clients) if clients else None
        if nets is None:
            tests.append(lambda q: not names.isdisjoint(lookup(q).tags))
        else:
            tests.append(lambda q: nets(q.client[0]) or not names.isdisjoint(lookup(q).tags))
    elif clients:
        nets = client_matcher(clients)
        tests.append(lambda q: nets(q.client[0]))
    if len(tests) == 1:
        return tests[0]
    all_of = tuple(tests)

    def match(q: Query) -> bool:
        return all(test(q) for test in all_of)

    return match


def _zones_clients(
    zones: Sequence[bytes], clients: Sequence[Network]
) -> Callable[[Query], bool] | None:
    zone_set = frozenset(zones)
    client_match = client_matcher(clients) if clients else None

    if zone_set and client_match:
        return lambda q: (
            client_match(q.client[0]) and any(p in zone_set for p in wire.parents(q.key))
        )
    if zone_set:
        return lambda q: any(p in zone_set for p in wire.parents(q.key))
    if client_match:
        return lambda q: client_match(q.client[0])
    return None


def client_matcher(
    nets: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> Callable[[str], bool]:
    """A cached membership test of client addresses in ``nets`` (addresses repeat a lot)."""
    nets = tuple(nets)

    @functools.lru_cache(maxsize=4096)
    def match(host: str) -> bool:
        addr = client_address(host)
        return addr is not None and any(addr in n for n in nets)

    return match


class Chain:
    """The steps of one configuration, compiled for the hot path."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.links = [Link(step) for step in steps]
        self.steps = [link.step for link in self.links]
        self._position = {id(step): i for i, step in enumerate(self.steps)}
        self.generation = 0  # bumped by `Step.changed`: the packet cache's entries are void
        self.inflight = 0  # its queries waiting for I/O (the server's count; 0: retirable)
        for step in self.steps:
            step.chain = self
        for step in self.steps:
            step.attached(self)

    def after(self, step: Step) -> tuple[Setup, ...]:
        """The `Setup` of each step after ``step``, in chain order: their plugin names,
        scopes and deadlines, for a step whose behaviour depends on what follows it."""
        return tuple(s.setup for s in self.steps[self._position[id(step)] + 1 :])

    def start(self, q: Query) -> Reply | Suspended | None:
        """Run the synchronous part: a final reply, None (drop), or where to resume."""
        return self._walk(q, 0, [])

    async def follow(
        self, q: Query, target: bytes, *, max_follow: int, where: str, why: str
    ) -> Reply | None:
        """Resolve the CNAME target ``target`` (wire name) through the whole chain, on
        ``q``'s behalf: for a step whose answer's chain leaves what it may answer for.

        The names followed for ``q`` are shared through its notes by every step that
        follows: a chain that comes back to one of them would wait on itself
        (coalescing), so it ends here (None), as does one longer than ``max_follow``.
        """
        followed = list((q.notes or {}).get("followed", ())) or [q.text]
        text = wire.key_to_text(target.lower(), final_dot=True)
        if len(followed) > max_follow or text in followed:
            q.explain(f"{where}: CNAME chain too long or looping at {text}")
            return None
        q.explain(f"{where}: CNAME target {text} is outside {why}")
        q.note("followed", [*followed, text])
        sub = q.derive(target)
        result = self.start(sub)
        if isinstance(result, Suspended):
            result = await self.resume(sub, result)
        return result

    async def resume(self, q: Query, sus: Suspended) -> Reply | None:
        """Finish a suspended query in this task: do the I/O, walk on, until answered."""
        while True:
            link = sus.link
            try:
                with trio.move_on_after(link.deadline) as timer:
                    if link.on_begin is None:
                        reply = await link.step.resolve(q)
                    else:
                        reply = await _begun(link.on_begin, q)
            except Exception as exc:
                raise StepFailed(link.step, exc) from exc
            if timer.cancelled_caught:
                raise StepTimeout(link.step)
            result = self.proceed(q, sus, reply)
            if not isinstance(result, Suspended):
                return result
            sus = result

    def proceed(self, q: Query, sus: Suspended, reply: Reply | None) -> Reply | Suspended | None:
        """Go on from ``sus`` once its step's I/O gave ``reply``: unwind it, or walk on."""
        if reply is not None:
            if q.trace is not None:
                q.explain(f"{sus.link.step.setup.where}: answered (rcode {reply.rcode})")
            return self._unwind(q, reply, sus.unwind)
        if sus.link.on_response is not None:
            sus.unwind.append(sus.link)
        return self._walk(q, sus.index, sus.unwind)

    async def pass_on(self, step: Step, q: Query) -> Reply | None:
        """Run ``q`` through the steps after ``step`` and return what would come back to it.

        For steps that must wrap the rest of the chain: the cache serving a stale answer
        when the rest takes too long (RFC 8767), a prefetch refresh in the background.
        """
        result = self._walk(q, self._position[id(step)] + 1, [])
        if isinstance(result, Suspended):
            result = await self.resume(q, result)
        return result

    def _walk(self, q: Query, i: int, unwind: list[Link]) -> Reply | Suspended | None:
        links = self.links
        n = len(links)
        link = None
        try:
            while i < n:
                link = links[i]
                i += 1
                if link.in_scope is not None and not link.in_scope(q):
                    if q.trace is not None and (why := link.step.setup.scope.why_not(q)):
                        q.explain(f"{link.step.setup.where}: {why}")
                    continue
                reply = link.on_query(q)
                if reply is None:
                    if link.on_response is not None:
                        unwind.append(link)
                    continue
                if reply is AWAIT:
                    return Suspended(link, i, unwind)
                if reply is DROP:
                    q.explain(f"{link.step.setup.where}: dropped")
                    return None
                if q.trace is not None:
                    q.explain(f"{link.step.setup.where}: answered (rcode {reply.rcode})")
                return self._unwind(q, reply, unwind)
        except Exception as exc:
            assert link is not None
            raise StepFailed(link.step, exc) from exc
        q.explain("no step answered: REFUSED")
        return self._unwind(q, respond(q, wire.REFUSED, source="chain"), unwind)

    def _unwind(self, q: Query, reply: Reply | None, unwind: list[Link]) -> Reply | None:
        link = None
        try:
            for link in reversed(unwind):
                if reply is None:
                    return None
                reply = link.on_response(q, reply)  # type: ignore[misc]
        except Exception as exc:
            assert link is not None
            raise StepFailed(link.step, exc) from exc
        return reply

    def ready(self) -> bool:
        return all(step.ready() for step in self.steps)

    def flush(self) -> None:
        for step in self.steps:
            step.flush()

    def close(self) -> None:
        for step in self.steps:
            step.close()
