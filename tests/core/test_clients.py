"""Clients by name and groups: the [clients]/[groups] tables, the name sources (hosts files,
DHCP leases of dnsmasq, ISC dhcpd and Kea, the neighbour table, client ids) and step
scopes that name clients and groups."""

from __future__ import annotations

import os

import pytest

from dnsproxy.clients import Clients, parse_config, parse_hosts, parse_leases, parse_neighbours
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
