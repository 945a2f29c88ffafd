"""The packet cache in front of the chain (dnsproxy/packetcache.py), in-process: what is
replayed, to whom, how, and when it is forgotten."""

from __future__ import annotations

import random
import ssl
import struct
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import httpx
import pytest
import trio
import trustme

import dnsproxy.server
from dnsproxy.errors import ConfigError
from dnsproxy.reply import finalize
from dnsproxy.server import Server
from dnsproxy.wire import parse_query

PLUGIN = Path(__file__).with_name("stepsplugin.py")
KID, PARENT = "127.0.0.2", "127.0.0.3"


def make_server(tmp_path: Path, chain: str, server: str = "") -> Server:
    path = tmp_path / "config.toml"
    path.write_text(
        f'plugins = ["{PLUGIN}"]\n[server]\nlisten = ["127.0.0.1:0"]\n'
        f'allow = ["127.0.0.0/8"]\nlog_level = "warning"\n{server}\n{chain}'
    )
    return Server(path, handle_signals=False)


def sized(tmp_path: Path, chain: str, size: int) -> Server:
    """`make_server` with ``packet_cache_size = size``, in a directory of its own: tests
    run a chain with the cache off (0, the reference) and on, and compare."""
    path = tmp_path / str(size)
    path.mkdir()
    return make_server(path, chain, f"packet_cache_size = {size}")


async def running(nursery: trio.Nursery, server: Server) -> Server:
    await nursery.start(server.run)
    with trio.fail_after(10):
        while not server.chain.ready():
            await trio.sleep(0.01)
    return server


def ask(
    server: Server,
    name: str,
    rdtype: str = "A",
    *,
    client: str = "127.0.0.1",
    transport: str = "udp",
    msg_id: int | None = None,
) -> dns.message.Message | None:
    """One query through `Server.handle`, answered at once (no I/O in these chains)."""
    q = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    if msg_id is not None:
        q.id = msg_id
    out: list[bytes | None] = []
    server.handle(q.to_wire(), (client, 40000), transport, out.append)
    assert len(out) == 1
    return None if out[0] is None else dns.message.from_wire(out[0])


def address(msg: dns.message.Message | None) -> str:
    assert msg is not None
    return msg.answer[0][0].address if msg.answer else dns.rcode.to_text(msg.rcode())


def outcome(r: dns.message.Message | None) -> str:
    """What a ratelimited client saw: no answer, a TC slip, or the answer's address."""
    return "dropped" if r is None else "TC" if r.flags & dns.flags.TC else address(r)


def hits(server: Server) -> int:
    assert server.packets is not None
    return server.packets.hits


HOSTS = '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.7 printer.lan"]\n'


def blocklist(tmp_path: Path, names: str, clients: str = "") -> str:
    (tmp_path / "ads.txt").write_text(names)
    scope = f'clients = ["{clients}"]\n' if clients else ""
    return f'[[chain]]\nplugin = "blocklist"\nlists = ["{tmp_path / "ads.txt"}"]\n{scope}'


async def test_a_hit_is_replayed_from_the_bytes_with_the_clients_id_and_case(tmp_path, monkeypatch):
    server = make_server(tmp_path, HOSTS)
    first = ask(server, "printer.lan", msg_id=1)
    assert address(first) == "192.0.2.7" and hits(server) == 0

    def no_parse(*args):
        raise AssertionError("a replay must not parse the query")

    monkeypatch.setattr(dnsproxy.server, "parse_query", no_parse)
    r = ask(server, "PrInTeR.LaN", msg_id=4242)
    assert hits(server) == 1 and server.stats.queries == 2
    assert r is not None and r.id == 4242 and address(r) == "192.0.2.7"
    assert r.question[0].name.to_text() == "PrInTeR.LaN."
    assert r.answer[0].name.to_text() == "PrInTeR.LaN."  # compressed onto the question
    assert r.edns == 0 and r.flags & dns.flags.RD and r.flags & dns.flags.AA


