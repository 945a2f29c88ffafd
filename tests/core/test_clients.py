"""Clients by name and groups: the [clients]/[groups] tables, the name sources (hosts files,
DHCP leases of dnsmasq, ISC dhcpd and Kea, the neighbour table, client ids) and step
scopes that name clients and groups."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import random
import socket
import struct
import time

import pytest
import trio

from dnsproxy import clients as clients_module
from dnsproxy.clients import (
    ARP as PROC_ARP,
)
from dnsproxy.clients import (
    Clients,
    netlink_neighbours,
    parse_config,
    parse_hosts,
    parse_leases,
    parse_neighbours,
    parse_netlink,
)
from dnsproxy.errors import ConfigError
from dnsproxy.loader import build_chain, load
from dnsproxy.testing import make_query
from tests.core.test_server import write_config

DNSMASQ = """\
1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 kids-tablet 01:aa:bb:cc:dd:ee:01
1718000300 aa:bb:cc:dd:ee:02 192.168.1.58 * *
1718000600 aa:bb:cc:dd:ee:03 192.168.1.59 office-laptop ff:12:34:56:78:00:01:00:01
duid 00:01:00:01:2c:4b:12:34:aa:bb:cc:dd:ee:ff
1718000900 1234567 fd00::57 kids-phone 00:01:00:01:2c:4b
"""

ISC = """\
# The format of this file is documented in the dhcpd.leases(5) manual page.
authoring-byte-order little-endian;

