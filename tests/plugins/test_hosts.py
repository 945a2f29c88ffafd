"""The hosts step: files and entries, wildcards, PTR, NODATA, reloads, errors."""

from __future__ import annotations

import logging
import os

import dns.message
import pytest
import trio

from dnsproxy.errors import ConfigError
from dnsproxy.testing import Answer, build_step, make_query, run_chain

HOSTS = """\
# a comment
127.0.0.1   localhost
::1         localhost ip6-localhost
192.0.2.10  www.example.org www   # trailing comment
2001:db8::10 www.example.org
192.0.2.10  web.example.org
fe80::1%eth0 link.example.org

not-an-ip   broken.example.org
192.0.2.11
192.0.2.12  bad..name.example.org
192.0.2.20  *.app.test
192.0.2.21  *.deep.app.test
192.0.2.22  exact.app.test
"""


@pytest.fixture
def hosts_file(tmp_path):
    path = tmp_path / "hosts"
    path.write_text(HOSTS)
    return path


def make(tmp_path, **table):
    table.setdefault("files", ["hosts"])
    return build_step("hosts", table, base_dir=tmp_path)


async def ask(step, name, rdtype="A"):
    upstream = Answer({"upstream.example.org": "198.51.100.1"})
    reply = await run_chain([step, upstream], make_query(name, rdtype))
    return reply, dns.message.from_wire(reply.wire)


def rdatas(msg):
    return sorted(rd.to_text() for rrset in msg.answer for rd in rrset)


@pytest.mark.parametrize(
    ("name", "rdtype", "expected"),
    [
        ("www.example.org", "A", ["192.0.2.10"]),
        ("WWW.Example.ORG", "AAAA", ["2001:db8::10"]),
        ("www", "A", ["192.0.2.10"]),
        ("localhost", "AAAA", ["::1"]),
        ("link.example.org", "AAAA", ["fe80::1"]),
        ("a.app.test", "A", ["192.0.2.20"]),
        ("a.b.app.test", "A", ["192.0.2.20"]),
        ("x.deep.app.test", "A", ["192.0.2.21"]),
        ("exact.app.test", "A", ["192.0.2.22"]),
        ("10.2.0.192.in-addr.arpa", "PTR", ["web.example.org.", "www.", "www.example.org."]),
        (
            "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
            "PTR",
            ["www.example.org."],
        ),
    ],
)
async def test_answers(tmp_path, hosts_file, name, rdtype, expected):
    reply, msg = await ask(make(tmp_path), name, rdtype)
    assert msg.rcode() == 0 and rdatas(msg) == expected
    assert msg.flags & dns.flags.AA
    assert all(rrset.ttl == 3600 for rrset in msg.answer)
    assert reply.source == "hosts"


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("www.example.org", "MX"),
        ("web.example.org", "AAAA"),
        ("a.app.test", "TXT"),
        ("10.2.0.192.in-addr.arpa", "A"),
    ],
)
async def test_known_names_get_nodata_never_upstream(tmp_path, hosts_file, name, rdtype):
    reply, msg = await ask(make(tmp_path), name, rdtype)
    assert msg.rcode() == 0 and msg.answer == [] and reply.source == "hosts"


async def test_trace_says_why(tmp_path, hosts_file):
    q = make_query("www.example.org", "MX")
    q.trace = []
    await run_chain([make(tmp_path)], q)
    assert q.trace[0].endswith("(hosts): known name, 0 record(s)")
    assert q.notes == {"rule": "hosts"}


async def test_unknown_names_pass_on(tmp_path, hosts_file):
    step = make(tmp_path)
    for name in ("upstream.example.org", "app.test", "example.org"):
        reply, _ = await ask(step, name)
        assert reply.source == "answer"


async def test_broken_lines_are_logged_with_file_and_line(tmp_path, hosts_file, caplog):
    caplog.set_level(logging.WARNING)
    step = make(tmp_path)
    assert step.table.bad_lines == 3
    path = str(hosts_file)
    assert f"{path}:9: 'not-an-ip' is not an IP address; line skipped" in caplog.text
    assert f"{path}:10: no names after 192.0.2.11" in caplog.text
    assert f"{path}:11: 'bad..name.example.org' is not a domain name" in caplog.text
    lines = await step.check()
    assert lines[0].startswith("7 names, 2 wildcards") and "3 bad lines" in lines[0]


async def test_entries_and_ttl(tmp_path):
    step = build_step(
        "hosts", {"entries": ["10.0.0.5 api.dev.test", "10.0.0.6 api.dev.test"], "ttl": 5}
    )
    _, msg = await ask(step, "api.dev.test")
    assert rdatas(msg) == ["10.0.0.5", "10.0.0.6"] and msg.answer[0].ttl == 5


async def test_file_change_is_reloaded(tmp_path, hosts_file, nursery):
    step = make(tmp_path, watch="0.1s")
    nursery.start_soon(step.run)
    hosts_file.write_text("192.0.2.99 www.example.org\n")
    os.utime(hosts_file, ns=(1, 10**18))
    with trio.fail_after(10):
        while rdatas((await ask(step, "www.example.org"))[1]) != ["192.0.2.99"]:
            await trio.sleep(0.02)
    reply, _ = await ask(step, "web.example.org")
    assert reply.source == "answer"
    assert step.reloads == 1


async def test_unreadable_file_keeps_previous_table(tmp_path, hosts_file, nursery, caplog):
    step = make(tmp_path, watch="0.1s")
    nursery.start_soon(step.run)
    hosts_file.unlink()
    with trio.fail_after(10):
        while "keeping the previous table" not in caplog.text:
            await trio.sleep(0.02)
    _, msg = await ask(step, "www.example.org")
    assert rdatas(msg) == ["192.0.2.10"]
    metrics = {m.name: m.value for m in step.metrics()}
    assert metrics["load_failures"] >= 1 and metrics["reloads"] == 0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"files": ["missing"]}, r"files: .*missing: No such file"),
        ({"files": [], "entries": ["10.0.0.1 *.x*.test"]}, "entries: 1: .*only a leading"),
        ({"files": [], "entries": ["nonsense"]}, "entries: 1: 'nonsense' is not an IP"),
        ({"files": [], "entries": ["10.0.0.1 ."]}, "entries: 1: '.': the root is not"),
        ({"files": []}, "needs 'files' or 'entries'"),
        ({"files": ["hosts"], "max_names": 3}, "files: more than max_names = 3"),
        ({"files": ["hosts"], "max_size": 100}, r"files: .*hosts: \d+ bytes, over max_size = 100"),
        ({"files": ["hosts"], "ttl": "1h"}, "option 'ttl' must be an integer"),
        ({"files": ["hosts"], "watch": "soon"}, "option 'watch'"),
        ({"fils": ["hosts"]}, "did you mean 'files'"),
    ],
)
def test_config_errors(tmp_path, hosts_file, table, message):
    with pytest.raises(ConfigError, match=message):
        build_step("hosts", table, base_dir=tmp_path)


def test_metrics(tmp_path, hosts_file):
    step = make(tmp_path)
    step.query(make_query("www.example.org"))
    values = {m.name: m.value for m in step.metrics()}
    assert values == {"entries": 9, "answers": 1, "reloads": 0, "load_failures": 0}