async def test_a_kids_blocked_answer_never_reaches_a_parent(tmp_path, nursery):
    chain = blocklist(tmp_path, "ads.example\n", clients=f"{KID}/32")
    chain += '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.9 ads.example"]\n'
    server = await running(nursery, make_server(tmp_path, chain))
    for _ in range(3):
        assert address(ask(server, "ads.example", client=KID)) == "0.0.0.0"
    for _ in range(3):
        assert address(ask(server, "ads.example", client=PARENT)) == "192.0.2.9"
    assert address(ask(server, "ads.example", client=KID)) == "0.0.0.0"
    assert hits(server) == 5  # both views replayed, each its own answer
    server.stop()


async def test_ratelimit_accounts_and_limits_replays_as_the_chain_does(tmp_path, nursery):
    chain = '[[chain]]\nplugin = "ratelimit"\nresponses_per_second = 3\nslip = 2\n' + HOSTS
    outcomes = []
    for size in (0, 100):
        server = await running(nursery, sized(tmp_path, chain, size))
        seen = []
        for _ in range(12):
            r = ask(server, "printer.lan")
            seen.append(outcome(r))
        step = server.chain.steps[0]
        outcomes.append((seen, dict(step.counts)))
        if size:
            assert hits(server) >= 2
        server.stop()
    assert outcomes[0] == outcomes[1]
    seen, counts = outcomes[1]
    assert seen[:3] == ["192.0.2.7"] * 3 and "TC" in seen and "dropped" in seen
    assert counts["pass"] == 3 and counts["slip"] + counts["drop"] == 9


@pytest.mark.parametrize(
    "limits",
    [
        "responses_per_second = 3\nslip = 2\n",
        "all_per_second = 4\n",
        'responses_per_second = 5\nqueries_per_second = 3\nqueries_action = "drop"\n',
    ],
)
async def test_replays_to_clients_sharing_an_entry_are_charged_to_each_ones_account(
    tmp_path, nursery, limits
):
    # One view, so one entry for all: a replay must not be charged to the prefix of the
    # client the entry last served (it keeps that client's account key).
    chain = f'[[chain]]\nplugin = "ratelimit"\n{limits}exempt = ["127.0.2.0/24"]\n' + HOSTS
    clients = ["127.0.0.1", "127.0.1.1", "127.0.2.1", "127.0.0.1", "127.0.0.9", "127.0.1.1"]
    outcomes = []
    for size in (0, 100):
        server = await running(nursery, sized(tmp_path, chain, size))
        seen = []
        for _ in range(6):
            for client in clients:
                r = ask(server, "printer.lan", client=client)
                seen.append(outcome(r))
        step = server.chain.steps[0]
        outcomes.append((seen, dict(step.counts), dict(step.query_counts)))
        if size:
            assert hits(server) >= 10
        server.stop()
    assert outcomes[0] == outcomes[1]
    seen, counts, _ = outcomes[1]
    assert "dropped" in seen and counts["exempt"] == 6
    assert all(s == "192.0.2.7" for s in seen[2::6])  # the exempt client


async def test_observers_see_every_replayed_query_with_its_source(tmp_path):
    server = make_server(
        tmp_path, HOSTS + '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "static"\n'
    )
    seen: list[tuple[str, str, str]] = []

    def observe(q, reply, elapsed):
        seen.append((q.text, reply.source, q.client[0]))

    server._observers = (observe,)
    for _ in range(3):
        ask(server, "printer.lan")
    for _ in range(4):
        ask(server, "www.example.org")
    assert hits(server) == 2 + 2
    assert (
        seen
        == [("printer.lan.", "hosts", "127.0.0.1")] * 3
        + [
            ("www.example.org.", "static", "127.0.0.1"),
        ]
        + [("www.example.org.", "cache", "127.0.0.1")] * 3
    )


