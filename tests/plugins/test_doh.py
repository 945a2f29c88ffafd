"""The doh plugin's configuration, reply checks and Cache-Control handling (no network)."""

from __future__ import annotations

import sys
from pathlib import Path

import dns.message
import dns.rrset
import httpx
import pytest
from dnsproxy.plugins import doh

from dnsproxy.errors import ConfigError
from dnsproxy.testing import make_setup
from dnsproxy.upstream import UpstreamSpec


def make(table: dict | str, tmp_path: Path) -> doh.DohUpstream:
    return doh.make_doh(UpstreamSpec.parse(table), make_setup("forward", base_dir=tmp_path))


def test_ip_url_defaults(tmp_path):
    up = make("https://127.0.0.1/dns-query", tmp_path)
    assert up.name == "https://127.0.0.1:443/dns-query" and up.method == "post"
    assert up.urls == ["https://127.0.0.1:443/dns-query"]
    assert up.extensions == {"sni_hostname": "127.0.0.1"}
    assert up.headers["host"] == "127.0.0.1"


def test_host_name_goes_through_bootstrap_only(tmp_path):
    up = make(
        {
            "url": "https://dns.example:8443/q",
            "bootstrap": ["192.0.2.1", "2001:db8::1"],
            "method": "get",
        },
        tmp_path,
    )
    assert up.urls == ["https://192.0.2.1:8443/q", "https://[2001:db8::1]:8443/q"]
    assert up.headers["host"] == "dns.example:8443"
    assert up.extensions == {"sni_hostname": "dns.example"} and up.method == "get"
    assert make("https://[::1]", tmp_path).urls == ["https://[::1]:443/dns-query"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"url": "https://127.0.0.1", "methd": "get"}, "unknown option 'methd'"),
        ({"url": "https://127.0.0.1", "method": "put"}, "method"),
        ({"url": "https://127.0.0.1", "spki_pin": "x"}, "unknown option 'spki_pin'"),
        ({"url": "https://dns.example/dns-query"}, "needs bootstrap"),
        ({"url": "https://127.0.0.1", "ca_file": "nope.pem"}, "ca_file"),
        ({"url": "https://127.0.0.1", "max_inflight": 10**6}, "max_inflight"),
    ],
)
def test_config_errors(tmp_path, table, message):
    with pytest.raises(ConfigError, match=message) as info:
        make(table, tmp_path)
    assert all(line.startswith("test.toml: chain[0] (forward): ") for line in info.value.lines)


def test_missing_httpx_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(ConfigError, match=r"pip install dnsproxy\[doh\]"):
        make("https://127.0.0.1/dns-query", tmp_path)


def reply_with_ttls(*ttls: int) -> bytes:
    msg = dns.message.make_response(dns.message.make_query("www.example.test", "A", use_edns=0))
    for i, ttl in enumerate(ttls):
        msg.answer.append(dns.rrset.from_text(f"n{i}.example.test.", ttl, "IN", "A", "192.0.2.1"))
    return msg.to_wire()


def test_cap_ttls_lowers_only_longer_ttls_and_keeps_opt():
    data = reply_with_ttls(300, 20)
    capped = dns.message.from_wire(doh.cap_ttls(data, 60))
    assert sorted(rrset.ttl for rrset in capped.answer) == [20, 60]
    assert capped.edns == 0 and capped.payload == dns.message.from_wire(data).payload
    assert doh.cap_ttls(data, 3600) is data


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"cache-control": "no-transform"}, None),
        ({"cache-control": "public, max-age=120"}, 120),
        ({"cache-control": "max-age=120", "age": "100"}, 20),
        ({"cache-control": "max-age=120", "age": "500"}, 0),
        ({"cache-control": "s-maxage=5, max-age=77", "age": "junk"}, 77),
    ],
)
def test_freshness(headers, expected):
    assert doh.freshness(httpx.Headers(headers)) == expected
