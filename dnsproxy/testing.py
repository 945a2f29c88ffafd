"""A test kit for plugin authors (and dnsproxy's own tests).

Build a step from a TOML-like table exactly as the config loader would, make queries
without sockets, and run them through a chain with a stub "next" step::

    step = build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path)
    reply = await run_chain([step, Answer({"example.org": "192.0.2.1"})], make_query("example.org"))
    assert reply.rcode == 0

``build_step`` also takes a plugin file (``build_step(Path("my_policy.py"), {...})``), and
the generic keys ``zones``, ``clients`` and ``deadline`` in the table, as a config would.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dnsproxy import loader, options, wire
from dnsproxy.blocking import Blocking
from dnsproxy.chain import DEADLINE, Chain, Scope, Setup, Step, Suspended
from dnsproxy.clients import Clients
from dnsproxy.config import GENERIC_STEP_KEYS, ServerConfig
from dnsproxy.errors import ConfigError
from dnsproxy.registry import Registry, build_registry, make_plugin_manager
from dnsproxy.reply import Reply, respond, response_message
from dnsproxy.schedule import Schedule, parse_windows, timezone
from dnsproxy.shared import Shared
from dnsproxy.wire import Query, name_to_key, parse_query


def make_query(
    name: str,
    rdtype: str | int = "A",
    *,
    client: str = "127.0.0.1",
    transport: str = "udp",
    edns: bool = True,
    do: bool = False,
    cd: bool = False,
    payload: int = 1232,
    options_: Sequence[Any] = (),
) -> Query:
    """A parsed client query, as the listener would hand it to the chain."""
    msg = dns.message.make_query(
        name,
        rdtype,
        dns.rdataclass.IN,
        use_edns=0 if edns else False,
        want_dnssec=do,
        payload=payload,
        options=list(options_) or None,
    )
    if cd:
        msg.flags |= dns.flags.CD
    return parse_query(msg.to_wire(), (client, 40000), transport)


def registry(*files: Path) -> Registry:
    """The registry of built-in and installed plugins, and of the plugin ``files``."""
    return build_registry(make_plugin_manager(files))


def scope(zones: str | Sequence[str] = (), clients: str | Sequence[str] = ()) -> Scope:
    """A `Scope` from names and networks as a config writes them."""
    return Scope(
        tuple(name_to_key(z) for z in options.string_tuple(zones)), options.networks(clients)
    )


def make_setup(
    name: str = "test",
    *,
    base_dir: Path | None = None,
    state_dir: Path | None = None,
    server: ServerConfig | None = None,
    index: int = 0,
    reg: Registry | None = None,
    blocking: Blocking | None = None,
    shared: Shared | None = None,
    scope: Scope | None = None,
    deadline: float = DEADLINE,
    clients: Clients | None = None,
) -> Setup:
    """A Setup like the config loader builds, for constructing steps directly.

    ``blocking``: the pause state to share (steps built with one honour its pauses).
    ``shared``: the long-lived store to share, as steps of one server (and its reloads) do.
    """
    base = base_dir or Path.cwd()
    return loader.make_setup(
        reg or registry(),
        where=f"test.toml: chain[{index}] ({name})",
        index=index,
        name=name,
        base_dir=base,
        state_dir=state_dir or base / ".state",
        server=server or ServerConfig(),
        log=logging.getLogger(f"dnsproxy.plugins.{name}"),
        blocking=blocking or Blocking(),
        shared=shared or Shared(),
        scope=scope or Scope(),
        deadline=deadline,
        clients=clients or Clients(),
    )


def build_step(
    plugin: str | Path, table: Mapping[str, Any], *, name: str | None = None, **setup_kw: Any
) -> Step:
    """Validate ``table`` as a ``[[chain]]`` entry for ``plugin`` and build the step.

    ``plugin`` is a registered plugin name, or the path of a plugin file (a `Path`, or a
    string ending in ``.py``) as ``plugins = [...]`` names it; the file's step is built
    (``name`` picks one when it registers several). ``zones``, ``clients`` (networks),
    ``active`` and ``deadline`` in ``table`` are applied as the loader applies them.
    Raises ConfigError exactly as the config loader would. ``setup_kw`` goes to `make_setup`.
    """
    reg = setup_kw.pop("reg", None)
    if isinstance(plugin, Path) or plugin.endswith(".py"):
        path = Path(plugin)
        reg = reg or registry(path)
        name = name or _only_step(path, reg, build_registry(make_plugin_manager()))
    else:
        reg = reg or registry()
        name = name or plugin
    generic = {k: v for k, v in table.items() if k in GENERIC_STEP_KEYS and k != "plugin"}
    setup_kw.setdefault("scope", scope(generic.get("zones", ()), generic.get("clients", ())))
    if "active" in generic:
        tz = timezone((setup_kw.get("server") or ServerConfig()).timezone)
        active = Schedule(parse_windows(generic["active"]), tz)
        setup_kw["scope"] = attrs.evolve(setup_kw["scope"], active=active)
    if "deadline" in generic:
        setup_kw.setdefault("deadline", options.duration(generic["deadline"]))
    setup = make_setup(name, reg=reg, **setup_kw)
    rest = {k: v for k, v in table.items() if k not in GENERIC_STEP_KEYS}
    return loader.make_step(reg, name, rest, setup)


def _only_step(path: Path, reg: Registry, builtin: Registry) -> str:
    """The one step name the plugin file ``path`` adds to the built-in registry."""
    names = sorted(set(reg.steps) - set(builtin.steps))
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise ConfigError(f"{path}: registers {found}; pass name= to pick one step")
    return names[0]


def chain_of(
    steps: Sequence[Step | tuple[Step, Mapping[str, Any]]],
) -> Chain:
    """A chain from steps; a (step, {"zones": [...], "clients": [...]}) pair scopes one.

    The pair form gives a step built without a scope its `Setup.scope` (a test shortcut;
    a step that reads its scope when built wants ``build_step(..., {"zones": [...]})``).
    """
    built = []
    for item in steps:
        if isinstance(item, tuple):
            step, table = item
            step.setup = attrs.evolve(
                step.setup, scope=scope(table.get("zones", ()), table.get("clients", ()))
            )
            step.log = step.setup.log
        else:
            step = item
        built.append(step)
    return Chain(built)


async def run_chain(
    steps: Sequence[Step | tuple[Step, Mapping[str, Any]]] | Chain, q: Query
) -> Reply | None:
    """Run ``q`` through the steps (sync phases, then async ones) and return the reply."""
    chain = steps if isinstance(steps, Chain) else chain_of(steps)
    result = chain.start(q)
    if isinstance(result, Suspended):
        result = await chain.resume(q, result)
    return result


class Answer(Step):
    """A stub "next" step: answers names from a table, NXDOMAIN for anything else.

    ``records`` maps a name to zone-file rdata text for A/AAAA ("192.0.2.1", "2001:db8::1")
    or to a list of "TYPE rdata" strings ("CNAME other.example.org.", "MX 10 mx.example.org.").
    Every query it sees is appended to ``seen``.
    """

    def __init__(self, records: Mapping[str, str | Sequence[str]], ttl: int = 300) -> None:
        super().__init__(None, make_setup("answer", reg=Registry()))
        self.records = {name_to_key(k): v for k, v in records.items()}
        self.ttl = ttl
        self.seen: list[Query] = []

    def query(self, q: Query) -> Reply:
        self.seen.append(q)
        value = self.records.get(q.key)
        if value is None:
            return respond(q, wire.NXDOMAIN, source="answer")
        items = [value] if isinstance(value, str) else list(value)
        msg = response_message(q)
        for item in items:
            rdtype_text, _, rdata = item.partition(" ") if " " in item else ("", "", item)
            if not rdtype_text:
                rdtype_text = "AAAA" if ":" in item else "A"
            rdtype = dns.rdatatype.from_text(rdtype_text)
            if rdtype != q.qtype and rdtype != dns.rdatatype.CNAME:
                continue
            msg.answer.append(
                dns.rrset.from_text(q.name, self.ttl, dns.rdataclass.IN, rdtype, rdata)
            )
        return Reply.from_message(msg, source="answer")
