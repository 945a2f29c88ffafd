"""Runner of the declarative conformance scenarios in ``scenarios/*.toml``.

The format follows the spirit of unbound's and Deckard's ``.rpl`` files: the upstream's
behaviour (a RANGE of canned answers) plus STEPs of query / expected answer / time
passes, so a conformance case is data, not code. A scenario file::

    description = "what RFC rule this checks"
    requires = ["cache"]                    # plugins it needs (skipped if missing)
    xfail = "why this fails today"          # a known gap: run as a strict xfail
    before = '''                             # steps before forward (TOML text)
    [[chain]]
    plugin = "cache"
    '''
    server = 'tcp_idle_timeout = 2.0'       # extra [server] lines
    forward = 'timeout = 0.5'               # extra forward options

    [[upstream]]                            # fake upstream rules (see tests/fakeupstream.py)
    match = { qname = "www.example.test." }
    answer = ["{qname} 300 IN A 192.0.2.10"]

    [[step]]
    query = "www.example.test. A"           # or raw = "hex bytes" (ID 0x1234)
    transport = "udp"                       # udp | tcp
    edns = true                             # default true; do = true; cd = true; payload = 512
    [step.expect]
    rcode = "NOERROR"
    answer = ["www.example.test. 300 IN A 192.0.2.10"]  # TTL is an upper bound
    flags = ["RA"]                          # must be set; noflags = ["TC"] must be clear
    ede = [22]                              # Extended DNS Error codes, in order
    upstream_queries = 1                    # queries the upstream has seen so far
    upstream_queries_max = 3                # ... at most (RFC 9520 §3.1 retry bounds)
    within = 1.5                            # seconds the answer may take
    none = true                             # no reply at all (dropped)
    # Always: the reply's ID is the query's, and a reply with a question echoes the
    # query's question section byte for byte (the QNAME's case included).

    [[step]]
    time_passes = 1.2                       # real seconds (the proxy runs on the real clock)

    [[step]]
    upstream = [ { rcode = "SERVFAIL" } ]   # replace the upstream's behaviour from here on

Scenarios without ``before``/``server``/``forward`` share one proxy; the others start
their own.
"""

from __future__ import annotations

import time
import tomllib
from pathlib import Path
from typing import Any

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dnsproxy.plugins import BUILTIN

from tests.conformance.confkit import Proxy, forward_config, tcp_raw, udp_raw
from tests.fakeupstream import FakeUpstream

SCENARIOS = sorted((Path(__file__).parent / "scenarios").glob("*.toml"))


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


def _params() -> list[Any]:
    out = []
    for path in SCENARIOS:
        doc = _load(path)
        marks = []
        missing = [p for p in doc.get("requires", ()) if f"dnsproxy.plugins.{p}" not in BUILTIN]
        if missing:
            marks.append(pytest.mark.skip(reason=f"needs plugins {missing}"))
        if doc.get("xfail"):
            marks.append(pytest.mark.xfail(strict=True, reason=doc["xfail"]))
        out.append(pytest.param(path, id=path.stem, marks=marks))
    return out


def _query(step: dict[str, Any]) -> tuple[bytes, dns.message.Message | None]:
    if "raw" in step:
        return bytes.fromhex(step["raw"].replace(" ", "")), None
    name, _, rdtype = step["query"].partition(" ")
    q = dns.message.make_query(
        name,
        rdtype or "A",
        use_edns=0 if step.get("edns", True) else False,
        want_dnssec=step.get("do", False),
        payload=step.get("payload", 1232),
        options=[dns.edns.GenericOption(c, bytes.fromhex(d)) for c, d in step.get("options", [])],
    )
    if step.get("cd"):
        q.flags |= dns.flags.CD
    return q.to_wire(), q


def _exchange(addr: tuple[str, int], data: bytes, transport: str) -> bytes | None:
    if transport == "tcp":
        return tcp_raw(addr, len(data).to_bytes(2, "big") + data)
    return udp_raw(addr, data)


def _rr_lines(section: list[Any]) -> list[tuple[str, int, str]]:
    """(name type rdata, ttl, text) for every record, names lower-cased."""
    out = []
    for rrset in section:
        for rd in rrset:
            key = f"{rrset.name.to_text().lower()} {dns.rdatatype.to_text(rrset.rdtype)} {rd}"
            out.append((key, rrset.ttl, f"{rrset.name} {rrset.ttl} {rrset}"))
    return sorted(out)


