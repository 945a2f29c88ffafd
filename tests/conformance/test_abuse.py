"""Listener abuse and upstream failure (CONFORMANCE.md C5, C6, C8) against the real proxy.

A proxy with tight, explicit bounds (1 s TCP idle timeout, 20 connections, 10 queries in
flight per connection, 300 queries waiting on upstreams) is abused the way kresd's
``test_conn_mgmt.py``/``test_prefix.py`` and BIND's ``tcp``/``timeouts`` system tests do,
and must keep serving other clients throughout.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import socket
import struct
import threading
import time

import dns.message
import dns.rcode
import pytest
from dnsproxy.plugins import BUILTIN

from tests.conformance.confkit import (
    Proxy,
    alive,
    ask,
    blast,
    closed_within,
    forward_config,
    frame,
    free_port,
    message,
    parse,
    qname_wire,
    read_frame,
    rss_kb,
    tcp_raw,
    trickle,
    wait_until,
)
from tests.fakeupstream import FakeUpstream

IDLE = 1.0
MAX_CONNS = 20
PIPELINE = 10
MAX_INFLIGHT = 300
FLOOD_NAMES = int(os.environ.get("DNSPROXY_FLOOD_NAMES", "8000"))

TIGHT = (
    f"tcp_idle_timeout = {IDLE}\nmax_tcp_connections = {MAX_CONNS}\n"
    f"max_tcp_pipeline = {PIPELINE}\nmax_inflight = {MAX_INFLIGHT}\n"
)


@pytest.fixture(scope="module")
def tight(shared_upstream, tmp_path_factory):
    proxy = Proxy(
        tmp_path_factory.mktemp("tight"), forward_config(shared_upstream.addr, server=TIGHT)
    ).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def tproxy(tight, shared_upstream):
    shared_upstream.set_rules([])
    return tight


def _query(name: str = "www.example.test", msg_id: int = 0x1234) -> bytes:
    return message(qname_wire(name) + struct.pack("!HH", 1, 1), msg_id=msg_id)


def test_idle_connection_closed(tproxy):
    """C5: connect and never send: closed at the idle timeout."""
    with socket.create_connection(tproxy.addr) as s:
        took = closed_within(s, 4 * IDLE)
    assert took is not None and took < 3 * IDLE


def test_slowloris_closed_despite_trickle(tproxy):
    """C5 slowloris: one byte every 0.2 s never completes a message in time; the timer is
    reset only by a complete message (RFC 7766 §6.2.3), so the connection is closed."""
    data = frame(_query())
    with socket.create_connection(tproxy.addr) as s:
        closed, took = trickle(s, data)
    assert closed and took < 3 * IDLE


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("prefix-0", frame(b"")),
        ("prefix-under-12", frame(b"\x12\x34\x01")),
        ("garbage-1", frame(b"\xff")),
        ("garbage-1024", frame(random.Random(1024).randbytes(1024))),
        ("garbage-65533", frame(random.Random(65533).randbytes(65533))),
    ],
)
def test_garbage_frames_then_valid_query(tproxy, name, data):
    """C5 (kresd test_ignore_garbage, test_prefix): garbage frames are skipped and the
    valid query after them is answered on the same connection."""
    with socket.create_connection(tproxy.addr, timeout=3) as s:
        s.sendall(data + frame(_query()))
        while True:
            out = read_frame(s)
            assert out is not None
            if out[:2] == b"\x12\x34":
                break
            # Garbage that happens to parse as a query header gets an error, never an answer.
            assert out[3] & 0xF in (dns.rcode.FORMERR, dns.rcode.NOTIMP)
    msg = dns.message.from_wire(out)
    assert msg.rcode() == 0


def test_trailing_garbage_inside_prefix_answered(tproxy):
    """C5: garbage after the message but inside its length prefix: answered."""
    out = tcp_raw(tproxy.addr, frame(_query() + b"\x00" * 20))
    assert out is not None and dns.message.from_wire(out).rcode() == 0


@pytest.mark.parametrize("claim", [100, 65535])
def test_prefix_longer_than_data_closed_at_timeout(tproxy, claim):
    """C5: a prefix promising more than is sent: closed at the idle timeout, no hang."""
    with socket.create_connection(tproxy.addr) as s:
        s.sendall(struct.pack("!H", claim) + _query())
        took = closed_within(s, 4 * IDLE)
    assert took is not None and took < 3 * IDLE
    assert alive(tproxy.addr)


def test_pipelined_answers_out_of_order_ids_preserved(tproxy, shared_upstream):
    """C5 / RFC 7766 §7: a slow query then a fast one on one connection: the fast answer
    comes first, each with its own ID."""
    shared_upstream.set_rules([{"match": {"qname": "slow.example.test."}, "delay": 0.5}])
    with socket.create_connection(tproxy.addr, timeout=3) as s:
        s.sendall(frame(_query("slow.example.test", 1)) + frame(_query("fast.example.test", 2)))
        first = dns.message.from_wire(read_frame(s))
        second = dns.message.from_wire(read_frame(s))
    assert (first.id, str(first.question[0].name)) == (2, "fast.example.test.")
    assert (second.id, str(second.question[0].name)) == (1, "slow.example.test.")


def test_pipeline_flood_then_close(tproxy):
    """C5 (kresd test_query_flood_close): 10,000 pipelined queries, then close: no crash,
    other clients served."""
    data = b"".join(frame(_query(f"p{i}.example.test", i)) for i in range(10_000))
    with socket.create_connection(tproxy.addr) as s:
        s.sendall(data)
    assert wait_until(lambda: alive(tproxy.addr), 10)


def test_flood_without_reading(tproxy):
    """C5 (kresd test_query_flood_no_recv, BIND CVE-2024-0760): queries sent without ever
    reading the answers: bounded, the connection is closed, other clients are served."""
    with socket.create_connection(tproxy.addr) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(0.05)
        stop = time.monotonic() + 10
        bounded = False
        i = 0
        # Keep writing until the proxy stops taking data (its pipeline bound) or closes.
        while time.monotonic() < stop:
            try:
                s.send(frame(_query(f"n{i}.example.test", i % 65536)))
                i += 1
            except (TimeoutError, BrokenPipeError, ConnectionResetError):
                bounded = True
                break
        assert bounded, f"the proxy took {i} queries in 10 s from a client that never reads"
        assert alive(tproxy.addr)  # served while this client hogs its connection
        took = _closed_within_unread(s, 6 * IDLE)
    assert took is not None


def _closed_within_unread(s: socket.socket, seconds: float) -> float | None:
    """Like `_closed_within` but discards data: a reset or EOF means closed."""
    start = time.monotonic()
    s.settimeout(0.1)
    while time.monotonic() - start < seconds:
        try:
            s.send(b"\x00")  # an error here means the proxy is gone from this connection
        except TimeoutError:
            pass
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - start
        time.sleep(0.1)
    return None


def test_connection_limit(tproxy):
    """C5 (Unbound tcp_conn_limit): connections over max_tcp_connections are closed at
    once, UDP is unaffected, and TCP recovers when the idle ones time out."""
    conns = [socket.create_connection(tproxy.addr) for _ in range(MAX_CONNS)]
    try:
        time.sleep(0.2)
        with socket.create_connection(tproxy.addr) as extra:
            assert closed_within(extra, 0.5) is not None
        assert ask(tproxy.addr, "udp.example.test").rcode() == 0
    finally:
        for c in conns:
            c.close()
    assert wait_until(lambda: ask(tproxy.addr, "tcp.example.test", tcp=True).rcode() == 0, 5)


def test_half_close_rst_and_urgent_data(tproxy):
    """C5 (kresd test_oob): urgent data, a half-close after the query and a reset in the
    middle of a response: the proxy survives and never writes to a closed connection.
    (The resets come from another /24: their 100 forwarded queries may still be in flight
    when the liveness check asks, and from 127.0.0.1 they would fill its own
    max_inflight_per_client share, which answers SERVFAIL beyond it by design.)"""
    with socket.create_connection(tproxy.addr, timeout=3) as s:
        s.send(b"!", socket.MSG_OOB)
        s.sendall(frame(_query()))
        assert read_frame(s) is not None
    with socket.create_connection(tproxy.addr, timeout=3) as s:
        s.sendall(frame(_query()))
        s.shutdown(socket.SHUT_WR)
        assert read_frame(s) is not None  # the pending answer still arrives
    for _ in range(20):
        s = _connect(tproxy.addr, "127.0.1.1")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(frame(_query()) * 5)
        s.close()  # RST, probably while the answers are being written
    assert alive(tproxy.addr)


def test_random_subdomain_flood_bounded(tproxy, shared_upstream):
    """C4/C6 water torture against a slow upstream: queries beyond max_inflight get
    SERVFAIL at once instead of piling up; afterwards service is normal."""
    shared_upstream.set_rules([{"match": {"qname": "*.victim.test."}, "delay": 0.8}])
    names = [f"{random.getrandbits(48):x}.victim.test" for _ in range(2 * MAX_INFLIGHT)]
    start = time.monotonic()
    replies = blast(tproxy.addr, names, window=len(names), timeout=10)
    took = time.monotonic() - start
    rcodes = [r[3] & 0xF for r in replies.values()]
    assert rcodes.count(dns.rcode.SERVFAIL) >= MAX_INFLIGHT // 2  # shed, not queued
    assert len(replies) >= 0.95 * len(names)
    assert took < 3.0
    assert alive(tproxy.addr)


def test_upstream_dies_and_comes_back(tmp_path):
    """C6: upstream down → SERVFAIL + EDE quickly (no busy loop), back up → answers."""
    up = FakeUpstream().start_thread()
    port = up.port
    proxy = Proxy(tmp_path, forward_config(up.addr)).start()
    try:
        assert ask(proxy.addr, "a.example.test").rcode() == 0
        up.stop()
        start = time.monotonic()
        msg = ask(proxy.addr, "b.example.test", use_edns=0)
        assert msg.rcode() == dns.rcode.SERVFAIL
        assert [o.code for o in msg.options if o.otype == 15] in ([22], [23])
        assert time.monotonic() - start < 2.6
        up = FakeUpstream(port=port).start_thread()
        assert wait_until(lambda: ask(proxy.addr, "c.example.test").rcode() == 0, 5)
    finally:
        up.stop()
        proxy.stop()


def _load(addr: tuple[str, int], stop: threading.Event, results: list[int]) -> None:
    """Steady queries until ``stop``; rcodes appended, -1 for no answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.5)
        i = 0
        while not stop.is_set():
            s.sendto(_query(f"l{i}.example.test", i % 65536), addr)
            try:
                while True:
                    data = s.recv(65535)
                    if struct.unpack_from("!H", data)[0] == i % 65536:
                        results.append(data[3] & 0xF)
                        break
            except TimeoutError:
                results.append(-1)
            i += 1


