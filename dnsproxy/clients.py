"""Clients by name and groups: the ``[clients]`` and ``[groups]`` tables and where names come from.

A client is named by the ``[clients]`` table (name -> addresses, networks, MAC addresses,
DoT/DoH client ids ``id:NAME``), by ``/etc/hosts``-style files, by DHCP lease files
(dnsmasq, ISC dhcpd, Kea CSV; the format is recognised from the content), and by reverse
(PTR) lookups to a LAN resolver. MAC addresses come from the leases and the kernel's
neighbour tables: ``/proc/net/arp`` for IPv4 and, on Linux, an rtnetlink dump for IPv6
(SLAAC privacy addresses change daily: the MAC is what names such a client).
``[groups]`` gathers declared names and networks.

`Clients` is owned by the server and survives reloads (its PTR cache). Per query it is
one dictionary lookup, address (and client id) -> `ClientRecord`, cached on the query
(``q.who``) for the steps after; everything slow (files, PTR) happens in `Clients.run`,
which re-reads the sources when their modification time changes and resolves names in the
background: a client is shown by its address until its name is known.
"""

from __future__ import annotations

import csv
import errno
import io
import ipaddress
import itertools
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Any

import attrs
import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.reversename
import trio

from dnsproxy import options
from dnsproxy.errors import ConfigError
from dnsproxy.files import Stamp, stamp
from dnsproxy.wire import Query, hostport

log = logging.getLogger("dnsproxy.clients")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IP = ipaddress.IPv4Address | ipaddress.IPv6Address

