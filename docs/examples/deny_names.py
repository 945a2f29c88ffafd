"""deny_names: answer NXDOMAIN for chosen names and everything under them.

The synchronous case of docs/writing-a-plugin.md: a decision from memory, in `query`.
"""

from __future__ import annotations

import attrs
import dns.exception

from dnsproxy import options, wire
from dnsproxy.chain import Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_BLOCKED, Reply, respond


@attrs.frozen
class DenyOptions:
    names: tuple[str, ...] = attrs.field(converter=options.string_tuple)  # required
    ttl: int = attrs.field(default=300, validator=options.in_range(0, 86400))


class DenyNames(Step):
    """NXDOMAIN, with EDE 15 (Blocked), for ``names`` and their subdomains."""

    Options = DenyOptions

    def __init__(self, opts: DenyOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        try:
            self.keys = frozenset(wire.name_to_key(n) for n in opts.names)
        except dns.exception.DNSException as exc:  # a label too long, an empty label
            raise setup.error("names", str(exc)) from exc
        self.denied = 0

    def query(self, q: wire.Query) -> Reply | None:
        if not any(p in self.keys for p in wire.parents(q.key)):
            return None  # not ours: the next step decides
        self.denied += 1
        q.note("rule", "deny_names")
        q.explain(f"{self.setup.where}: {q.text} is denied")
        return respond(q, wire.NXDOMAIN, ede=[(EDE_BLOCKED, "denied")], source=self.setup.name)

    def metrics(self) -> list[Metric]:
        return [Metric("denied", self.denied, help="queries answered NXDOMAIN")]


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("deny_names", DenyNames)