async def test_observers_see_a_replay_with_the_notes_of_the_chains_answer(tmp_path, nursery):
    """The notes (the query log's rule and list columns) come with each replay as the
    chain's answer had them."""
    chain = blocklist(tmp_path, "ads.example\n") + HOSTS
    server = await running(nursery, make_server(tmp_path, chain))
    seen: list[dict | None] = []

    def observe(q, reply, elapsed):
        seen.append(None if q.notes is None else {k: str(v) for k, v in q.notes.items()})

    server._observers = (observe,)
    for name in ("printer.lan", "ads.example"):
        for _ in range(3):
            ask(server, name)
    assert hits(server) == 4
    assert seen[0] == {"rule": "hosts"} and seen[3] is not None and "list" in seen[3]
    assert seen == [seen[0]] * 3 + [seen[3]] * 3
    server.stop()


@pytest.mark.parametrize(
    ("chain", "sources"),
    [
        ("blocklist", ["blocklist"] * 3),  # EDE 15, replayed from the step's answer
        ('[[chain]]\nplugin = "purestatic"\nblocked = true\n', ["purestatic"] * 3),
        (  # blocked=True without an EDE, kept by the cache and replayed from its hits
            '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "purestatic"\nblocked = true\n',
            ["purestatic", "cache", "cache"],
        ),
    ],
)
async def test_observers_see_a_replayed_block_as_blocked(tmp_path, nursery, chain, sources):
    if chain == "blocklist":
        chain = blocklist(tmp_path, "ads.example\n")
    server = await running(nursery, make_server(tmp_path, chain))
    seen: list[tuple[str, bool]] = []
    server._observers = (lambda q, reply, elapsed: seen.append((reply.source, reply.blocked)),)
    for _ in range(3):
        ask(server, "ads.example")
    assert hits(server) >= 1
    assert seen == [(source, True) for source in sources]
    server.stop()


async def test_ttls_age_as_the_cache_ages_them_and_the_entry_expires(tmp_path):
    now = [1000.0]
    chain = '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "static"\nttl = 10\n'
    server = make_server(tmp_path, chain)
    server.chain.steps[0].clock = server.packets.clock = lambda: now[0]
    assert ask(server, "a.example").answer[0].ttl == 10  # stored by the cache
    assert ask(server, "a.example").answer[0].ttl == 10  # a cache hit: stored here
    assert hits(server) == 0
    now[0] += 3.5
    assert ask(server, "a.example").answer[0].ttl == 6
    assert hits(server) == 1
    now[0] += 5.8  # 0.7 s left: the cache's prefetch point is past, the chain answers
    r = ask(server, "a.example")
    assert hits(server) == 1 and r.answer[0].ttl == 0
    now[0] += 1.0  # expired: serve-stale and refreshes are the cache step's (it awaits one)
    assert ask(server, "a.example").rcode() == dns.rcode.SERVFAIL  # no server running here
    assert hits(server) == 1


async def test_replayed_ttls_count_down_as_the_caches_between_and_across_seconds(tmp_path):
    chain = '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "static"\nttl = 100\n'
    shown = []
    for size in (0, 100):
        now = [1000.0]
        server = sized(tmp_path, chain, size)
        server.chain.steps[0].clock = lambda now=now: now[0]
        if server.packets is not None:
            server.packets.clock = lambda now=now: now[0]
        ttls = []
        for step in (0, 0, 0.25, 0.5, 0.125, 0.125, 1.0, 0.75, 0.125, 0.5, 2.0, 0.0625):
            now[0] += step
            ttls.append(ask(server, "a.example").answer[0].ttl)
        shown.append(ttls)
        if size:
            assert hits(server) == 10
    assert shown[0] == shown[1], shown
    assert shown[1][:2] == [100, 100] and shown[1][-1] < 97


async def test_a_step_not_declared_pure_is_never_replayed(tmp_path):
    server = make_server(tmp_path, HOSTS + '[[chain]]\nplugin = "static"\n')
    for _ in range(3):
        assert address(ask(server, "www.example.org")) == "192.0.2.1"
    assert hits(server) == 0 and not server.packets.entries
    for _ in range(2):  # hosts answers before the impure step is reached: replayed
        assert address(ask(server, "printer.lan")) == "192.0.2.7"
    assert hits(server) == 1