lease 192.168.1.70 {
  starts 3 2024/06/12 18:00:01;
  ends 3 2024/06/12 20:00:01;
  cltt 3 2024/06/12 18:00:01;
  binding state active;
  next binding state free;
  rewind binding state free;
  hardware ethernet aa:bb:cc:dd:ee:70;
  uid "\\001\\252\\273\\314\\335\\356p";
  client-hostname "living-room-tv";
}
lease 192.168.1.71 {
  starts 3 2024/06/12 18:00:01;
  binding state active;
  hardware ethernet aa:bb:cc:dd:ee:71;
  client-hostname "old-name";
}
lease 192.168.1.71 {
  starts 3 2024/06/12 19:00:01;
  binding state free;
  hardware ethernet aa:bb:cc:dd:ee:71;
}
"""

KEA = """\
address,hwaddr,client_id,valid_lifetime,expire,subnet_id,fqdn_fwd,fqdn_rev,hostname,state,user_context,pool_id
192.168.1.80,aa:bb:cc:dd:ee:80,01:aa:bb:cc:dd:ee:80,4000,1718004000,1,0,0,printer.lan.,0,,0
192.168.1.81,aa:bb:cc:dd:ee:81,,4000,1718004000,1,0,0,gone.lan.,2,,0
"""

ARP = """\
IP address       HW type     Flags       HW address            Mask     Device
192.168.1.90     0x1         0x2         aa:bb:cc:dd:ee:90     *        eth0
192.168.1.91     0x1         0x0         00:00:00:00:00:00     *        eth0
"""

# An RTM_GETNEIGH dump (family AF_UNSPEC) read from the kernel (6.18) in a network namespace
# of its own, after (veth pair v0/v1, both up):
#   ip -6 neigh add 2001:db8::5 lladdr 02:00:00:00:00:05 dev v0 nud permanent
#   ip -6 neigh add fe80::7 lladdr 02:00:00:00:00:07 dev v0 nud reachable
#   ip -6 neigh add 2001:db8::8 lladdr 02:00:00:00:00:08 dev v0 nud stale
#   ip -6 neigh add 2001:db8::9 dev v0 nud failed
#   ip -6 neigh add 2001:db8::a dev v0 nud incomplete
#   ip -6 neigh add 2001:db8::b lladdr 02:00:00:00:00:0b dev v0 nud noarp
#   ip -6 neigh add 2001:db8::c lladdr 00:00:00:00:00:00 dev v0 nud permanent
#   ip neigh add 192.0.2.7 lladdr 02:00:00:00:00:17 dev v0 nud reachable
# plus the kernel's own ff02::16 NOARP entries on v0 and v1, then NLMSG_DONE: one read.
NETLINK_DUMP = bytes.fromhex(
    "4c0000001c000200070000006728000002000000030000000200000108000100c00002070a00020002000000"
    "001700000800040000000000140003000e0000000e0000000e000000010000004c0000001c00020007000000"
    "672800000a00000003000000200000011400010020010db80000000000000000000000090800040000000000"
    "140003007e1700000e0000000e00000000000000580000001c00020007000000672800000a00000003000000"
    "400000011400010020010db800000000000000000000000b0a00020002000000000b00000800040000000000"
    "140003000e0000000e0000000e00000000000000580000001c00020007000000672800000a00000002000000"
    "4000000514000100ff0200000000000000000000000000160a00020033330000001600000800040000000000"
    "140003007d1700000d0000000d00000000000000580000001c00020007000000672800000a00000003000000"
    "0200000114000100fe8000000000000000000000000000070a00020002000000000700000800040000000000"
    "140003000f0000000f0000000f00000001000000580000001c00020007000000672800000a00000003000000"
    "040000011400010020010db80000000000000000000000080a00020002000000000800000800040000000000"
    "140003007e1700000e0000000e000000000000004c0000001c00020007000000672800000a00000003000000"
    "010000011400010020010db800000000000000000000000a0800040000000000140003007e1700000e000000"
    "0e00000000000000580000001c00020007000000672800000a00000003000000800000011400010020010db8"
    "0000000000000000000000050a00020002000000000500000800040000000000140003000f0000000f000000"
    "0f00000000000000580000001c00020007000000672800000a00000003000000800000011400010020010db8"
    "00000000000000000000000c0a00020000000000000000000800040000000000140003000e0000000e000000"
    "0e00000000000000580000001c00020007000000672800000a000000030000004000000514000100ff020000"
    "0000000000000000000000160a00020033330000001600000800040000000000140003007d1700000d000000"
    "0d000000000000001400000003000200070000006728000000000000"
)
NETLINK_USABLE = {
    "192.0.2.7": "02:00:00:00:00:17",
    "fe80::7": "02:00:00:00:00:07",
    "2001:db8::8": "02:00:00:00:00:08",
    "2001:db8::5": "02:00:00:00:00:05",
}
DONE = struct.pack("=LHHLLi", 20, 3, 2, 7, 0, 0)


def neigh(dst: str, state: int, lladdr: bytes | None, family: int = socket.AF_INET6) -> bytes:
    """One RTM_NEWNEIGH message as the kernel lays it out: nlmsghdr, ndmsg, NDA_DST and
    NDA_LLADDR rtattrs, each padded to 4 bytes."""

    def rta(kind: int, payload: bytes) -> bytes:
        size = 4 + len(payload)
        return struct.pack("=HH", size, kind) + payload + bytes(-size % 4)

    body = struct.pack("=BxxxiHBB", family, 3, state, 0, 1)
    body += rta(1, ipaddress.ip_address(dst).packed)
    if lladdr is not None:
        body += rta(2, lladdr)
    return struct.pack("=LHHLL", 16 + len(body), 28, 2, 7, 0) + body


def test_the_netlink_neighbour_dump_gives_the_usable_entries():
    """REACHABLE, STALE, PERMANENT (and DELAY, PROBE) with a MAC; not FAILED, INCOMPLETE,
    NOARP, an all-zero MAC or a link-layer address that is not a MAC."""
    assert parse_netlink(NETLINK_DUMP) == (NETLINK_USABLE, True)
    built = (
        neigh("2001:db8::d", 0x08, b"\x02\0\0\0\0\x0d")  # DELAY
        + neigh("2001:DB8:0:0:0:0:0:e", 0x10, b"\x02\0\0\0\0\x0e")  # PROBE
        + neigh("::ffff:192.0.2.15", 0x02, b"\x02\0\0\0\0\x0f")  # as the ACL sees it
        + neigh("2001:db8::10", 0x02, bytes(range(1, 21)))  # InfiniBand: 20 bytes
        + neigh("2001:db8::11", 0x02, None)
        + neigh("2001:db8::12", 0x20, b"\x02\0\0\0\0\x12")  # FAILED
        + neigh("192.0.2.19", 0x04, b"\x02\0\0\0\0\x13", socket.AF_INET)
    )
    assert parse_netlink(built) == (
        {
            "2001:db8::d": "02:00:00:00:00:0d",
            "2001:db8::e": "02:00:00:00:00:0e",
            "192.0.2.15": "02:00:00:00:00:0f",
            "192.0.2.19": "02:00:00:00:00:13",
        },
        False,  # no NLMSG_DONE yet: the dump goes on in the next read
    )


def test_a_truncated_or_garbled_netlink_dump_ends_it_without_crashing():
    assert parse_netlink(NETLINK_DUMP[: -len(DONE)]) == (NETLINK_USABLE, False)
    first = {"192.0.2.7": "02:00:00:00:00:17"}
    assert parse_netlink(NETLINK_DUMP[:100]) == (first, True)  # cut inside the second
    assert parse_netlink(NETLINK_DUMP[:76] + bytes(40)) == (first, True)  # length 0
    assert parse_netlink(NETLINK_DUMP[:76] + b"\x01\x02\x03") == (first, True)  # a stub
    overrun = bytearray(neigh("2001:db8::5", 0x80, b"\x02\0\0\0\0\x05"))
    overrun[28:30] = struct.pack("=H", 200)  # NDA_DST longer than the message
    assert parse_netlink(bytes(overrun) + DONE) == ({}, True)
    error = struct.pack("=LHHLLi", 36, 2, 0, 7, 0, -errno.EPERM) + bytes(16)
    with pytest.raises(OSError) as err:
        parse_netlink(NETLINK_DUMP[:76] + error)
    assert err.value.errno == errno.EPERM
    with pytest.raises(OSError) as err:  # an error message too short for its code
        parse_netlink(struct.pack("=LHHLL", 16, 2, 0, 7, 0))
    assert err.value.errno == errno.EPROTO
    rng = random.Random(5)
    for _ in range(2000):  # flipped bytes: an answer or OSError, never another exception
        data = bytearray(NETLINK_DUMP)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            entries, _ = parse_netlink(bytes(data))
        except OSError:
            continue
        assert all(isinstance(a, str) and len(m) == 17 for a, m in entries.items())


def test_lease_files_of_each_format_give_names_and_macs():
    names, macs = parse_leases(DNSMASQ)
    assert names == {
        "192.168.1.57": "kids-tablet",
        "192.168.1.59": "office-laptop",
        "fd00::57": "kids-phone",
    }
    assert macs["aa:bb:cc:dd:ee:01"] == "kids-tablet"
    names, macs = parse_leases(ISC)
    assert names == {"192.168.1.70": "living-room-tv"}  # the released lease is gone
    assert macs == {"aa:bb:cc:dd:ee:70": "living-room-tv", "aa:bb:cc:dd:ee:71": "old-name"}
    names, macs = parse_leases(KEA)
    assert names == {"192.168.1.80": "printer.lan"}  # state 2 (expired) is skipped
    assert macs == {"aa:bb:cc:dd:ee:80": "printer.lan"}


def test_hosts_files_and_the_neighbour_table():
    hosts = "# comment\n127.0.0.1 localhost\n192.168.1.20  nas.lan nas  # the NAS\nbad line\n"
    assert parse_hosts(hosts) == {"127.0.0.1": "localhost", "192.168.1.20": "nas.lan"}
    assert parse_neighbours(ARP) == {"192.168.1.90": "aa:bb:cc:dd:ee:90"}


def config(tmp_path, body: str, chain: str = '[[chain]]\nplugin = "static"\n'):
    cfg, registry, _ = load(write_config(tmp_path, body + "\n" + chain))
    return cfg, registry


def test_names_come_from_the_table_leases_hosts_arp_and_client_ids(tmp_path):
    (tmp_path / "dnsmasq.leases").write_text(DNSMASQ)
    (tmp_path / "dhcpd.leases").write_text(ISC)
    (tmp_path / "kea-leases4.csv").write_text(KEA)
    (tmp_path / "hosts").write_text("192.168.1.20 nas\n192.168.1.57 hosts-wins-over-leases\n")
    (tmp_path / "arp").write_text(ARP)
    cfg, _ = config(
        tmp_path,
        '[clients]\nfiles = ["hosts"]\nleases = ["dnsmasq.leases", "dhcpd.leases",'
        ' "kea-leases4.csv"]\nneighbours = "arp"\n'
        'grandpa = ["aa:bb:cc:dd:ee:90"]\nphone = ["id:phone1"]\n'
        'garage = ["10.9.0.0/16"]\ndoorbell = ["10.9.1.1"]\n'
        '[groups]\nkids = ["grandpa", "192.168.1.64/28"]\n',
    )
    clients = Clients(cfg.clients)
    name = lambda host, cid=None: clients.lookup(host, cid).name  # noqa: E731
    assert name("192.168.1.57") == "hosts-wins-over-leases"
    assert name("192.168.1.59") == "office-laptop"
    assert name("::ffff:192.168.1.70") == "living-room-tv"
    assert name("192.168.1.80") == "printer.lan"
    assert name("192.168.1.20") == "nas"
    assert name("192.168.1.90") == "grandpa"  # MAC from the neighbour table
    assert name("10.9.1.1") == "doorbell" and name("10.9.7.7") == "garage"  # most specific
    assert name("203.0.113.9", "phone1") == "phone" and name("203.0.113.9") is None
    assert clients.lookup("192.168.1.90").groups == {"kids"}
    assert clients.lookup("192.168.1.66").groups == {"kids"}
    assert clients.lookup("192.168.1.57").groups == frozenset()


def test_a_changed_lease_file_is_read_again(tmp_path):
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text("1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 first *\n")
    cfg, _ = config(tmp_path, '[clients]\nleases = ["dnsmasq.leases"]\nneighbours = ""\n')
    clients = Clients(cfg.clients)
    q = make_query("example.org", client="192.168.1.57")
    assert clients.record(q).name == "first" and q.who is clients.record(q)
    assert not clients.refresh()  # unchanged: nothing is rebuilt
    leases.write_text("1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 second *\n")
    os.utime(leases, (1, 1))
    assert clients.refresh()
    assert clients.record(make_query("example.org", client="192.168.1.57")).name == "second"


def test_a_rewrite_within_the_same_mtime_is_read_and_a_missing_file_warned_of_once(
    tmp_path, caplog
):
    """The file's stamp (mtime and size) decides a re-read: a coarse-clock filesystem may
    leave the mtime as it was. An unreadable file is logged once until it is back."""
    leases = tmp_path / "dnsmasq.leases"
    leases.write_text("1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 first *\n")
    os.utime(leases, (1, 1))
    cfg, _ = config(tmp_path, '[clients]\nleases = ["dnsmasq.leases"]\nneighbours = ""\n')
    clients = Clients(cfg.clients)
    assert clients.lookup("192.168.1.57").name == "first"
    leases.write_text("1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 longer *\n")
    os.utime(leases, (1, 1))  # same mtime, other size
    assert clients.refresh()
    assert clients.lookup("192.168.1.57").name == "longer"
    leases.unlink()
    for _ in range(3):
        clients.refresh()
    assert [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()] == [
        f"clients: cannot read {leases}: No such file or directory"
    ]
    leases.write_text("1718000000 aa:bb:cc:dd:ee:01 192.168.1.57 back *\n")
    assert clients.refresh() and clients.lookup("192.168.1.57").name == "back"


def kernel(monkeypatch, tmp_path, table: dict[str, str] | None = None, arp: str = ARP):
    """The kernel's tables substituted for ``neighbours = "kernel"``: /proc/net/arp by a
    file, the netlink dump by ``table`` (the usable entries of NETLINK_DUMP); the calls
    are counted."""
    (tmp_path / "proc-arp").write_text(arp)
    monkeypatch.setattr(clients_module, "ARP", tmp_path / "proc-arp")
    calls: list[int] = []

    def dump(limit: int) -> dict[str, str]:
        calls.append(limit)
        return dict(NETLINK_USABLE if table is None else table)

    monkeypatch.setattr(clients_module, "netlink_neighbours", dump)
    return calls


def test_ipv6_clients_are_named_by_the_mac_of_the_kernel_neighbour_table(monkeypatch, tmp_path):
    """``neighbours = "kernel"`` (the default): /proc/net/arp and the IPv6 neighbours by
    netlink, matched in the form the listener gives a client's address (compressed)."""
    calls = kernel(monkeypatch, tmp_path)
    (tmp_path / "dnsmasq.leases").write_text("1718000000 02:00:00:00:00:07 192.168.1.7 phone *\n")
    cfg, _ = config(
        tmp_path,
        '[clients]\nneighbours = "kernel"\nleases = ["dnsmasq.leases"]\nmax_clients = 100\n'
        'kid = ["02:00:00:00:00:05"]\ngrandpa = ["aa:bb:cc:dd:ee:90"]\n'
        '[groups]\nkids = ["kid"]\n',
    )
    clients = Clients(cfg.clients)
    assert clients.lookup("2001:db8::5").name is None  # not read before `update`
    assert trio.run(clients.update) and calls == [100]
    kid = clients.lookup("2001:db8::5")
    assert kid.name == "kid" and kid.groups == {"kids"}
    assert clients.lookup("2001:db8:0:0:0:0:0:5") == kid
    assert clients.record(make_query("example.org", client="2001:db8::5")) == kid
    assert clients.lookup("fe80::7").name == "phone"  # the MAC of a lease
    assert clients.lookup("2001:db8::9").name is None  # FAILED: no MAC
    assert clients.lookup("192.168.1.90").name == "grandpa"  # /proc/net/arp, as before
    assert not trio.run(clients.update)  # the same tables: nothing is rebuilt


