"""URL lists against a fake HTTP server on loopback: caching, 304, 500, timeouts, truncation."""

from __future__ import annotations

import functools
import logging
import os

import attrs
import pytest
import trio

from dnsproxy.errors import ConfigError
from dnsproxy.testing import build_step, make_query

LIST_V1 = b"ads.example.org\n"
LIST_V2 = b"ads.example.org\ntracker.example.net\n"


class FakeHTTP:
    """Answers each request with the next scripted behaviour (the last one repeats)."""

    def __init__(self) -> None:
        self.script: list[tuple] = []
        self.requests: list[dict[str, str]] = []
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> FakeHTTP:
        serve = functools.partial(trio.serve_tcp, self.handle, 0, host="127.0.0.1")
        listeners = await nursery.start(serve)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/lists/ads.txt"

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        lines = data.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
        self.requests.append(headers)
        action, *args = self.script[min(len(self.requests), len(self.script)) - 1]
        if action == "ok":
            body, etag = args
            await self._send(stream, "200 OK", body, f"ETag: {etag}\r\n")
        elif action == "304":
            await self._send(stream, "304 Not Modified", b"")
        elif action == "500":
            await self._send(stream, "500 Internal Server Error", b"oops")
        elif action == "hang":
            await trio.sleep_forever()
        elif action == "truncated":
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(args[0]) + 100}\r\n\r\n"
            await stream.send_all(head.encode() + args[0])
        await stream.aclose()

    @staticmethod
    async def _send(stream: trio.SocketStream, status: str, body: bytes, extra: str = "") -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)


@pytest.fixture
async def http(nursery):
    return await FakeHTTP().start(nursery)


def make(tmp_path, url, **table):
    table = {"lists": [url], "timeout": "2s", "retry": "1s", **table}
    return build_step("blocklist", table, base_dir=tmp_path, state_dir=tmp_path / "state")


def blocked(step, name="ads.example.org"):
    return step.query(make_query(name)) is not None


async def wait_for(predicate):
    with trio.fail_after(15):
        while not predicate():
            await trio.sleep(0.02)


async def test_download_keeps_copy_and_refreshes_conditionally(tmp_path, http, nursery, caplog):
    caplog.set_level(logging.INFO)
    http.script = [("ok", LIST_V1, '"v1"')]
    step = make(tmp_path, http.url)
    nursery.start_soon(step.run)
    await wait_for(step.ready)
    assert blocked(step) and not blocked(step, "tracker.example.net")
    assert "If-None-Match".lower() not in http.requests[0]
    assert "list ads.txt: 1 rules, 1 names" in caplog.text
    # A restart: the copy on disk answers at once, then a conditional GET says "current".
    http.script = [("304",)]
    http.requests.clear()
    again = make(tmp_path, http.url)
    nursery.start_soon(again.run)
    await wait_for(lambda: "not modified" in caplog.text)
    assert http.requests[0]["if-none-match"] == '"v1"'
    await wait_for(again.ready)  # its managed allow/block files load in tasks of their own
    assert blocked(again)
    assert "list ads.txt (last good copy): 1 rules" in caplog.text


