"""Fixtures of the conformance suite: a fake upstream and a proxy forwarding to it.

The fake upstream runs in a thread of the test process (its own Trio loop), so tests can
be plain synchronous code using blocking dnspython clients and raw sockets, while the
real proxy process reaches the fake over loopback.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conformance.confkit import Proxy, forward_config
from tests.fakeupstream import FakeUpstream


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start_thread()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start_thread()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_proxy(shared_upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory):
    """One proxy for a whole module (start-up is the slow part); tests reset the rules."""
    workdir = tmp_path_factory.mktemp("shared-proxy")
    proxy = Proxy(workdir, forward_config(shared_upstream.addr)).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def fwd(shared_proxy, shared_upstream: FakeUpstream):
    """The shared proxy with a fresh fake upstream state for this test."""
    shared_upstream.set_rules([])
    return shared_proxy
