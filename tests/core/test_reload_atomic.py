"""A reload is all or nothing: a config that loads but fails when its chain is built
changes nothing of the running server (ACL, limits, chain)."""

from __future__ import annotations

import dns.asyncquery
import dns.flags
import dns.rcode
import trio

from tests.core.test_server import at, framed, query, read_message, start, tcp_connect, write_config

OLD_SERVER = 'allow = ["127.0.0.0/8"]'
NEW_SERVER = 'allow = ["::1"]\nmax_inflight = 1\nedns_udp_size = 4096\ntcp_idle_timeout = 0.2'
SLOW = '[[chain]]\nplugin = "slow"\nonly = "slow"\ndelay = 0.3\n'
STATIC = '[[chain]]\nplugin = "static"\n'
# Loads (the URL is a valid string option) but no plugin handles foo://: build_chain fails.
BROKEN = '[[chain]]\nplugin = "forward"\nupstreams = ["foo://192.0.2.53"]\n'


async def test_reload_whose_chain_fails_to_build_changes_nothing(tmp_path, nursery):
    path = write_config(tmp_path, SLOW + STATIC, OLD_SERVER)
    server, addrs = await start(nursery, path)
    old_chain = server.chain
    write_config(tmp_path, SLOW + STATIC + 'address = "192.0.2.7"\n' + BROKEN, NEW_SERVER)
    with trio.fail_after(10):
        assert not await server.reload()
        assert server.chain is old_chain

        # ACL: 127.0.0.1 (refused by the new allow) is answered by the old chain, ::1 (let in
        # by the new allow) is still refused.
        r = await dns.asyncquery.udp(query(), **at(addrs["udp4"]), timeout=2)
        assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].address == "192.0.2.1"
        r = await dns.asyncquery.udp(query(), **at(addrs["udp6"]), timeout=2)
        assert r.rcode() == dns.rcode.REFUSED

        # edns_udp_size stays 1232: a 1.5 kB answer is truncated even for a 4096-byte client.
        big = query("big.example.org", "TXT", use_edns=0, payload=4096)
        r = await dns.asyncquery.udp(big, **at(addrs["udp4"]), timeout=2)
        assert r.flags & dns.flags.TC

        # max_inflight stays 4096: two queries waiting at once are both answered.
        rcodes: list[int] = []

        async def ask(name: str) -> None:
            r = await dns.asyncquery.udp(query(name), **at(addrs["udp4"]), timeout=2)
            rcodes.append(r.rcode())

        async with trio.open_nursery() as n:
            n.start_soon(ask, "slow1.example.org")
            n.start_soon(ask, "slow2.example.org")
        assert rcodes == [dns.rcode.NOERROR, dns.rcode.NOERROR]

        # tcp_idle_timeout stays 10 s: a connection idle for 0.6 s is still open.
        stream = await tcp_connect(addrs["tcp4"])
        buf = bytearray()
        await stream.send_all(framed(query()))
        assert await read_message(stream, buf) is not None
        await trio.sleep(0.6)
        await stream.send_all(framed(query()))
        r = await read_message(stream, buf)
        assert r is not None and r.answer[0][0].address == "192.0.2.1"
        await stream.aclose()
    server.stop()