def test_the_ipv6_neighbours_are_read_only_for_kernel_and_when_macs_matter(monkeypatch, tmp_path):
    calls = kernel(monkeypatch, tmp_path)
    for body in (
        '[clients]\nneighbours = "kernel"\nkid = ["192.168.1.5"]\n',  # no MAC, no leases
        '[clients]\nneighbours = "proc-arp"\nkid = ["02:00:00:00:00:05"]\n',  # ARP only
        '[clients]\nneighbours = ""\nkid = ["02:00:00:00:00:05"]\n',
    ):
        cfg, _ = config(tmp_path, body)
        clients = Clients(cfg.clients)
        trio.run(clients.update)
        assert calls == [] and clients.lookup("2001:db8::5").name is None, body
    cfg, _ = config(tmp_path, '[clients]\nneighbours = "kernel"\nkid = ["02:00:00:00:00:05"]\n')
    clients = Clients(cfg.clients)
    trio.run(clients.update)
    assert calls == [65536] and clients.lookup("2001:db8::5").name == "kid"
    clients.configure(
        config(tmp_path, '[clients]\nneighbours = ""\nkid = ["02:00:00:00:00:05"]')[0].clients
    )
    assert clients.lookup("2001:db8::5").name is None  # a reload away from "kernel"


def test_the_neighbour_tables_keep_max_clients_entries(monkeypatch, tmp_path):
    table = {f"2001:db8::{i:x}": "02:00:00:00:00:05" for i in range(1, 41)}
    kernel(monkeypatch, tmp_path, table)
    cfg, _ = config(
        tmp_path,
        '[clients]\nneighbours = "kernel"\nmax_clients = 16\nkid = ["02:00:00:00:00:05"]\n',
    )
    clients = Clients(cfg.clients)
    assert trio.run(clients.update)
    # /proc/net/arp's entry first, then 15 of the IPv6 table
    assert clients.lookup("192.168.1.90").name is None  # its MAC names no one
    named = [a for a in table if clients.lookup(a).name == "kid"]
    assert named == list(table)[:15]
    assert not trio.run(clients.update)  # trimmed alike each time: no rebuild


