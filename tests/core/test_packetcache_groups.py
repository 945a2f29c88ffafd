"""The packet cache during a blocking pause of one group ([groups], the API's
``?group=``): a paused group's unblocked answers are not replayed to other clients, nor
other clients' blocked answers to it."""

from __future__ import annotations

import trio

from tests.core.test_packetcache import (
    KID,
    PARENT,
    address,
    ask,
    blocklist,
    hits,
    make_server,
    running,
)

HOSTS = '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.7 ads.example"]\n'


async def test_a_paused_group_answers_are_its_own(tmp_path, nursery):
    chain = f'[groups]\nkids = ["{KID}"]\n' + blocklist(tmp_path, "ads.example\n") + HOSTS
    server = await running(nursery, make_server(tmp_path, chain))
    for who in (KID, PARENT):
        assert address(ask(server, "ads.example", client=who)) == "0.0.0.0"
    server.blocking.pause_group("kids", 60)
    before = hits(server)
    for _ in range(2):  # the second time from the packet cache
        assert address(ask(server, "ads.example", client=KID)) == "192.0.2.7"
        assert address(ask(server, "ads.example", client=PARENT)) == "0.0.0.0"
    assert hits(server) - before == 2
    server.blocking.resume_group("kids")
    await trio.sleep(0)
    for who in (KID, PARENT, KID):
        assert address(ask(server, "ads.example", client=who)) == "0.0.0.0"
