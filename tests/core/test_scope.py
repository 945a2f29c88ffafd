"""The chain's structure, explicit: each step's `Scope` comes through its `Setup`, and a
step asks the chain about the steps after it (`Chain.after`, `Step.attached`)."""

from __future__ import annotations

import ipaddress

from dnsproxy.chain import Chain, Scope, Step
from dnsproxy.loader import build_chain, load
from dnsproxy.testing import Answer, build_step, make_query, make_setup, scope
from dnsproxy.wire import name_to_key
from tests.core.test_server import write_config


def test_scope_is_frozen_callable_and_compares_by_config():
    corp = Scope((name_to_key("corp.example"),), (ipaddress.ip_network("10.0.0.0/8"),))
    assert corp == scope(["corp.example"], ["10.0.0.0/8"]) and hash(corp) == hash(
        scope("corp.example", "10.0.0.0/8")
    )
    assert corp(make_query("a.corp.example", client="10.1.2.3"))
    assert not corp(make_query("a.corp.example", client="192.0.2.1"))
    assert not corp(make_query("example.org", client="10.1.2.3"))
    assert corp.depends_on_client and not scope(["corp.example"]).depends_on_client
    assert corp.covers(name_to_key("x.corp.example")) and not corp.covers(name_to_key("x.org"))
    everything = Scope()
    assert everything.match is None and everything(make_query("example.org"))


def test_loader_hands_each_step_its_scope_and_deadline(tmp_path):
    chain_text = (
        '[[chain]]\nplugin = "static"\nzones = ["corp.example"]\nclients = ["10.0.0.0/8"]\n'
        'deadline = "2s"\n[[chain]]\nplugin = "static"\n'
    )
    cfg, registry, _ = load(write_config(tmp_path, chain_text))
    first, second = build_chain(cfg, registry).steps
    assert first.setup.scope == scope(["corp.example"], ["10.0.0.0/8"])
    assert first.setup.deadline == 2.0 and second.setup.scope == Scope()
    assert not hasattr(first, "zones") and not hasattr(first, "clients")


class Watcher(Step):
    """Records what `Chain.after` said when the chain was compiled."""

    def __init__(self) -> None:
        super().__init__(None, make_setup("watcher"))
        self.later: list[tuple[str, Scope]] = []

    def attached(self, chain: Chain) -> None:
        assert self.chain is chain
        self.later = [(s.name, s.scope) for s in chain.after(self)]


def test_a_step_learns_the_steps_after_it_when_the_chain_is_compiled():
    watcher = Watcher()
    corp = build_step("forward", {"upstreams": ["192.0.2.53"], "zones": ["corp.example"]})
    Chain([Answer({}), watcher, corp, Answer({})])
    assert watcher.later == [("forward", scope(["corp.example"])), ("answer", Scope())]