def test_without_netlink_one_warning_and_the_arp_table_still_names(monkeypatch, tmp_path, caplog):
    (tmp_path / "proc-arp").write_text(ARP)
    monkeypatch.setattr(clients_module, "ARP", tmp_path / "proc-arp")
    answers = iter([PermissionError(errno.EPERM, "Operation not permitted")] * 3 + [{}])

    def dump(limit: int) -> dict[str, str]:
        answer = next(answers)
        if isinstance(answer, OSError):
            raise answer
        return answer

    monkeypatch.setattr(clients_module, "netlink_neighbours", dump)
    cfg, _ = config(tmp_path, '[clients]\nneighbours = "kernel"\ngrandpa = ["aa:bb:cc:dd:ee:90"]\n')
    clients = Clients(cfg.clients)
    with caplog.at_level(logging.WARNING, "dnsproxy.clients"):
        for _ in range(3):
            trio.run(clients.update)
            assert clients.lookup("192.168.1.90").name == "grandpa"
    assert [r.getMessage() for r in caplog.records] == [
        "clients: cannot read the IPv6 neighbour table (rtnetlink): Operation not permitted;"
        " IPv6 clients are not named by MAC"
    ]
    trio.run(clients.update)
    assert not clients._netlink_failed  # it works again: a later failure is warned of


