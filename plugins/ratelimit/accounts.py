"""The RRL bookkeeping: credit accounts in a bounded LRU table, and response keys.

Kept apart from the step so the arithmetic can be read (and tested) on its own: the
BIND 9 credit model is in `Account.debit`, the query token bucket in `Table.take`.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import OrderedDict
from collections.abc import Callable, Hashable

from dnsproxy import wire
from dnsproxy.chain import client_address
from dnsproxy.wire import HEADER, SOA, U16, read_name


class Account:
    """Credit of one ⟨prefix, class, name⟩ (or one prefix's query bucket)."""

    __slots__ = ("balance", "logged", "slips", "time")

    def __init__(self, balance: float, time: float) -> None:
        self.balance = balance
        self.time = time
        self.slips = 0  # limited responses since the last slip, modulo ``slip``
        self.logged = False  # "now limiting" was logged; cleared on full recovery

    def debit(self, rate: int, floor: float, now: float) -> float:
        """RRL: earn ``rate``/s since last use (hold at most ``rate``), pay one, owe ≤
        ``floor``; the balance left."""
        balance = self.balance + (now - self.time) * rate
        self.time = now
        if balance >= rate:
            balance = rate
            self.logged = False  # fully recovered: a new episode gets a new log line
        balance -= 1
        self.balance = balance = balance if balance > floor else floor
        return balance


class Table:
    """Accounts in least-recently-used order, never more than ``size`` of them."""

    __slots__ = ("accounts", "epoch", "evictions", "size")

    def __init__(self, size: int) -> None:
        self.accounts: OrderedDict[Hashable, Account] = OrderedDict()
        self.size = size
        self.evictions = 0
        self.epoch = 0  # counts removals: an Account held from an older epoch may be gone

    def debit(self, key: Hashable, rate: int, floor: float, now: float) -> Account:
        """`Account.debit` the account of ``key`` (a new one holds ``rate``)."""
        accounts = self.accounts
        acct = accounts.get(key)
        if acct is None:
            acct = self._new(key, rate, now)
        else:
            accounts.move_to_end(key)
        acct.debit(rate, floor, now)
        return acct

    def clear(self) -> None:
        self.accounts.clear()
        self.epoch += 1

    def take(self, key: Hashable, rate: int, burst: int, now: float) -> Account | None:
        """Token bucket: take one token, or return the account when there is none."""
        acct = self.accounts.get(key)
        if acct is None:
            acct = self._new(key, burst, now)
        else:
            self.accounts.move_to_end(key)
        balance = acct.balance + (now - acct.time) * rate
        acct.time = now
        if balance >= burst:
            balance = burst
            acct.logged = False
        if balance >= 1:
            acct.balance = balance - 1
            return None
        acct.balance = balance
        return acct

    def _new(self, key: Hashable, initial: int, now: float) -> Account:
        accounts = self.accounts
        if len(accounts) >= self.size:
            accounts.popitem(last=False)
            self.evictions += 1
            self.epoch += 1
        acct = accounts[key] = Account(initial, now)
        return acct


def soa_zone(data: bytes, fallback: bytes) -> bytes:
    """The lower-cased owner of the first SOA in the authority section, else ``fallback``.

    A direct walk (no Record objects, stops at the SOA): this runs per NXDOMAIN.
    """
    try:
        _, _, qd, an, ns, _ = HEADER.unpack_from(data)
        if not ns:
            return fallback
        off = 12
        for _ in range(qd):
            off = wire.skip_name(data, off) + 4
        for _ in range(an):
            off = wire.skip_name(data, off) + 10
            off += U16.unpack_from(data, off - 2)[0]
        for _ in range(ns):
            owner = off
            off = wire.skip_name(data, off)
            if U16.unpack_from(data, off)[0] == SOA:
                return read_name(data, owner)
            off += 10 + U16.unpack_from(data, off + 8)[0]
    except (ValueError, struct.error):
        pass
    return fallback


def parent(key: bytes) -> bytes:
    """A wire name's parent (the root is its own)."""
    return key[key[0] + 1 :] if key[0] else key


def prefix_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, length: int) -> str:
    return str(ipaddress.ip_network((addr, length), strict=False))


def client_exempt(
    nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
) -> Callable[[str], ipaddress.IPv4Address | ipaddress.IPv6Address | None]:
    """Parse a client address (v4-mapped as v4); None if unparsable or in ``nets``."""

    def parse(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        addr = client_address(host)
        if addr is None or any(addr in n for n in nets):
            return None
        return addr

    return parse