def test_sighup_and_sigterm_under_load(tmp_path, upstream):
    """C6/README: SIGHUP under load drops no query; SIGTERM under load exits 0 promptly."""
    proxy = Proxy(tmp_path, forward_config(upstream.addr)).start()
    stop = threading.Event()
    results: list[int] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(_load, proxy.addr, stop, results) for _ in range(4)]
        try:  # a failed wait stops the load too, or the pool's exit would wait for ever
            time.sleep(0.3)
            for i in range(1, 4):
                # One at a time: SIGHUPs that arrive during a reload are delivered as one.
                proxy.signal(signal.SIGHUP)
                proxy.wait_log("reloaded", i)
                time.sleep(0.1)  # served by the new chain for a while
        finally:
            stop.set()
        for f in futures:
            f.result()
    assert results and -1 not in results and set(results) == {0}
    assert proxy.log().count("reloaded") == 3

    stop.clear()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(_load, proxy.addr, stop, []) for _ in range(2)]
        time.sleep(0.2)
        start = time.monotonic()
        proxy.signal(signal.SIGTERM)
        assert proxy.proc is not None
        code = proxy.proc.wait(10)
        stop.set()
        for f in futures:
            f.result()
    assert code == 0 and time.monotonic() - start < 6
    proxy.stop()