def test_netlink_is_an_oserror_where_the_platform_has_none(monkeypatch):
    monkeypatch.delattr(socket, "AF_NETLINK", raising=False)
    with pytest.raises(OSError, match="netlink is Linux only"):
        netlink_neighbours(16)


class EndlessDump:
    """A netlink socket whose RTM_GETNEIGH dump never ends: each read is ``per_read`` new
    usable entries, after ``pause`` seconds."""

    def __init__(self, per_read: int, pause: float = 0.0) -> None:
        self.per_read, self.pause, self.reads = per_read, pause, 0

    def __call__(self, *args: object) -> EndlessDump:
        return self

    def __enter__(self) -> EndlessDump:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def settimeout(self, timeout: float) -> None:
        pass

    def send(self, data: bytes) -> int:
        return len(data)

    def recv(self, size: int) -> bytes:
        self.reads += 1
        assert self.reads < 200, "the dump was not cut short"
        time.sleep(self.pause)
        first = self.reads * self.per_read
        return b"".join(
            neigh(f"2001:db8::{i:x}", 0x02, b"\x02\0\0\0\0\x05")
            for i in range(first, first + self.per_read)
        )


def test_a_netlink_dump_stops_at_max_clients_entries(monkeypatch):
    dump = EndlessDump(per_read=10)
    monkeypatch.setattr(socket, "socket", dump)
    assert len(netlink_neighbours(16)) == 16 and dump.reads == 2