async def test_a_not_modified_list_loads_the_copy_another_process_kept(
    tmp_path, http, nursery, caplog
):
    """Two processes with one state_dir (``workers``): when one downloads a new version,
    the other's next conditional GET says "not modified" (the validators are the new
    version's), so it must load the kept copy instead of keeping its old list."""
    http.script = [("ok", LIST_V1, '"v1"')]
    worker = make(tmp_path, http.url)
    nursery.start_soon(worker.run)
    await wait_for(worker.ready)
    assert not blocked(worker, "tracker.example.net")
    http.script = [("ok", LIST_V2, '"v2"')]
    http.requests.clear()
    sibling = make(tmp_path, http.url)
    assert await sibling.refresh_now(0) is None
    assert blocked(sibling, "tracker.example.net")
    http.script = [("304",)]
    caplog.set_level(logging.INFO)
    assert await worker.refresh_now(0) is None
    assert http.requests[-1]["if-none-match"] == '"v2"'
    assert blocked(worker, "tracker.example.net")
    assert await worker.refresh_now(0) is None  # now current: nothing to load
    assert blocked(worker, "tracker.example.net")
    assert caplog.text.count("(last good copy: kept by another process)") == 1


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (("500",), "HTTP 500"),
        (("hang",), "no complete answer within 0.5 s"),
        (("truncated", LIST_V2), "RemoteProtocolError"),
    ],
)
async def test_failed_download_falls_back_to_last_good_copy(
    tmp_path, http, nursery, caplog, failure, message
):
    http.script = [("ok", LIST_V1, '"v1"')]
    first = make(tmp_path, http.url)
    assert (await first.check())[0] == "list ads.txt: 1 rules, 1 names, 0 skipped, 0 errors"
    first.sources[0].keep(LIST_V1)
    http.script = [failure]
    http.requests.clear()
    step = make(tmp_path, http.url, timeout="0.5s")
    nursery.start_soon(step.run)
    await wait_for(lambda: step.load_failures > 0)
    assert message in caplog.text and "keeping the previous version" in caplog.text
    await wait_for(step.ready)  # its managed allow/block files load in tasks of their own
    assert blocked(step) and not blocked(step, "tracker.example.net")
    lines = await step.check()
    assert lines[0].startswith("list ads.txt (last good copy: download failed): 1 rules")


async def test_no_network_and_no_copy(tmp_path, http, nursery, caplog):
    http.script = [("500",)]
    step = make(tmp_path, http.url)
    nursery.start_soon(step.run)
    await wait_for(lambda: step.load_failures > 0)
    assert not step.ready() and "not loaded yet" in caplog.text
    assert step.query(make_query("ads.example.org")) is None  # still answering: passes on
    with pytest.raises(ConfigError, match=r"lists: http://127.0.0.1:\d+/lists/ads.txt: HTTP 500"):
        await step.check()
    http.script = [("ok", LIST_V2, '"v2"')]
    await wait_for(step.ready)  # the retry picks it up
    assert blocked(step, "tracker.example.net")


async def test_max_size(tmp_path, http):
    http.script = [("ok", LIST_V2, '"v2"')]
    step = make(tmp_path, http.url, max_size=10)
    with pytest.raises(ConfigError, match="over max_size"):
        await step.check()


async def test_refresh_replaces_the_list_when_it_changed(tmp_path, http, nursery, caplog):
    caplog.set_level(logging.INFO)
    http.script = [("ok", LIST_V1, '"v1"'), ("304",), ("ok", LIST_V2, '"v2"')]
    step = make(tmp_path, http.url)
    with attrs.validators.disabled():  # refresh has a 60 s floor; this test cannot wait
        step.options = attrs.evolve(step.options, refresh=0.2)
    nursery.start_soon(step.run)
    await wait_for(lambda: blocked(step, "tracker.example.net"))
    assert [r.get("if-none-match") for r in http.requests[:3]] == [None, '"v1"', '"v1"']
    assert "list ads.txt: not modified" in caplog.text
    assert step.sources[0].cache_path.read_bytes() == LIST_V2


def test_two_processes_keeping_a_list_at_once_both_succeed(tmp_path, monkeypatch):
    """With workers, several processes keep the same downloaded list at once: one keeping
    it between another's write and rename must not take (or truncate) its file."""
    source = make(tmp_path, "http://127.0.0.1:1/ads.txt").sources[0]
    pid = [1000]
    real_replace = os.replace

    def replace(src, dst):
        if pid[0] == 1000:  # process 1000 is about to rename: 1001 keeps the list first
            pid[0] = 1001
            source.keep(LIST_V1)
            pid[0] = 1000
        real_replace(src, dst)

    monkeypatch.setattr(os, "getpid", lambda: pid[0])
    monkeypatch.setattr(os, "replace", replace)
    source.keep(LIST_V1)
    assert source.cache_path.read_bytes() == LIST_V1
    assert not list(source.cache_path.parent.glob("*.tmp"))
