"""A test kit for plugin authors (and dnsproxy's own tests).

Build a step from a TOML-like table exactly as the config loader would, make queries
without sockets, and run them through a chain with a stub "next" step::

    step = build_step("blocklist", {"lists": ["ads.txt"]}, base_dir=tmp_path)
    reply = await run_chain([step, Answer({"example.org": "192.0.2.1"})], make_query("example.org"))
    assert reply.rcode == 0
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from dnsproxy import options, wire
from dnsproxy.blocking import Blocking
from dnsproxy.chain import Chain, Setup, Step, Suspended, scope_test
from dnsproxy.config import ServerConfig
from dnsproxy.registry import Registry, build_registry, make_plugin_manager
from dnsproxy.reply import Reply, respond, response_message
from dnsproxy.shared import Shared
from dnsproxy.upstream import Upstream, UpstreamSpec
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


def registry() -> Registry:
    """The registry of built-in and installed plugins."""
    return build_registry(make_plugin_manager())


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
) -> Setup:
    """A Setup like the server builds, for constructing steps directly.

    ``blocking``: the pause state to share (steps built with one honour its pauses).
    ``shared``: the long-lived store to share, as steps of one server (and its reloads) do.
    """
    reg = reg or registry()

    def make_upstream(spec: UpstreamSpec | str, setup: Setup) -> Upstream:
        spec = UpstreamSpec.parse(spec) if isinstance(spec, str) else spec
        return reg.schemes[spec.scheme](spec, setup)

    base = base_dir or Path.cwd()
    return Setup(
        where=f"test.toml: chain[{index}] ({name})",
        index=index,
        name=name,
        base_dir=base,
        state_dir=state_dir or base / ".state",
        server=server or ServerConfig(),
        make_upstream=make_upstream,
        log=logging.getLogger(f"dnsproxy.plugins.{name}"),
        blocking=blocking or Blocking(),
        shared=shared or Shared(),
    )


def build_step(plugin: str, table: Mapping[str, Any], **setup_kw: Any) -> Step:
    """Validate ``table`` as a ``[[chain]]`` entry for ``plugin`` and build the step.

    Raises ConfigError exactly as the config loader would.
    """
    reg = setup_kw.pop("reg", None) or registry()
    cls = reg.steps[plugin]
    setup = make_setup(plugin, reg=reg, **setup_kw)
    opts = options.build(cls.Options, table, setup.where)
    return cls(opts, setup)


def chain_of(
    steps: Sequence[Step | tuple[Step, Mapping[str, Any]]],
) -> Chain:
    """A chain from steps; a (step, {"zones": [...], "clients": [...]}) pair scopes one."""
    compiled = []
    for item in steps:
        step, scope = item if isinstance(item, tuple) else (item, {})
        zones = tuple(name_to_key(z) for z in scope.get("zones", ()))
        clients = tuple(ipaddress.ip_network(c, strict=False) for c in scope.get("clients", ()))
        step.zones = zones
        step.clients = clients
        compiled.append((step, scope_test(zones, clients)))
    return Chain(compiled)


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