def test_a_netlink_dump_that_outlasts_netlink_timeout_is_a_timeout(monkeypatch):
    monkeypatch.setattr(clients_module, "NETLINK_TIMEOUT", 0.2)
    dump = EndlessDump(per_read=1, pause=0.02)
    monkeypatch.setattr(socket, "socket", dump)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"the dump took over 0\.2 s"):
        netlink_neighbours(1_000_000)
    assert 0.2 <= time.monotonic() - began < 1


def test_neighbours_kernel_is_the_default_and_a_path_stays_a_path(tmp_path):
    kernel = parse_config("config.toml", tmp_path, {})
    assert (kernel.neighbours, kernel.netlink) == (PROC_ARP, True)
    for value, expected in [
        ("kernel", (PROC_ARP, True)),
        ("/proc/net/arp", (PROC_ARP, False)),
        ("arp", (tmp_path / "arp", False)),
        ("", (None, False)),
    ]:
        got = parse_config("config.toml", tmp_path, {"clients": {"neighbours": value}})
        assert (got.neighbours, got.netlink) == expected, value


@pytest.mark.parametrize(
    ("body", "chain", "message"),
    [
        ("", 'clients = ["kids"]', "chain[0] (static): clients: 'kids' is neither an IP network"),
        ('[clients]\ntab = ["192.168.1.5"]', 'clients = ["tablet"]', "(known: tab)"),
        ('[groups]\nkids = ["tablet"]', "", "groups: kids: 'tablet' is neither a network"),
        ('[clients]\ntab = ["nonsense"]', "", "clients: tab: 'nonsense' is not an address"),
        ('[clients]\ntab = ["1.2.3.4"]\n[groups]\ntab = []', "", "groups: tab: 'tab' is also"),
        ('[clients]\nptr_resolver = "lan-router"', "", "clients: ptr_resolver: 'lan-router'"),
        ('[clients]\nptr_ttl = "0s"', "", "clients: ptr_ttl: must be between"),
        ("[clients]\nleases = 3", "", "clients: leases: expected a list of strings"),
        ('[clients]\nptr_ttl = "8d"', "", "clients: ptr_ttl: must be between 1 s and 604800 s"),
        ("[clients]\nptr_ttl = []", "", "clients: ptr_ttl: expected a duration such as 30"),
        ('[clients]\nrefresh = "50ms"', "", "clients: refresh: must be between 0.1 s and 3600 s"),
        ('[clients]\nrefresh = "2h"', "", "clients: refresh: must be between 0.1 s and 3600 s"),
        (
            "[clients]\nmax_clients = 15",
            "",
            "clients: max_clients: must be between 16 and 10000000",
        ),
        ("[clients]\nmax_clients = 10000001", "", "clients: max_clients: must be between 16 and"),
        ('[clients]\nmax_clients = "many"', "", "clients: max_clients: expected an integer"),
        ("[clients]\nmax_clients = true", "", "clients: max_clients: expected an integer"),
        ("[clients]\nneighbours = 1", "", 'clients: neighbours: expected a path ("/proc/net/arp"'),
        (
            '[clients]\nneighbours = ["kernel"]',
            "",
            'neighbours: expected a path ("/proc/net/arp"),'
            ' "kernel" (that and the IPv6 neighbours) or "" (none)',
        ),
        ('[clients]\nneighbours = "Kernel"', "", "clients: neighbours: 'Kernel': did you mean"),
        ("[clients]\nptr_resolver = 53", "", 'clients: ptr_resolver: expected "host:port"'),
    ],
)
def test_config_errors_name_file_table_and_key(tmp_path, body, chain, message):
    with pytest.raises(ConfigError) as err:
        config(tmp_path, body, f'[[chain]]\nplugin = "static"\n{chain}\n')
    assert message in str(err.value) and "config.toml: " in str(err.value)