@pytest.mark.parametrize("cacheable", [True, False])
async def test_a_reply_marked_uncacheable_is_never_replayed(tmp_path, cacheable):
    flag = str(cacheable).lower()
    server = make_server(tmp_path, f'[[chain]]\nplugin = "purestatic"\ncacheable = {flag}\n')
    for _ in range(3):
        assert address(ask(server, "www.example.org")) == "192.0.2.1"
    assert hits(server) == (2 if cacheable else 0)


async def test_reload_replaces_the_packet_cache(tmp_path, nursery):
    server = await running(nursery, make_server(tmp_path, HOSTS))
    ask(server, "printer.lan")
    ask(server, "printer.lan")
    assert hits(server) == 1
    path = server.path
    path.write_text(path.read_text().replace("192.0.2.7", "192.0.2.8"))
    assert await server.reload()
    assert address(ask(server, "printer.lan")) == "192.0.2.8"
    server.stop()


async def test_pause_and_resume_forget_replies_at_once(tmp_path, nursery):
    chain = blocklist(tmp_path, "ads.example\n") + '[[chain]]\nplugin = "static"\n'
    server = await running(nursery, make_server(tmp_path, chain))
    for _ in range(2):
        assert address(ask(server, "ads.example")) == "0.0.0.0"
    assert hits(server) == 1
    server.blocking.pause()
    assert address(ask(server, "ads.example")) == "192.0.2.1"
    server.blocking.resume()
    assert address(ask(server, "ads.example")) == "0.0.0.0"
    assert hits(server) == 1
    server.stop()


async def test_a_list_refresh_forgets_replies_at_once(tmp_path, nursery):
    chain = blocklist(tmp_path, "ads.example\n") + HOSTS.replace("printer.lan", "more.example")
    server = await running(nursery, make_server(tmp_path, chain))
    for _ in range(2):
        assert address(ask(server, "more.example")) == "192.0.2.7"
    assert hits(server) == 1
    (tmp_path / "ads.txt").write_text("ads.example\nmore.example\n")
    step = server.chain.steps[0]
    assert await step.refresh_now(0) is None  # as the dashboard's "refresh now" or `watch`
    assert address(ask(server, "more.example")) == "0.0.0.0"
    server.stop()


async def test_flush_forgets_replies(tmp_path):
    server = make_server(tmp_path, '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "static"\n')
    for _ in range(3):
        ask(server, "www.example.org")
    assert hits(server) == 1 and server.packets.entries
    server.flush()  # SIGUSR1, /api/cache/flush, the dashboard after allow/block
    assert not server.packets.entries
    ask(server, "www.example.org")
    assert hits(server) == 1


async def test_the_size_is_bounded_and_zero_turns_it_off(tmp_path):
    server = make_server(tmp_path, HOSTS.replace("printer.lan", "a.lan b.lan c.lan"),
                         "packet_cache_size = 2")  # fmt: skip
    for name in ("a.lan", "b.lan", "c.lan"):
        ask(server, name)
    assert len(server.packets.entries) == 2
    off = make_server(tmp_path, HOSTS, "packet_cache_size = 0")
    assert off.packets is None and address(ask(off, "printer.lan")) == "192.0.2.7"
    for bad in (-1, 10_000_001):
        with pytest.raises(ConfigError, match="packet_cache_size"):
            make_server(tmp_path, HOSTS, f"packet_cache_size = {bad}")
    top = make_server(tmp_path, HOSTS, "packet_cache_size = 10000000")  # the largest taken
    assert top.packets is not None and address(ask(top, "printer.lan")) == "192.0.2.7"
    assert top.packets.size == 10_000_000 and address(ask(top, "printer.lan")) == "192.0.2.7"
    assert hits(top) == 1


def test_the_client_views_are_bounded_by_the_size(tmp_path):
    """A view per client address is kept (`PacketCache._view`): as many addresses as
    entries at most, so a spread of clients cannot grow the table without end."""
    server = make_server(tmp_path, HOSTS, "packet_cache_size = 2")
    assert server.packets is not None
    for i in range(1, 6):
        assert address(ask(server, "printer.lan", client=f"127.0.0.{i}")) == "192.0.2.7"
        assert len(server.packets.views) <= 2
    assert hits(server) == 4  # one view for all: the first answer replayed to the others