RESERVED = ("files", "leases", "neighbours", "ptr_resolver", "ptr_ttl", "refresh", "max_clients")
_MAC = re.compile(r"^[0-9a-f]{2}([:-][0-9a-f]{2}){5}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
PTR_TIMEOUT = 2.0  # seconds one reverse lookup may take
PTR_POLL = 0.5  # seconds between looks at the addresses waiting for a reverse lookup
ARP = Path("/proc/net/arp")
NETLINK_TIMEOUT = 1.0  # seconds one dump of the neighbour table may take
NETLINK_BUFFER = 65536  # bytes per read: the kernel sends a dump in parts of at most 32 KiB


def mac(text: str) -> str | None:
    """A MAC address in the canonical form ``aa:bb:cc:dd:ee:ff``, or None."""
    t = text.strip().lower()
    return t.replace("-", ":") if _MAC.match(t) else None


def client_address(host: str) -> IP | None:
    """A client's address as the ACL and scopes see it: zone id dropped, v4-mapped as v4."""
    try:
        addr = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@attrs.frozen
class ClientRecord:
    """What is known of one client: its name (None: unnamed) and its groups; ``tags``
    (name and groups) is what step scopes match."""

    name: str | None
    groups: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()


UNKNOWN = ClientRecord(None)


@attrs.frozen
class Identity:
    """One ``[clients]`` entry."""

    name: str
    networks: tuple[Network, ...] = ()
    macs: frozenset[str] = frozenset()
    ids: frozenset[str] = frozenset()


@attrs.frozen
class Group:
    """One ``[groups]`` entry: declared client names and networks."""

    name: str
    names: frozenset[str] = frozenset()
    networks: tuple[Network, ...] = ()


@attrs.frozen
class ClientsConfig:
    """The ``[clients]`` and ``[groups]`` tables, validated (paths resolved)."""

    identities: tuple[Identity, ...] = ()
    groups: tuple[Group, ...] = ()
    files: tuple[Path, ...] = ()
    leases: tuple[Path, ...] = ()
    neighbours: Path | None = ARP
    netlink: bool = True  # ``neighbours = "kernel"``: also the IPv6 neighbours, by rtnetlink
    ptr_resolver: tuple[str, int] | None = None
    ptr_ttl: float = 3600.0
    refresh: float = 10.0
    max_clients: int = 65536

    @property
    def names(self) -> frozenset[str]:
        """Client and group names a step's ``clients`` key may use."""
        return frozenset(i.name for i in self.identities) | {g.name for g in self.groups}

    @property
    def enabled(self) -> bool:
        """Whether any client can have a name or a group."""
        return bool(
            self.identities or self.groups or self.files or self.leases or self.ptr_resolver
        )


def _members(value: object) -> tuple[str, ...]:
    items = options.string_tuple(value)
    return tuple(i.strip() for i in items)


def parse_config(file: str, base: Path, doc: Mapping[str, Any]) -> ClientsConfig:
    """Validate ``[clients]`` and ``[groups]``; ConfigError naming file, table and key."""
    errors: list[str] = []
    raw = doc.get("clients", {})
    raw_groups = doc.get("groups", {})
    if not isinstance(raw, dict):
        errors.append(f"{file}: clients must be a table")
        raw = {}
    if not isinstance(raw_groups, dict):
        errors.append(f"{file}: groups must be a table")
        raw_groups = {}
    fields: dict[str, Any] = {}

    def paths(key: str) -> tuple[Path, ...]:
        return tuple(
            p if p.is_absolute() else base / p
            for p in (Path(s).expanduser() for s in options.string_tuple(raw[key]))
        )

    identities = []
    for key, value in raw.items():
        where = f"{file}: clients: {key}"
        try:
            if key in ("files", "leases"):
                fields[key] = paths(key)
            elif key == "neighbours":
                if not isinstance(value, str):
                    raise TypeError(
                        'expected a path ("/proc/net/arp"), "kernel" (that and the IPv6'
                        ' neighbours) or "" (none)'
                    )
                if value != "kernel" and value.strip().lower() == "kernel":
                    raise ValueError(f'{value!r}: did you mean "kernel"?')
                fields["netlink"] = value == "kernel"
                fields[key] = ARP if value == "kernel" else paths(key)[0] if value else None
            elif key == "ptr_resolver":
                if not isinstance(value, str):
                    raise TypeError('expected "host:port" of a LAN resolver ("" for none)')
                fields[key] = _resolver(value) if value else None
            elif key in ("ptr_ttl", "refresh"):
                low, high = (1.0, 7 * 86400.0) if key == "ptr_ttl" else (0.1, 3600.0)
                seconds = options.duration(value)
                if not low <= seconds <= high:
                    raise ValueError(f"must be between {low:g} s and {high:g} s")
                fields[key] = seconds
            elif key == "max_clients":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise TypeError("expected an integer")
                if not 16 <= value <= 10_000_000:
                    raise ValueError("must be between 16 and 10000000")
                fields[key] = value
            else:
                identities.append(_identity(key, value))
        except (TypeError, ValueError) as exc:
            errors.append(f"{where}: {exc}")
    declared = {i.name for i in identities}
    groups = []
    for key, value in raw_groups.items():
        where = f"{file}: groups: {key}"
        try:
            groups.append(_group(key, value, declared))
        except (TypeError, ValueError) as exc:
            errors.append(f"{where}: {exc}")
        if key in declared:
            errors.append(f"{where}: {key!r} is also a client name in [clients]; rename one")
    if errors:
        raise ConfigError(errors)
    return ClientsConfig(tuple(identities), tuple(groups), **fields)


def _resolver(text: str) -> tuple[str, int]:
    from dnsproxy.config import Address  # config imports this module

    addr = Address.parse(text)
    if client_address(addr.host) is None:
        raise ValueError(f"{text!r}: the resolver must be an IP address (host:port)")
    return addr.host, addr.port


def _name(key: str) -> str:
    if key in RESERVED:
        raise ValueError(f"{key!r} is a reserved key of [clients]")
    if not _NAME.match(key):
        raise ValueError("a name is letters, digits, '-', '_' and '.'")
    return key


def _identity(key: str, value: object) -> Identity:
    name = _name(key)
    nets, macs, ids = [], set(), set()
    for item in _members(value):
        if item.startswith("id:") and len(item) > 3:
            ids.add(item[3:])
        elif (m := mac(item)) is not None:
            macs.add(m)
        else:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an address, network, MAC address or id:CLIENT-ID"
                ) from None
    return Identity(name, tuple(nets), frozenset(macs), frozenset(ids))


def networks_and_names(
    items: Iterable[str], known: Set[str], *, what: str, none: str
) -> tuple[tuple[Network, ...], frozenset[str]]:
    """Split ``items`` into networks and names in ``known`` (a group's members, a step's
    ``clients``); ValueError naming ``what`` the other items may be, or ``none`` when no
    name is declared."""
    nets, names = [], set()
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if item not in known:
            listed = ", ".join(sorted(known)) or none
            raise ValueError(f"{item!r} is neither {what} (known: {listed})")
        names.add(item)
    return tuple(nets), frozenset(names)