def test_clients_and_groups_that_are_not_tables_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as err:
        parse_config("config.toml", tmp_path, {"clients": 3, "groups": "x"})
    assert err.value.lines == [
        "config.toml: clients must be a table",
        "config.toml: groups must be a table",
    ]


def test_steps_scoped_to_names_and_groups(tmp_path):
    cfg, registry = config(
        tmp_path,
        '[clients]\nkids-tablet = ["192.168.1.57", "id:kidstab"]\nparent = ["192.168.1.2"]\n'
        '[groups]\nkids = ["kids-tablet", "192.168.1.64/28"]\n',
        '[[chain]]\nplugin = "static"\nclients = ["kids"]\n'
        '[[chain]]\nplugin = "static"\nclients = ["parent", "10.0.0.0/8"]\n'
        '[[chain]]\nplugin = "static"\nclients = ["10.0.0.0/8"]\n',
    )
    kids, parent, plain = (s.setup.scope for s in build_chain(cfg, registry).steps)
    assert kids.depends_on_client and parent.depends_on_client
    ask = lambda host: make_query("example.org", client=host)  # noqa: E731
    assert kids(ask("192.168.1.57")) and kids(ask("192.168.1.70"))
    assert not kids(ask("192.168.1.2")) and not kids(ask("192.168.1.80"))
    by_id = ask("203.0.113.5")
    by_id.client_id = "kidstab"
    assert kids(by_id)
    assert (
        parent(ask("192.168.1.2")) and parent(ask("10.1.1.1")) and not parent(ask("192.168.1.57"))
    )
    assert plain.names == frozenset() and plain.lookup is None  # networks only: as before