def test_a_full_cache_keeps_most_of_a_set_cycled_past_its_size(tmp_path):
    """51 names cycled through 50 entries: dropping the oldest at every store would drop
    each name right before it is asked again (0 replays); admission once in
    ADMIT_WHEN_FULL stores keeps most of them."""
    names = [f"n{i}.lan" for i in range(51)]
    entries = " ".join(names)
    server = make_server(tmp_path, HOSTS.replace("printer.lan", entries), "packet_cache_size = 50")
    assert server.packets is not None
    server.packets.admit = random.Random(7)
    for name in names:  # the first round fills it
        ask(server, name)
    before = hits(server)
    for _ in range(4):
        for name in names:
            assert address(ask(server, name)) == "192.0.2.7"
    assert len(server.packets.entries) == 50
    assert hits(server) - before >= 0.8 * 4 * len(names)


def test_a_full_cache_admits_a_name_asked_again_in_place_of_the_oldest(tmp_path):
    """Admission when full is once in ADMIT_WHEN_FULL stores, neither always nor never: a
    name asked again and again gets in after a few refusals, and the oldest entry makes
    way for it."""
    chain = HOSTS.replace("printer.lan", "a.lan b.lan c.lan")
    server = make_server(tmp_path, chain, "packet_cache_size = 2")
    assert server.packets is not None
    server.packets.admit = random.Random(7)
    ask(server, "a.lan")
    ask(server, "b.lan")
    tries = 0
    while not hits(server) and tries < 64:
        tries += 1
        assert address(ask(server, "c.lan")) == "192.0.2.7"
    assert hits(server) == 1 and tries > 2  # refused at first (Random(7): admitted 4th)
    assert len(server.packets.entries) == 2
    ask(server, "b.lan")
    assert hits(server) == 2
    ask(server, "a.lan")  # the oldest: dropped for c.lan
    assert hits(server) == 2


def test_a_flood_of_one_off_names_replaces_only_a_fraction_of_a_full_cache(tmp_path):
    popular = [f"p{i}.lan" for i in range(50)]
    flood = [f"f{i}.lan" for i in range(100)]
    entries = " ".join(popular + flood)
    server = make_server(tmp_path, HOSTS.replace("printer.lan", entries), "packet_cache_size = 50")
    assert server.packets is not None
    server.packets.admit = random.Random(7)
    for name in popular + flood:
        ask(server, name)
    before = hits(server)
    for name in popular:
        ask(server, name)
    assert hits(server) - before >= 25  # oldest-first would have kept none of them


async def test_tcp_and_udp_and_unusual_queries_are_kept_apart(tmp_path):
    server = make_server(tmp_path, '[[chain]]\nplugin = "purestatic"\n')
    ask(server, "x.example", transport="tcp")
    ask(server, "x.example")
    assert hits(server) == 0  # one entry per transport
    ask(server, "x.example", transport="tcp")
    assert hits(server) == 1
    ecs = [dns.edns.ECSOption("192.0.2.0", 24)]
    q = dns.message.make_query("x.example", "A", use_edns=0, options=ecs)
    out: list[bytes | None] = []
    for _ in range(2):
        server.handle(q.to_wire(), ("127.0.0.1", 1), "udp", out.append)
    assert hits(server) == 1 and len(out) == 2  # an EDNS option besides padding/cookie


async def test_no_reply_outlives_a_schedule_change(tmp_path, nursery):
    """A blocklist active 21:00-07:00: the answer replayed at 20:59 is not the one at 21:00."""
    chain = blocklist(tmp_path, "ads.example\n") + 'active = ["21:00-07:00"]\n'
    chain += '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.9 ads.example"]\n'
    server = await running(nursery, make_server(tmp_path, chain, 'timezone = "UTC"'))
    wall, mono = [1_796_072_340.0], [500.0]  # 2026-11-30 20:59:00 UTC
    server.chain.steps[0].setup.scope.active.clock = lambda: wall[0]
    server.packets.clock = lambda: mono[0]
    for _ in range(3):
        assert address(ask(server, "ads.example")) == "192.0.2.9"
    assert hits(server) == 2
    wall[0] += 61.0
    mono[0] += 61.0
    assert address(ask(server, "ads.example")) == "0.0.0.0"
    assert address(ask(server, "ads.example")) == "0.0.0.0"  # replayed again, blocked
    assert hits(server) == 3
    server.stop()