def _expected_lines(lines: list[str]) -> list[tuple[str, int]]:
    out = []
    for line in lines:
        name, ttl, _cls, rdtype, rdata = line.split(None, 4)
        rrset = dns.rrset.from_text(name, int(ttl), "IN", rdtype, rdata)  # normalises rdata
        for rd in rrset:
            out.append((f"{rrset.name.to_text().lower()} {rdtype.upper()} {rd}", int(ttl)))
    return sorted(out)


def _question_end(data: bytes) -> int:
    """Where the first question of a message ends (its name uncompressed, at offset 12)."""
    i = 12
    while data[i]:
        i += 1 + data[i]
    return i + 5


def _check(where: str, expect: dict[str, Any], out: bytes | None, sent: bytes) -> None:
    if expect.get("none"):
        assert out is None, f"{where}: expected no reply"
        return
    assert out is not None, f"{where}: no reply"
    msg = dns.message.from_wire(out)
    assert msg.id == int.from_bytes(sent[:2], "big"), f"{where}: wrong ID"
    if msg.question:
        end = _question_end(sent)
        assert out[4:6] == b"\x00\x01" and out[12:end] == sent[12:end], (
            f"{where}: question not echoed byte for byte: {out[12:end]!r} for {sent[12:end]!r}"
        )
    if "rcode" in expect:
        got = dns.rcode.to_text(msg.rcode())
        assert got == expect["rcode"], f"{where}: rcode {got}"
    for flag in expect.get("flags", ()):
        assert msg.flags & dns.flags.from_text(flag), f"{where}: {flag} not set"
    for flag in expect.get("noflags", ()):
        assert not msg.flags & dns.flags.from_text(flag), f"{where}: {flag} set"
    for section in ("answer", "authority", "additional"):
        if section not in expect:
            continue
        got = _rr_lines(getattr(msg, section))
        want = _expected_lines(expect[section])
        assert [g[0] for g in got] == [w[0] for w in want], (
            f"{where}: {section} {[g[2] for g in got]}"
        )
        for (_, ttl, text), (_, max_ttl) in zip(got, want, strict=True):
            assert ttl <= max_ttl, f"{where}: TTL above {max_ttl}: {text}"
    if "ede" in expect:
        codes = [o.code for o in msg.options if o.otype == dns.edns.OptionType.EDE]
        assert codes == expect["ede"], f"{where}: EDE {codes}"
    if "edns" in expect:
        assert (msg.edns >= 0) == expect["edns"], f"{where}: OPT presence"


def run_scenario(doc: dict[str, Any], proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.set_rules(doc.get("upstream", []))
    for i, step in enumerate(doc.get("step", [])):
        where = f"step {i + 1}"
        if "time_passes" in step:
            time.sleep(float(step["time_passes"]))
            continue
        if "upstream" in step:
            upstream.rules = list(step["upstream"])
            if "query" not in step and "raw" not in step:
                continue
        data, _ = _query(step)
        start = time.monotonic()
        out = _exchange(proxy.addr, data, step.get("transport", "udp"))
        took = time.monotonic() - start
        expect = step.get("expect", {})
        _check(where, expect, out, data)
        if "within" in expect:
            assert took <= expect["within"], f"{where}: took {took:.2f} s"
        if "upstream_queries" in expect:
            n = len(upstream.seen)
            assert n == expect["upstream_queries"], f"{where}: upstream saw {n} queries"
        if "upstream_queries_max" in expect:
            n = len(upstream.seen)
            assert n <= expect["upstream_queries_max"], f"{where}: upstream saw {n} queries"


@pytest.mark.parametrize("path", _params())
def test_scenario(path: Path, shared_upstream: FakeUpstream, shared_proxy, make_proxy):
    doc = _load(path)
    if any(k in doc for k in ("before", "server", "forward")):
        config = forward_config(
            shared_upstream.addr,
            server=doc.get("server", ""),
            before=doc.get("before", ""),
            forward=doc.get("forward", ""),
        )
        proxy = make_proxy(config)
    else:
        proxy = shared_proxy
    run_scenario(doc, proxy, shared_upstream)