def test_random_names_memory_flat(tmp_path, upstream):
    """C8 (BIND CVE-2023-2828): a flood of unique random names through a bounded cache
    leaves RSS flat once the cache is full (200,000 names on demand:
    DNSPROXY_FLOOD_NAMES=200000)."""
    from dnsproxy.plugins import BUILTIN

    before = ""
    if "dnsproxy.plugins.cache" in BUILTIN:
        before = '[[chain]]\nplugin = "cache"\nmax_entries = 2000\nprefetch = false\n'
    proxy = Proxy(tmp_path, forward_config(upstream.addr, before=before)).start()
    try:
        assert proxy.proc is not None
        chunk = max(2000, FLOOD_NAMES // 20)
        rss = []
        for start in range(0, max(FLOOD_NAMES, 4 * chunk), chunk):
            names = [f"{random.getrandbits(64):x}.flood.test" for _ in range(chunk)]
            replies = blast(proxy.addr, names, window=200, timeout=60)
            assert len(replies) >= 0.95 * chunk, f"chunk at {start}: {len(replies)} answers"
            rss.append(rss_kb(proxy.proc.pid))
        # After the warm-up chunks the resident size must not keep climbing.
        assert rss[-1] - rss[1] < 8 * 1024, f"RSS grew {rss} kB"
        assert alive(proxy.addr)
    finally:
        proxy.stop()


def test_servfail_storm_fails_over_to_next_upstream(tmp_path):
    """C6: an upstream in a SERVFAIL storm is failed over from, within bounded tries."""
    bad = FakeUpstream([{"rcode": "SERVFAIL"}]).start_thread()
    good = FakeUpstream().start_thread()
    config = forward_config(bad.addr).replace(
        f'upstreams = ["{bad.addr}"]', f'upstreams = ["{bad.addr}", "{good.addr}"]'
    )
    proxy = Proxy(tmp_path, config).start()
    try:
        for i in range(5):
            msg = ask(proxy.addr, f"fo{i}.example.test")
            assert msg.rcode() == 0 and msg.answer
        assert len(bad.seen) <= 5 * 3  # RFC 9520 §3.1: at most 3 tries per server
        assert len(good.seen) == 5
    finally:
        proxy.stop()
        bad.stop()
        good.stop()


def test_all_upstreams_down_at_start(tmp_path):
    """C6: nothing listening upstream at start-up: the listener is up, answers SERVFAIL,
    and the proxy does not spin (CPU time stays low while idle)."""
    dead = f"127.0.0.1:{free_port()}"
    proxy = Proxy(tmp_path, forward_config(dead)).start()
    try:
        assert proxy.proc is not None
        msg = ask(proxy.addr, "down.example.test", use_edns=0)
        assert msg.rcode() == dns.rcode.SERVFAIL
        assert [o.code for o in msg.options if o.otype == 15] in ([22], [23])
        before = _cpu_seconds(proxy.proc.pid)
        time.sleep(1.0)
        assert _cpu_seconds(proxy.proc.pid) - before < 0.2
    finally:
        proxy.stop()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _connect(addr: tuple[str, int], source: str) -> socket.socket:
    return socket.create_connection(addr, timeout=3, source_address=(source, 0))


def _tcp_answer(s: socket.socket, name: str) -> int:
    """Ask ``name`` on an open connection; the answer's rcode."""
    s.sendall(frame(_query(name)))
    out = read_frame(s)
    assert out is not None, "connection closed instead of answering"
    return out[3] & 0xF


def test_idle_connections_lock_no_client_out(tmp_path, upstream):
    """Issue 22 item 2 / RFC 7766 §6.2.3: one client filling its share of the connection
    table with idle connections is refused further ones, and a full table of idle
    connections closes the longest-idle one for a newcomer instead of refusing it. Each
    limit is logged once (rate-limited), whatever the number of hits."""
    server = (
        "max_tcp_connections = 6\nmax_tcp_per_client = 3\n"
        "tcp_idle_timeout = 30\ntcp_idle_timeout_min = 20\n"  # nothing times out here
    )
    proxy = Proxy(tmp_path, forward_config(upstream.addr, server=server)).start()
    hog = [_connect(proxy.addr, "127.0.1.1") for _ in range(3)]
    others: list[socket.socket] = []
    try:
        with _connect(proxy.addr, "127.0.1.1") as over:  # the hog's 4th: refused at once
            assert closed_within(over, 1.0) is not None
        with _connect(proxy.addr, "127.0.1.1") as over:
            assert closed_within(over, 1.0) is not None
        active = _connect(proxy.addr, "127.0.1.2")  # another client gets in and is answered
        others.append(active)
        assert _tcp_answer(active, "other.example.test") == 0
        others += [_connect(proxy.addr, "127.0.1.3") for _ in range(2)]  # 6 of 6: full
        time.sleep(0.2)
        for i, source in enumerate(("127.0.1.4", "127.0.1.5")):
            late = _connect(proxy.addr, source)
            others.append(late)
            assert _tcp_answer(late, f"late{i}.example.test") == 0  # served, not refused
            # The hog's connections were idle the longest: closed in connection order.
            assert closed_within(hog[i], 1.0) is not None
        assert closed_within(hog[2], 0.2) is None  # only as many as needed
        assert _tcp_answer(active, "still.example.test") == 0  # recently active: kept
        log = proxy.log()
        assert log.count("reached max_tcp_per_client (3)") == 1
        assert log.count("connection table full (max_tcp_connections = 6)") == 1
    finally:
        for s in hog + others:
            s.close()
        proxy.stop()


def test_idle_timeout_shrinks_as_the_table_fills(tmp_path, upstream):
    """RFC 7766 §6.2.3: past half full, a connection starting to wait gets a shorter idle
    timeout, down to tcp_idle_timeout_min at a full table; earlier ones keep theirs."""
    server = "max_tcp_connections = 4\ntcp_idle_timeout = 10\ntcp_idle_timeout_min = 0.5\n"
    proxy = Proxy(tmp_path, forward_config(upstream.addr, server=server)).start()
    conns = []
    try:
        for _ in range(4):
            conns.append(_connect(proxy.addr, "127.0.0.1"))
            time.sleep(0.1)  # admitted in this order
        took = closed_within(conns[3], 3.0)  # the 4th waits at a full table: 0.5 s
        assert took is not None and took < 2.0
        assert closed_within(conns[0], 0.1) is None  # the 1st waited at a quarter: 10 s
    finally:
        for s in conns:
            s.close()
        proxy.stop()


def _flood(addr: tuple[str, int], source: str, stop: threading.Event, rcodes: list[int]) -> None:
    """Slow unique names from ``source`` as fast as they are answered, until ``stop``."""
    while not stop.is_set():
        names = [f"{random.getrandbits(48):x}.victim.test" for _ in range(MAX_INFLIGHT)]
        replies = blast(addr, names, window=len(names), timeout=5, source=source)
        rcodes += [r[3] & 0xF for r in replies.values()]


def test_flooding_client_gets_only_its_share_of_inflight(tproxy, shared_upstream):
    """Issue 22 item 5: a client flooding names its upstream answers slowly is held to its
    share of max_inflight (a quarter by default); another client's cache misses, sent while
    the flood holds that share, are all answered."""
    shared_upstream.set_rules([{"match": {"qname": "*.victim.test."}, "delay": 0.8}])
    stop = threading.Event()
    flooded: list[int] = []
    flood = threading.Thread(target=_flood, args=(tproxy.addr, "127.0.1.1", stop, flooded))
    flood.start()
    rcodes = []
    try:
        time.sleep(0.3)  # the flood holds every slot it can
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.2.1", 0))
            s.settimeout(3)
            for i in range(60):
                s.sendto(_query(f"fair{i}.example.test", i), tproxy.addr)
                rcodes.append(parse(s.recv(65535)).rcode())
    finally:
        stop.set()
        flood.join(15)
    assert rcodes == [0] * 60
    assert flooded.count(dns.rcode.SERVFAIL) >= MAX_INFLIGHT // 2  # the flooder is refused
    assert alive(tproxy.addr)


@pytest.mark.skipif(
    "dnsproxy.plugins.ratelimit" not in BUILTIN, reason="ratelimit plugin not registered"
)
def test_query_limit_refusals_go_through_rrl(tmp_path, upstream):
    """Issue 22 item 10: the REFUSED answers of the per-client query limit are error
    responses like any other: RRL (errors_per_second) limits them over UDP."""
    before = (
        '[[chain]]\nplugin = "ratelimit"\nqueries_per_second = 5\n'
        "errors_per_second = 20\nslip = 0\n"
    )
    proxy = Proxy(tmp_path, forward_config(upstream.addr, before=before)).start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.3.1", 0))
            for i in range(100):
                s.sendto(_query(f"q{i}.example.test", i), proxy.addr)
            rcodes = []
            s.settimeout(1.0)
            try:
                while True:
                    rcodes.append(s.recv(65535)[3] & 0xF)
            except TimeoutError:
                pass
    finally:
        proxy.stop()
    refused = rcodes.count(dns.rcode.REFUSED)
    assert rcodes.count(dns.rcode.NOERROR) <= 10  # the query limit itself works
    # 95 refusals in well under a second: about 20 credits' worth go out, not all 95.
    assert 10 <= refused <= 40, rcodes