async def test_a_changed_client_table_forgets_views(tmp_path, nursery):
    """A lease names 127.0.0.2 "kid" only after the first answers were stored."""
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text("")
    chain = blocklist(tmp_path, "ads.example\n") + 'clients = ["kids"]\n'
    chain += '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.9 ads.example"]\n'
    clients = f'[clients]\nleases = ["{leases}"]\nkid = []\n[groups]\nkids = ["kid"]\n'
    path = tmp_path / "config.toml"
    path.write_text(
        f'plugins = ["{PLUGIN}"]\n[server]\nlisten = ["127.0.0.1:0"]\n'
        f'allow = ["127.0.0.0/8"]\nlog_level = "warning"\n{clients}{chain}'
    )
    server = await running(nursery, Server(path, handle_signals=False))
    for _ in range(2):
        assert address(ask(server, "ads.example", client=KID)) == "192.0.2.9"
    assert hits(server) == 1
    leases.write_text(f"1718000000 aa:bb:cc:dd:ee:01 {KID} kid *\n")
    server.clients.refresh()
    assert address(ask(server, "ads.example", client=KID)) == "0.0.0.0"
    assert address(ask(server, "ads.example", client=PARENT)) == "192.0.2.9"
    server.stop()


async def test_a_group_pause_forgets_replies_at_once(tmp_path, nursery):
    chain = blocklist(tmp_path, "ads.example\n") + 'clients = ["kids"]\n'
    chain += '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.9 ads.example"]\n'
    path = tmp_path / "config.toml"
    path.write_text(
        f'plugins = ["{PLUGIN}"]\n[server]\nlisten = ["127.0.0.1:0"]\n'
        f'allow = ["127.0.0.0/8"]\nlog_level = "warning"\n'
        f'[clients]\nkid = ["{KID}"]\n[groups]\nkids = ["kid"]\n{chain}'
    )
    server = await running(nursery, Server(path, handle_signals=False))
    for _ in range(2):
        assert address(ask(server, "ads.example", client=KID)) == "0.0.0.0"
    server.blocking.pause_group("kids", 60)
    assert address(ask(server, "ads.example", client=KID)) == "192.0.2.9"
    server.blocking.resume_group("kids")
    assert address(ask(server, "ads.example", client=KID)) == "0.0.0.0"
    server.stop()


def counters(server: Server) -> dict[str, float]:
    return {
        f"{step.setup.name}.{m.name}{dict(m.labels)}": m.value
        for step in server.chain.steps
        for m in step.metrics()
        if m.kind == "counter"
    }


async def test_replays_count_in_the_answering_steps_metrics(tmp_path, nursery):
    """Step counters count every answer, replayed or not: hosts, blocklist, cache."""
    chain = blocklist(tmp_path, "ads.example\n") + HOSTS
    chain += '[[chain]]\nplugin = "cache"\n[[chain]]\nplugin = "static"\n'
    seen = []
    for size in (0, 100):
        server = await running(nursery, sized(tmp_path, chain, size))
        for name in ("ads.example", "printer.lan", "www.example.org"):
            for _ in range(4):
                ask(server, name)
        seen.append(counters(server))
        server.stop()
    assert seen[0] == seen[1]
    assert seen[1]["cache.hits{}"] == 3
    assert sum(v for k, v in seen[1].items() if k.startswith("blocklist.blocked")) == 4


