"""Coverage-guided fuzzing (atheris) of the wire view, the chain and reply fitting.

Run on demand, for as long as you like::

    .venv/bin/python tests/fuzz/fuzz_query.py -max_total_time=600 [corpus_dir]

The first input byte picks a target: a client query through ``Server.handle`` over UDP
or TCP (parse, ACL, chain, finalize), or upstream bytes through ``matches``,
``strip_opt`` and ``finalize`` (what ``forward`` does with an answer). Any exception, or
a reply that is malformed, has the wrong ID, or does not fit UDP, is a crash. The test
``tests/fuzz/test_atheris.py`` runs this for a few seconds in the normal suite.
"""

from __future__ import annotations

import struct
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["dnsproxy"]):
    from dnsproxy import wire
    from dnsproxy.reply import Reply, finalize
    from dnsproxy.server import Server
    from dnsproxy.testing import Answer, chain_of, make_query
    from dnsproxy.upstream import Request, matches


def _server() -> Server:
    path = Path(tempfile.mkdtemp(prefix="dnsproxy-fuzz-")) / "config.toml"
    path.write_text(
        '[server]\nlisten = ["127.0.0.1:0"]\n[[chain]]\nplugin = "forward"\n'
        'upstreams = ["127.0.0.1:9"]\n'
    )
    server = Server(path, handle_signals=False)
    server.chain = chain_of(
        [
            Answer(
                {"www.example.test": "192.0.2.1", "alias.example.test": ["CNAME www.example.test."]}
            )
        ]
    )
    return server


SERVER = _server()
QUERIES = {t: make_query("wWw.Example.test", transport=t) for t in ("udp", "tcp")}


def check_client_reply(data: bytes, out: bytes | None, transport: str) -> None:
    """Raise if ``out`` is not an acceptable answer to ``data``."""
    if out is None:
        return
    if len(data) < 12 or out[:2] != data[:2] or not out[2] & 0x80:
        raise AssertionError(f"bad reply header {out[:4].hex()} to {data[:4].hex()}")
    _, recs = wire.records(out)
    if transport == "udp":
        limit = 1232 if any(r.rtype == wire.OPT for r in recs) else 512
        if len(out) > limit:
            raise AssertionError(f"UDP reply of {len(out)} bytes over {limit}")


def fuzz_client(data: bytes, transport: str) -> None:
    sent: list[bytes | None] = []
    SERVER.handle(data, ("127.0.0.1", 5000), transport, sent.append)
    if len(sent) != 1:
        raise AssertionError(f"send called {len(sent)} times")
    check_client_reply(data, sent[0], transport)


def fuzz_upstream(data: bytes, transport: str) -> None:
    q = QUERIES[transport]
    if len(data) < 10:
        return
    flags, an, ns, ar = struct.unpack_from("!HHHH", data)
    reply = struct.pack("!HHHHHH", 7, (flags | 0x8000) & ~0x7800, 1, an & 7, ns & 7, ar & 7)
    reply += q.question + data[8:]
    if not matches(reply, 7, Request(q.question, q.key, q.qtype, q.qclass)):
        raise AssertionError("a reply with the right ID and question does not match")
    try:
        stripped, _, _ = wire.strip_opt(reply)
    except ValueError:
        return
    out = finalize(Reply(stripped), q, 1232)
    if out[12 : 12 + len(q.qname)] != q.qname:
        raise AssertionError("client's QNAME case not echoed")
    check_client_reply(q.data, out, transport)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target, body = data[0] % 4, data[1:]
    if target == 0:
        fuzz_client(body, "udp")
    elif target == 1:
        fuzz_client(body, "tcp")
    elif target == 2:
        fuzz_upstream(body, "udp")
    else:
        fuzz_upstream(body, "tcp")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