def _group(key: str, value: object, declared: set[str]) -> Group:
    nets, names = networks_and_names(
        _members(value),
        declared,
        what="a network nor a client name of [clients]",
        none="none declared",
    )
    return Group(_name(key), names, nets)


# --- the sources ----------------------------------------------------------------------


def parse_hosts(text: str) -> dict[str, str]:
    """Address -> first host name of an /etc/hosts-style file."""
    out = {}
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) >= 2 and (addr := client_address(fields[0])) is not None:
            out.setdefault(str(addr), fields[1])
    return out


def parse_leases(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(address -> host name, MAC -> host name) of a lease file: dnsmasq, ISC dhcpd or Kea
    CSV, recognised from the content."""
    head = text.lstrip()[:200]
    if head.startswith("address,"):
        return _kea(text)
    if re.search(r"^\s*lease\s+\S+\s*\{", text, re.M):
        return _isc(text)
    return _dnsmasq(text)


def _add(names: dict[str, str], macs: dict[str, str], addr: str, hw: str, host: str) -> None:
    host = host.strip().strip('"').rstrip(".")
    a = client_address(addr)
    if a is None or not host or host == "*":
        return
    names[str(a)] = host
    if (m := mac(hw)) is not None:
        macs[m] = host


def _dnsmasq(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """``expiry mac address hostname client-id`` per line (``duid`` lines skipped)."""
    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 4:
            _add(names, macs, f[2], f[1], f[3])
    return names, macs


_ISC_LEASE = re.compile(r"lease\s+(\S+)\s*\{(.*?)\}", re.S)
_ISC_HW = re.compile(r"hardware\s+ethernet\s+([0-9a-fA-F:]+)\s*;")
_ISC_HOST = re.compile(r'client-hostname\s+"([^"]*)"\s*;')
_ISC_STATE = re.compile(r"^\s*binding\s+state\s+(\w+)\s*;", re.M)


def _isc(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """``lease ADDR { ... }`` blocks; later blocks win; only ``binding state active``."""
    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    for m in _ISC_LEASE.finditer(text):
        addr, body = m.group(1), m.group(2)
        state = _ISC_STATE.search(body)
        host = _ISC_HOST.search(body)
        if state is not None and state.group(1) != "active":
            names.pop(str(client_address(addr)), None)
            continue
        if host is not None:
            hw = _ISC_HW.search(body)
            _add(names, macs, addr, hw.group(1) if hw else "", host.group(1))
    return names, macs


def _kea(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Kea's memfile CSV (``address,hwaddr,...,hostname,state``); state 0 is a live lease."""
    names: dict[str, str] = {}
    macs: dict[str, str] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("state", "0") in ("0", None, ""):
            _add(
                names,
                macs,
                row.get("address") or "",
                row.get("hwaddr") or "",
                row.get("hostname") or "",
            )
    return names, macs


def parse_neighbours(text: str) -> dict[str, str]:
    """Address -> MAC from /proc/net/arp (complete entries only)."""
    out = {}
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 4 or f[2] == "0x0" or (m := mac(f[3])) in (None, "00:00:00:00:00:00"):
            continue
        if (a := client_address(f[0])) is not None:
            out[str(a)] = m
    return out


# rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h): a message is an
# nlmsghdr then, for RTM_NEWNEIGH, an ndmsg and rtattrs, each padded to 4 bytes.
_NLMSG = struct.Struct("=LHHLL")  # length, type, flags, sequence, port id
_NDMSG = struct.Struct("=BxxxiHBB")  # family, interface index, state, flags, type
_RTA = struct.Struct("=HH")  # length, type
_ERRNO = struct.Struct("=i")  # an NLMSG_ERROR's error code (a negative errno)
NLMSG_ERROR, NLMSG_DONE, RTM_NEWNEIGH, RTM_GETNEIGH = 2, 3, 28, 30
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NDA_DST, NDA_LLADDR = 1, 2
# REACHABLE, STALE, DELAY, PROBE, PERMANENT: the link-layer address is known (not
# INCOMPLETE, FAILED, or NOARP: multicast and point-to-point entries).
NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80
_DUMP_IPV6 = _NLMSG.pack(
    _NLMSG.size + _NDMSG.size, RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, 1, 0
) + _NDMSG.pack(socket.AF_INET6, 0, 0, 0, 0)


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attributes(data: bytes, at: int, end: int) -> dict[int, bytes]:
    """Type -> payload of the rtattrs in ``data[at:end]``, up to a garbled one."""
    found: dict[int, bytes] = {}
    while at + _RTA.size <= end:
        size, kind = _RTA.unpack_from(data, at)
        if size < _RTA.size or at + size > end:
            break
        found[kind] = data[at + _RTA.size : at + size]
        at += _align(size)
    return found


def parse_netlink(data: bytes) -> tuple[dict[str, str], bool]:
    """Address -> MAC of the usable entries in one read of an RTM_GETNEIGH dump (a state in
    NUD_USABLE, a non-zero 6-byte MAC), and whether the dump ended: NLMSG_DONE, or a
    truncated or garbled message (nothing after it can be trusted). OSError for
    NLMSG_ERROR. Addresses are in the form `client_address` gives a query's client."""
    out: dict[str, str] = {}
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind = _NLMSG.unpack_from(data, offset)[:2]
        end = offset + length
        if length < _NLMSG.size or end > len(data) or kind == NLMSG_DONE:
            return out, True
        if kind == NLMSG_ERROR:
            at = offset + _NLMSG.size  # an nlmsgerr: the negative errno first
            code = abs(_ERRNO.unpack_from(data, at)[0]) if end >= at + _ERRNO.size else 0
            raise OSError(code or errno.EPROTO, os.strerror(code or errno.EPROTO))
        if kind == RTM_NEWNEIGH and length >= _NLMSG.size + _NDMSG.size:
            state = _NDMSG.unpack_from(data, offset + _NLMSG.size)[2]
            found = _attributes(data, offset + _NLMSG.size + _NDMSG.size, end)
            dst, hw = found.get(NDA_DST, b""), found.get(NDA_LLADDR, b"")
            if state & NUD_USABLE and len(dst) in (4, 16) and len(hw) == 6 and any(hw):
                addr: IP = (ipaddress.IPv4Address if len(dst) == 4 else ipaddress.IPv6Address)(dst)
                if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                    addr = addr.ipv4_mapped
                out[str(addr)] = hw.hex(":")
        offset += _align(length)
    return out, offset != len(data)


def netlink_neighbours(limit: int) -> dict[str, str]:
    """Address -> MAC of the kernel's IPv6 neighbour table: one RTM_GETNEIGH dump over
    rtnetlink, at most ``limit`` entries kept and NETLINK_TIMEOUT seconds taken. It blocks
    (briefly): run it in a thread. OSError where netlink is missing or refused."""
    family = getattr(socket, "AF_NETLINK", None)
    if family is None:
        raise OSError(errno.EAFNOSUPPORT, "netlink is Linux only")
    out: dict[str, str] = {}
    deadline = time.monotonic() + NETLINK_TIMEOUT
    with socket.socket(family, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(NETLINK_TIMEOUT)
        sock.send(_DUMP_IPV6)
        done = False
        while not done and len(out) < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the dump took over {NETLINK_TIMEOUT:g} s")
            sock.settimeout(left)
            entries, done = parse_netlink(sock.recv(NETLINK_BUFFER))
            out.update(entries)
    return dict(itertools.islice(out.items(), limit))


# --- the live object --------------------------------------------------------------------


class Clients:
    """Client records for one server: `record` on the query path, `run` in the background."""

    def __init__(self, config: ClientsConfig | None = None) -> None:
        self.config = ClientsConfig()
        self.records: dict[object, ClientRecord] = {}
        # Bumped whenever a client's record may have changed (the packet cache's views,
        # worked out from records, are then forgotten).
        self.generation = 0
        self._files: dict[Path, tuple[Stamp, str]] = {}  # path: (stamp, text), by `_read`
        self._hosts: dict[str, str] = {}  # address: name, from files and leases
        self._lease_macs: dict[str, str] = {}  # MAC: name, from leases
        self._neighbours: dict[str, str] = {}  # address: MAC
        self._netlink: dict[str, str] = {}  # address: MAC, the IPv6 neighbours by `update`
        self._netlink_failed = False  # the last dump failed (warned of)
        self._ptr: dict[str, tuple[str | None, float]] = {}  # address: (name, expires)
        self._pending: set[str] = set()  # addresses waiting for a reverse lookup
        self._build_maps()
        if config is not None:
            self.configure(config)

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    def configure(self, config: ClientsConfig) -> None:
        """Apply a (re)loaded config; sources are read again now, the PTR cache kept
        unless the resolver changed."""
        if config.ptr_resolver != self.config.ptr_resolver:
            self._ptr.clear()
            self._pending.clear()
        self.config = config
        self._files.clear()
        self._build_maps()
        self.refresh()

    def _build_maps(self) -> None:
        c = self.config
        self._by_id = {i: ident.name for ident in c.identities for i in ident.ids}
        self._by_mac = {m: ident.name for ident in c.identities for m in ident.macs}
        self._by_net = [(n, ident.name) for ident in c.identities for n in ident.networks]
        self._by_net.sort(key=lambda item: -item[0].prefixlen)  # the most specific first
        self._groups = c.groups
        self._forget()

    def _forget(self) -> None:
        """Drop every record (they are worked out again as queries arrive)."""
        self.records = {}
        self.generation += 1

    # --- per query ---

    def record(self, q: Query) -> ClientRecord:
        """The record of ``q``'s client, cached on the query (one dict lookup otherwise)."""
        rec = q.who
        if rec is None:
            host = q.client[0]
            key = host if q.client_id is None else (host, q.client_id)
            rec = self.records.get(key)
            if rec is None:
                rec = self._resolve(key, host, q.client_id)
            q.who = rec
        return rec

    def name(self, q: Query) -> str | None:
        """``q``'s client name, or None (shown by its address)."""
        return self.record(q).name if self.config.enabled else None

    def lookup(self, host: str, client_id: str | None = None) -> ClientRecord:
        """The record of the client at ``host`` (``dnsproxy query --client``, tests)."""
        key = host if client_id is None else (host, client_id)
        return self.records.get(key) or self._resolve(key, host, client_id)

    def address_of(self, client: str) -> tuple[str, str | None] | None:
        """(address, client id) to ask as ``client``: an address, or a client name (its
        first address or id in [clients], else an address the sources name it at)."""
        if client_address(client) is not None:
            return client, None
        for ident in self.config.identities:
            if ident.name == client:
                for net in ident.networks:
                    return str(net.network_address), None
                if ident.ids:
                    return "127.0.0.1", min(ident.ids)
        for addr, name in self._hosts.items():
            if name == client:
                return addr, None
        for addr, (name, _) in self._ptr.items():
            if name == client:
                return addr, None
        return None

    def _resolve(self, key: object, host: str, client_id: str | None) -> ClientRecord:
        addr = client_address(host)
        text = str(addr) if addr is not None else host
        name = self._by_id.get(client_id) if client_id is not None else None
        if name is None and addr is not None:
            hw = self._neighbours.get(text)
            if hw is not None:
                name = self._by_mac.get(hw) or self._lease_macs.get(hw)
            if name is None:
                name = next((n for net, n in self._by_net if addr in net), None)
            if name is None:
                name = self._hosts.get(text)
            if name is None and self.config.ptr_resolver is not None:
                found = self._ptr.get(text)
                if found is None:
                    if len(self._pending) < self.config.max_clients:
                        self._pending.add(text)
                else:
                    name = found[0]
        groups = frozenset(
            g.name
            for g in self._groups
            if (name is not None and name in g.names)
            or (addr is not None and any(addr in n for n in g.networks))
        )
        rec = ClientRecord(name, groups, groups | {name} if name else groups)
        if rec == UNKNOWN:
            rec = UNKNOWN
        if len(self.records) >= self.config.max_clients:
            self.records = {}
        self.records[key] = rec
        return rec

    # --- background ---

    def refresh(self) -> bool:
        """Re-read the sources whose modification time changed; True if any did (the
        records are then rebuilt as queries arrive)."""
        c = self.config
        changed = False
        hosts: dict[str, str] = {}
        macs: dict[str, str] = {}
        for path in c.leases:
            text, fresh = self._read(path)
            changed |= fresh
            h, m = parse_leases(text)
            hosts.update(h)
            macs.update(m)
        for path in c.files:  # files win over leases: they are written by hand
            text, fresh = self._read(path)
            changed |= fresh
            hosts.update(parse_hosts(text))
        neighbours: dict[str, str] = {}  # none when not read (a reload may turn them off)
        if c.neighbours is not None and (self._by_mac or c.leases):
            neighbours = parse_neighbours(self._read(c.neighbours, always=True)[0])
            if c.netlink:
                neighbours.update(self._netlink)
            neighbours = dict(itertools.islice(neighbours.items(), c.max_clients))
        changed |= neighbours != self._neighbours
        now = time.monotonic()
        for addr, (_, expires) in self._ptr.items():
            if expires <= now:
                self._pending.add(addr)
        if changed:
            limit = c.max_clients
            self._hosts = dict(list(hosts.items())[:limit])
            self._lease_macs = dict(list(macs.items())[:limit])
            self._neighbours = neighbours
            self._forget()
        return changed

    def _read(self, path: Path, always: bool = False) -> tuple[str, bool]:
        """The text of ``path`` and whether it changed since the last read ("" if unreadable;
        /proc files have no useful mtime, so ``always`` reads them every time)."""
        seen = stamp(path)
        old = self._files.get(path)
        if old is not None and seen is not None and old[0] == seen and not always:
            return old[1], False
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            if old is None or old[0] is not None:  # warn once, until it is readable again
                log.warning("clients: cannot read %s: %s", path, exc.strerror)
            self._files[path] = (None, "")
            return "", False
        self._files[path] = (seen, text)
        return text, old is None or old[1] != text

    async def run(self) -> None:
        """Watch the sources and resolve names by PTR, for the life of the server."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            nursery.start_soon(self._reverse)

    async def update(self) -> bool:
        """`refresh`, the kernel's IPv6 neighbour table read first when ``neighbours =
        "kernel"`` and names by MAC are wanted (in a thread: the dump is a blocking read).
        Where netlink is missing or refused: one warning, and the ARP table alone."""
        c = self.config
        table: dict[str, str] = {}
        if c.netlink and (self._by_mac or c.leases):
            try:
                table = await trio.to_thread.run_sync(netlink_neighbours, c.max_clients)
            except OSError as exc:
                if not self._netlink_failed:  # warn once, until a dump works again
                    log.warning(
                        "clients: cannot read the IPv6 neighbour table (rtnetlink): %s;"
                        " IPv6 clients are not named by MAC",
                        exc.strerror or exc,
                    )
                self._netlink_failed = True
            else:
                self._netlink_failed = False
        self._netlink = table
        return self.refresh()

    async def _watch(self) -> None:
        while True:
            await self.update()
            await trio.sleep(self.config.refresh)

    async def _reverse(self) -> None:
        while True:
            await trio.sleep(PTR_POLL)
            resolver = self.config.ptr_resolver
            if resolver is None or not self._pending:
                continue
            learnt = False
            for addr in list(self._pending):
                self._pending.discard(addr)
                name = await ptr_lookup(addr, resolver)
                old = self._ptr.get(addr)
                if len(self._ptr) >= self.config.max_clients and old is None:
                    self._ptr.clear()
                self._ptr[addr] = (name, time.monotonic() + self.config.ptr_ttl)
                learnt |= old is None or old[0] != name
            if learnt:
                self._forget()


async def ptr_lookup(addr: str, resolver: tuple[str, int]) -> str | None:
    """The host name a PTR lookup of ``addr`` gives (without the trailing dot), or None
    (no answer, an error, a timeout)."""
    try:
        qname = dns.reversename.from_address(addr)
    except (dns.exception.SyntaxError, ValueError):
        return None
    query = dns.message.make_query(qname, dns.rdatatype.PTR)
    host, port = resolver
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    with trio.socket.socket(family, trio.socket.SOCK_DGRAM) as sock:
        with trio.move_on_after(PTR_TIMEOUT):
            try:
                await sock.connect((host, port))
                await sock.send(query.to_wire())
                while True:
                    data = await sock.recv(65535)
                    try:
                        reply = dns.message.from_wire(data)
                    except dns.exception.DNSException:
                        continue
                    if reply.id != query.id:
                        continue
                    for rrset in reply.answer:
                        if rrset.rdtype == dns.rdatatype.PTR and rrset.name == qname:
                            return str(rrset[0].target.to_text(omit_final_dot=True))
                    return None
            except OSError as exc:
                log.debug(
                    "clients: PTR lookup of %s via %s failed: %s", addr, hostport(host, port), exc
                )
    return None