async def test_udp_replays_and_chain_answers_reach_each_client_and_every_observer(
    tmp_path, nursery
):
    # Replays are sent before the next datagram is read, chain answers later (after I/O):
    # both must go to the client that asked, over IPv4 and IPv6, and be observed.
    chain = HOSTS + '[[chain]]\nplugin = "later"\ndelay = 0.05\n'
    make_server(tmp_path, chain)  # writes the config, then a listener on [::1] is added
    path = tmp_path / "config.toml"
    text = path.read_text().replace('"127.0.0.1:0"', '"127.0.0.1:0", "[::1]:0"')
    path.write_text(text.replace('"127.0.0.0/8"', '"127.0.0.0/8", "::1"'))
    server = Server(path, handle_signals=False)
    bound = await nursery.start(server.run)
    seen: list[tuple[str, str]] = []
    server._observers = (lambda q, reply, elapsed: seen.append((q.client[0], reply.source)),)
    udp = {":" in host: (host, port) for kind, host, port in bound if kind == "udp"}
    clients = [("127.0.0.1", False), ("127.0.0.2", False), ("::1", True)]
    socks = []
    for host, v6 in clients:
        sock = trio.socket.socket(
            trio.socket.AF_INET6 if v6 else trio.socket.AF_INET, trio.socket.SOCK_DGRAM
        )
        await sock.bind((host, 0))
        await sock.connect(udp[v6])
        socks.append(sock)
    sent: list[dict[int, str]] = [{} for _ in socks]
    with trio.fail_after(10):
        for i in range(30):  # interleaved, without waiting for answers
            for n, sock in enumerate(socks):
                name = "printer.lan" if i % 2 else f"n{i}.example"
                q = dns.message.make_query(name, "A")
                q.id = 1000 * n + i
                sent[n][q.id] = name + "."
                await sock.send(q.to_wire())
        for n, sock in enumerate(socks):
            got = {}
            while len(got) < len(sent[n]):
                r = dns.message.from_wire(await sock.recv(4096))
                got[r.id] = r.question[0].name.to_text()
            assert got == sent[n]
    assert hits(server) >= 3 * 14
    for host, _ in clients:
        assert seen.count((host, "hosts")) == 15 and seen.count((host, "later")) == 15
    for sock in socks:
        sock.close()
    server.stop()


@pytest.mark.parametrize("event", ["eviction", "flush"])
async def test_a_replay_never_debits_an_account_the_table_forgot(tmp_path, nursery, event):
    # A replay keeps the account it debited last; once the table forgets that account (a
    # full table evicts it, a flush clears it), the next debit must go to a new one.
    # Limited replays (drops) show the difference: a new account starts full.
    size = 1 if event == "eviction" else 100
    chain = (
        f'[[chain]]\nplugin = "ratelimit"\nresponses_per_second = 4\nslip = 0\n'
        f"max_table_size = {size}\n"
        '[[chain]]\nplugin = "hosts"\nentries = ["192.0.2.7 a.lan", "192.0.2.8 b.lan"]\n'
    )
    outcomes = []
    for cache_size in (0, 100):
        server = await running(nursery, sized(tmp_path, chain, cache_size))
        seen = []
        for i in range(12):
            names = ("a.lan", "b.lan") if event == "eviction" else ("a.lan",)
            for name in names:
                r = ask(server, name)
                seen.append("dropped" if r is None else address(r))
            if event == "flush" and i % 6 == 5:
                server.chain.steps[0].flush()  # the accounts only: replies stay replayable
        outcomes.append(seen)
        if cache_size:
            assert hits(server) >= 6
        server.stop()
    assert outcomes[0] == outcomes[1]
    assert "dropped" in outcomes[1] if event == "flush" else "dropped" not in outcomes[1]


