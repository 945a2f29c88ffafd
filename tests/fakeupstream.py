"""A scriptable fake upstream DNS server (UDP and TCP on one port), for conformance tests.

Each test sets the server's behaviour with a list of rules (plain dicts, so a JSON script
file works as well as Python); the first rule whose ``match`` fits a query decides the
reply. Every query received is recorded (ID, source address and port, transport, QNAME in
the case it arrived, type, EDNS presence, version, DO, options), which is what the
RFC 5452 and hop-by-hop assertions check.

Rule keys (all optional):

``match``
    ``{"qname": "www.example.test." | "*.example.test.", "qtype": "A", "transport":
    "udp"|"tcp", "edns": bool, "cd": bool, "do": bool}``; absent keys match anything.
``times``
    Apply the rule to this many queries only, then fall through to later rules.
``rcode``, ``flags``, ``noflags``
    Response rcode ("SERVFAIL"), extra header flags (["AA", "TC"]) and flags to clear
    (["RA"]: an authoritative server).
``answer``, ``authority``, ``additional``
    Zone-format lines; ``{qname}`` is replaced by the query name as received.
``giant``
    Answer with this many A records for the query name (a huge RRset).
``cname_loop``
    Answer with a two-CNAME cycle (qname → loop.invalid. → qname).
``delay``
    Seconds to wait before replying. ``drop``: never reply.
``raw``
    Hex of the bytes to send instead of a DNS message (``raw_id``: patch in the ID first).
``id_delta``
    XOR the reply ID with this (a wrong ID). ``qname_reply``: put this name in the
    reply's question instead (a wrong question). ``qr0``: clear QR in the reply.
``from_other_port``
    Send the reply from another socket (a wrong source port; UDP only).
``spoof``
    Before the real reply, send this many replies with wrong IDs and the answer
    ``spoof_answer`` (a blind spoofing flood from the right address and port).
``duplicates``
    A list of further rules whose replies are sent after the first (duplicate answers).
``formerr_edns``
    Answer FORMERR to any query carrying OPT (an EDNS-intolerant server).
``tcp_close_mid``
    Over TCP, send the length prefix and half the message, then close.
``udp_tc``
    Over UDP, answer with TC=1 and empty sections (the full answer over TCP).

A query no rule matches gets a synthesised answer (A 192.0.2.1, AAAA 2001:db8::1, other
types NODATA) with TTL 300. Over UDP a reply larger than the query's payload size (512
without EDNS) is truncated with TC=1, as a real server does.

Use it in-process (``FakeUpstream`` in a Trio nursery, or ``start_thread()`` for
synchronous tests) or as a subprocess::

    python tests/fakeupstream.py --port 5300 --script rules.json --record queries.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import trio

Rule = dict[str, Any]


@attrs.define
class Seen:
    """One query as the fake upstream received it."""

    id: int
    host: str
    port: int
    transport: str
    qname: str  # as received, case preserved
    qtype: int
    edns: int  # -1 without OPT, else the EDNS version
    do: bool
    flags: int
    payload: int
    options: list[tuple[int, str]]  # (code, hex data)
    at: float

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))


def _matches(rule: Rule, msg: dns.message.Message, transport: str) -> bool:
    match = rule.get("match") or {}
    q = msg.question[0]
    pattern = match.get("qname")
    if pattern is not None:
        name = q.name.to_text().lower()
        pattern = pattern.lower().rstrip(".") + "."
        if pattern.startswith("*."):
            if not name.endswith(pattern[1:]):
                return False
        elif name != pattern:
            return False
    qtype = match.get("qtype")
    if qtype is not None and dns.rdatatype.from_text(qtype) != q.rdtype:
        return False
    if match.get("transport", transport) != transport:
        return False
    if match.get("cd", bool(msg.flags & dns.flags.CD)) != bool(msg.flags & dns.flags.CD):
        return False
    if match.get("do", bool(msg.ednsflags & dns.flags.DO)) != bool(msg.ednsflags & dns.flags.DO):
        return False
    return match.get("edns", msg.edns >= 0) == (msg.edns >= 0)


def _rrsets(lines: Iterable[str], qname: str) -> list[dns.rrset.RRset]:
    out: dict[tuple[str, int], dns.rrset.RRset] = {}
    for line in lines:
        owner, ttl, rdclass, rdtype, rdata = line.replace("{qname}", qname).split(None, 4)
        rrset = dns.rrset.from_text(owner, int(ttl), rdclass, rdtype, rdata)
        key = (rrset.name.to_text().lower(), rrset.rdtype)
        if key in out:
            out[key].union_update(rrset)
        else:
            out[key] = rrset
    return list(out.values())


def _synth(msg: dns.message.Message, resp: dns.message.Message) -> None:
    q = msg.question[0]
    data = {dns.rdatatype.A: "192.0.2.1", dns.rdatatype.AAAA: "2001:db8::1"}.get(q.rdtype)
    if data is not None:
        resp.answer.append(dns.rrset.from_text(q.name, 300, q.rdclass, q.rdtype, data))


def _fast_synth(msg: dns.message.Message) -> bytes:
    """`_synth` without dnspython's renderer: the default answer is the hot path of the
    load and statistics tests."""
    q = msg.question[0]
    question = q.name.to_wire() + struct.pack("!HH", q.rdtype, q.rdclass)
    rdata = {dns.rdatatype.A: b"\xc0\x00\x02\x01", dns.rdatatype.AAAA: _V6}.get(q.rdtype)
    flags = 0x8080 | (msg.flags & 0x0110)
    opt = b""
    if msg.edns >= 0:
        opt = b"\x00" + struct.pack("!HHIH", 41, 1232, msg.ednsflags & 0x8000, 0)
    header = struct.pack("!HHHHHH", msg.id, flags, 1, int(rdata is not None), 0, int(bool(opt)))
    answer = b""
    if rdata is not None:
        answer = b"\xc0\x0c" + struct.pack("!HHIH", q.rdtype, q.rdclass, 300, len(rdata)) + rdata
    return header + question + answer + opt


_V6 = bytes.fromhex("20010db8000000000000000000000001")


def build_reply(rule: Rule | None, msg: dns.message.Message, transport: str) -> bytes:
    """The wire reply ``rule`` gives to ``msg`` (before ID/port games)."""
    q = msg.question[0]
    qname = q.name.to_text()
    resp = dns.message.make_response(msg)
    resp.flags |= dns.flags.RA  # a recursive resolver, as a forwarder's upstream is
    if rule is None:
        _synth(msg, resp)
        return _fit(resp, msg, transport)
    if rule.get("formerr_edns") and msg.edns >= 0:
        resp = dns.message.make_response(msg)
        resp.use_edns(False)
        resp.set_rcode(dns.rcode.FORMERR)
        return resp.to_wire()
    if "rcode" in rule:
        resp.set_rcode(dns.rcode.from_text(rule["rcode"]))
    for flag in rule.get("flags", ()):
        resp.flags |= dns.flags.from_text(flag)
    for flag in rule.get("noflags", ()):
        resp.flags &= ~dns.flags.from_text(flag)
    resp.answer.extend(_rrsets(rule.get("answer", ()), qname))
    resp.authority.extend(_rrsets(rule.get("authority", ()), qname))
    resp.additional.extend(_rrsets(rule.get("additional", ()), qname))
    if rule.get("giant"):
        rrset = dns.rrset.RRset(q.name, dns.rdataclass.IN, dns.rdatatype.A)
        for i in range(int(rule["giant"])):
            rrset.add(
                dns.rdata.from_text("IN", "A", f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"),
                300,
            )
        resp.answer.append(rrset)
    if rule.get("cname_loop"):
        other = dns.name.from_text("loop.invalid.")
        resp.answer.append(dns.rrset.from_text(q.name, 300, "IN", "CNAME", other.to_text()))
        resp.answer.append(dns.rrset.from_text(other, 300, "IN", "CNAME", qname))
    if not any(k in rule for k in ("rcode", "answer", "authority", "giant", "cname_loop")):
        _synth(msg, resp)
    if rule.get("qname_reply"):
        resp.question = [
            dns.rrset.RRset(dns.name.from_text(rule["qname_reply"]), q.rdclass, q.rdtype)
        ]
    if rule.get("qr0"):
        resp.flags &= ~dns.flags.QR
    if rule.get("udp_tc") and transport == "udp":
        resp.answer, resp.authority, resp.additional = [], [], []
        resp.flags |= dns.flags.TC
    return _fit(resp, msg, transport)


def _fit(resp: dns.message.Message, msg: dns.message.Message, transport: str) -> bytes:
    data = resp.to_wire(max_size=65535)
    limit = 65535 if transport == "tcp" else (max(512, msg.payload) if msg.edns >= 0 else 512)
    if len(data) <= limit:
        return data
    resp.answer, resp.authority, resp.additional = [], [], []
    resp.flags |= dns.flags.TC
    return resp.to_wire()


class FakeUpstream:
    """The fake server: set ``rules``, read ``seen``; serve with ``run`` or ``start_thread``."""

    def __init__(
        self,
        rules: list[Rule] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        record: Callable[[Seen], None] | None = None,
    ) -> None:
        self.rules: list[Rule] = list(rules or ())
        self.host = host
        self.port = port
        self.seen: list[Seen] = []
        self.record = record
        self.used: dict[int, int] = {}  # answers given by each rule with "times", by index
        self._udp: trio.socket.SocketType | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    def set_rules(self, rules: list[Rule]) -> None:
        """Replace the behaviour and forget the queries seen so far."""
        self.used = {}
        self.rules = list(rules)
        self.seen.clear()

    def _pick(self, msg: dns.message.Message, transport: str) -> Rule | None:
        for i, rule in enumerate(self.rules):
            if not _matches(rule, msg, transport):
                continue
            times = rule.get("times")
            if times is not None:
                if self.used.get(i, 0) >= times:
                    continue
                self.used[i] = self.used.get(i, 0) + 1
            return rule
        return None

    def _note(self, msg: dns.message.Message, peer: tuple[str, int], transport: str) -> None:
        q = msg.question[0]
        seen = Seen(
            id=msg.id,
            host=peer[0],
            port=peer[1],
            transport=transport,
            qname=q.name.to_text(),
            qtype=int(q.rdtype),
            edns=msg.edns,
            do=bool(msg.ednsflags & dns.flags.DO),
            flags=int(msg.flags),
            payload=msg.payload if msg.edns >= 0 else 0,
            options=[(o.otype, o.to_wire().hex()) for o in msg.options],
            at=time.monotonic(),
        )
        self.seen.append(seen)
        if self.record is not None:
            self.record(seen)

    def _parse(self, data: bytes, peer: tuple[str, int], transport: str) -> Any:
        try:
            msg = dns.message.from_wire(data, ignore_trailing=True)
        except (dns.exception.DNSException, ValueError):
            return None
        if len(msg.question) != 1:
            return None
        self._note(msg, peer, transport)
        return msg

    def replies(self, msg: dns.message.Message, transport: str) -> tuple[Rule | None, list[bytes]]:
        """The rule for ``msg`` and the messages it sends, in order."""
        rule = self._pick(msg, transport)
        if rule is None:
            return None, [_fast_synth(msg)]
        out = []
        for r in [rule, *((rule or {}).get("duplicates", ()))]:
            if r is not None and r.get("raw") is not None:
                data = bytearray(bytes.fromhex(r["raw"]))
                if r.get("raw_id") and len(data) >= 2:
                    struct.pack_into("!H", data, 0, msg.id)
                out.append(bytes(data))
                continue
            data = bytearray(build_reply(r, msg, transport))
            struct.pack_into("!H", data, 0, msg.id ^ int((r or {}).get("id_delta", 0)))
            out.append(bytes(data))
        return rule, out

    async def _udp_reply(self, data: bytes, peer: tuple[str, int]) -> None:
        msg = self._parse(data, peer, "udp")
        if msg is None:
            return
        rule, out = self.replies(msg, "udp")
        rule = rule or {}
        if rule.get("delay"):
            await trio.sleep(float(rule["delay"]))
        if rule.get("drop"):
            return
        assert self._udp is not None
        if rule.get("spoof"):
            bogus = bytearray(
                build_reply(
                    {"answer": [rule.get("spoof_answer", "{qname} 300 IN A 6.6.6.6")]}, msg, "udp"
                )
            )
            for i in range(int(rule["spoof"])):
                fake = (msg.id + 1 + i) % 65536
                if fake == msg.id:
                    continue
                struct.pack_into("!H", bogus, 0, fake)
                with contextlib.suppress(OSError):
                    await self._udp.sendto(bytes(bogus), peer)
                if i % 32 == 31:
                    await trio.sleep(0.001)  # paced so the target's socket buffer keeps up
        if rule.get("from_other_port"):
            with trio.socket.socket(self._udp.family, socket.SOCK_DGRAM) as other:
                await other.bind((self.host, 0))
                for item in out:
                    await other.sendto(item, peer)
            return
        for item in out:
            with contextlib.suppress(OSError):
                await self._udp.sendto(item, peer)

    async def _serve_udp(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        while True:
            data, peer = await sock.recvfrom(65535)
            nursery.start_soon(self._udp_reply, data, peer[:2])

    async def _tcp_conn(self, stream: trio.SocketStream) -> None:
        """Frames in, answers out (pipelined); a peer going away just ends the connection."""
        peer = stream.socket.getpeername()[:2]
        lock = trio.Lock()
        gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)

        async def answer(data: bytes, nursery: trio.Nursery) -> None:
            msg = self._parse(data, peer, "tcp")
            if msg is None:
                return
            rule, out = self.replies(msg, "tcp")
            rule = rule or {}
            if rule.get("delay"):
                await trio.sleep(float(rule["delay"]))
            if rule.get("drop"):
                return
            try:
                async with lock:
                    for item in out:
                        frame = struct.pack("!H", len(item)) + item
                        if rule.get("tcp_close_mid"):
                            await stream.send_all(frame[: max(3, len(frame) // 2)])
                            nursery.cancel_scope.cancel()  # closes the connection below
                            return
                        await stream.send_all(frame)
            except gone:
                nursery.cancel_scope.cancel()

        buf = bytearray()
        async with stream, trio.open_nursery() as nursery:
            while True:
                while len(buf) < 2 or len(buf) < 2 + ((buf[0] << 8) | buf[1]):
                    try:
                        chunk = await stream.receive_some(65536)
                    except gone:
                        chunk = b""
                    if not chunk:
                        return
                    buf += chunk
                size = (buf[0] << 8) | buf[1]
                frame = bytes(buf[2 : 2 + size])
                del buf[: 2 + size]
                nursery.start_soon(answer, frame, nursery)

    async def _bind(self) -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
        """UDP and TCP sockets on one port. With port 0, a free UDP port can still be the
        local port of some TCP connection, so try again until both bind."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50 if self.port == 0 else 1):
            udp = trio.socket.socket(family, socket.SOCK_DGRAM)
            # Room for a burst of queries while this thread waits for the test process's
            # turn on a loaded CPU: the default buffer (~200 queries) overflowed in floods.
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            tcp = trio.socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                await udp.bind((self.host, self.port))
                await tcp.bind((self.host, udp.getsockname()[1]))
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue
            self.port = udp.getsockname()[1]
            tcp.listen(128)
            return udp, tcp
        raise OSError(f"no port free for both UDP and TCP on {self.host}")

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve UDP and TCP until cancelled; ``task_status.started`` gets the port."""
        udp, tcp = await self._bind()
        self._udp = udp
        with udp, tcp:
            async with trio.open_nursery() as nursery:
                self._cancel = nursery.cancel_scope
                nursery.start_soon(self._serve_udp, udp, nursery)
                nursery.start_soon(trio.serve_listeners, self._tcp_conn, [trio.SocketListener(tcp)])
                task_status.started(self.port)

    # --- a thread of its own, for synchronous tests --------------------------------------

    def start_thread(self) -> FakeUpstream:
        """Serve from a background thread running its own Trio loop; returns self."""
        ready = threading.Event()
        errors: list[BaseException] = []

        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as n:
                await n.start(self.run)
                ready.set()

        def target() -> None:
            try:
                trio.run(main)
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                ready.set()

        self._thread = threading.Thread(target=target, name="fakeupstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise TimeoutError("fake upstream did not start")
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """Stop a thread started with `start_thread` (the port is free afterwards)."""
        if self._thread is None:
            return
        assert self._token is not None and self._cancel is not None
        cancel = self._cancel
        trio.from_thread.run_sync(cancel.cancel, trio_token=self._token)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> FakeUpstream:
        return self.start_thread()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--script", type=Path, help="JSON file: a list of rules")
    parser.add_argument("--record", type=Path, help="append each query as a JSON line here")
    args = parser.parse_args(argv)
    rules = json.loads(args.script.read_text()) if args.script else []
    out = args.record.open("a", buffering=1) if args.record else None

    def record(seen: Seen) -> None:
        if out is not None:
            out.write(seen.to_json() + "\n")

    server = FakeUpstream(rules, args.host, args.port, record)

    async def serve() -> None:
        async with trio.open_nursery() as n:
            port = await n.start(server.run)
            print(f"listening on {args.host}:{port}", flush=True)

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        return 0
    finally:
        if out is not None:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