async def test_dot_and_doh_replays_come_from_the_packet_cache(tmp_path, nursery, monkeypatch):
    """Issue 18: every hit path replays. Asked again over the DoT and DoH listeners, a
    question is answered from the packet cache (no parse, no step), with the client's ID
    and question case; observers see each query with its transport, ID and source."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    path = tmp_path / "config.toml"
    path.write_text(
        f'plugins = ["{PLUGIN}"]\n[server]\n'
        'listen = ["tls://127.0.0.1:0", "https://127.0.0.1:0/dns-query"]\n'
        f'tls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"\n{HOSTS}'
    )
    server = Server(path, handle_signals=False)
    ports = {kind: port for kind, _, port in await nursery.start(server.run)}
    seen: list[tuple[str, int, str, str]] = []
    server._observers = (lambda q, reply, _: seen.append((q.transport, q.id, reply.source)),)
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)

    async def dot(msg: dns.message.Message) -> dns.message.Message:
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", ports["tls"], ssl_context=ctx)
        data = msg.to_wire()
        await stream.send_all(struct.pack("!H", len(data)) + data)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack_from("!H", buf)[0]:
            chunk = await stream.receive_some(65536)
            assert chunk, "closed"
            buf += chunk
        await stream.aclose()
        return dns.message.from_wire(buf[2:])

    async def doh(client: httpx.AsyncClient, msg: dns.message.Message) -> dns.message.Message:
        url = f"https://127.0.0.1:{ports['https']}/dns-query"
        headers = {"content-type": "application/dns-message"}
        r = await client.post(url, content=msg.to_wire(), headers=headers)
        assert r.status_code == 200
        return dns.message.from_wire(r.content)

    with trio.fail_after(10):
        async with httpx.AsyncClient(http2=True, verify=ctx) as client:
            assert address(await dot(query("printer.lan", 1))) == "192.0.2.7"
            assert address(await doh(client, query("printer.lan", 0))) == "192.0.2.7"
            assert hits(server) == 0  # DoT and DoH have entries of their own

            def no_parse(*args):
                raise AssertionError("a replay must not parse the query")

            monkeypatch.setattr(dnsproxy.server, "parse_query", no_parse)
            replies = [
                await dot(query("PrInTeR.LaN", 4242)),
                await doh(client, query("PRINTER.lan", 0)),
            ]
    assert hits(server) == 2
    for r, name in zip(replies, ["PrInTeR.LaN.", "PRINTER.lan."], strict=True):
        assert address(r) == "192.0.2.7" and r.question[0].name.to_text() == name
    assert replies[0].id == 4242
    asked = [("tls", 1), ("https", 0), ("tls", 4242), ("https", 0)]  # DoH IDs are 0
    assert seen == [(transport, msg_id, "hosts") for transport, msg_id in asked]
    server.stop()


def query(name: str, msg_id: int) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    q.id = msg_id
    return q


async def test_a_query_with_a_client_identifier_is_left_to_the_chain(tmp_path):
    """Views are worked out per address, not per DoT/DoH client id: such a query is
    never stored nor replayed (a scope by client name could otherwise leak)."""
    server = make_server(tmp_path, HOSTS)
    wire = dns.message.make_query("printer.lan", "A").to_wire()
    out: list[bytes | None] = []
    for _ in range(3):
        server.handle(wire, ("127.0.0.1", 1), "tls", out.append, "kid")
    assert len(out) == 3 and hits(server) == 0 and server.stats.queries == 3
    assert server.packets is not None and not server.packets.entries
    for _ in range(2):  # the same bytes without the id: the first one is not a replay
        server.handle(wire, ("127.0.0.1", 1), "tls", out.append)
    assert hits(server) == 1


def test_a_store_after_a_change_uses_the_view_of_now(tmp_path):
    """A change (here a list reload) between the lookup of a client's view and the store:
    the entry is keyed by the view worked out after it, never by the one from before."""
    server = make_server(tmp_path, '[[chain]]\nplugin = "purestatic"\n')
    packets = server.packets
    assert packets is not None
    q = parse_query(dns.message.make_query("a.lan", "A").to_wire(), ("127.0.0.1", 1), "udp")
    reply = server.chain.start(q)
    out = finalize(reply, q, server.edns_udp_size)  # type: ignore[arg-type]
    packets.views[("127.0.0.1", "udp")] = b"u\xff\xff\xff\xff"  # a view from before
    server.chain.generation += 1  # what `Step.changed` does
    packets.store(q, reply, out)  # type: ignore[arg-type]
    fresh = packets.views[("127.0.0.1", "udp")]
    assert fresh != b"u\xff\xff\xff\xff"
    assert [key[: len(fresh)] for key in packets.entries] == [fresh]
