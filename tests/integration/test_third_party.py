"""A third-party plugin, packaged with an entry point, installed and run in a chain."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "quiet-hours"


def install(example: Path, target: Path) -> Path:
    """``example`` installed into ``target``, a directory of its own, as pip would for a user;
    asserts the entry point made it."""
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(target), str(example)],
        check=True, timeout=180, capture_output=True,
    )  # fmt: skip
    name = tomllib.loads((example / "pyproject.toml").read_text())["project"]["name"]
    dist = name.replace("-", "_")  # the wheel's normalised name
    (points,) = target.glob(f"{dist}-*.dist-info/entry_points.txt")
    assert "[dnsproxy]" in points.read_text().splitlines(), points.read_text()
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return install(EXAMPLE, tmp_path_factory.mktemp("site"))


def test_entry_point_plugin_runs_in_a_chain(site, nsd, make_proxy):
    proxy = make_proxy(
        f"""
[server]
listen = ["127.0.0.1:{{port}}"]
[[chain]]
plugin = "quiet_hours"
domains = ["games.example.test"]
start = "00:00"
end = "24:00"
[[chain]]
plugin = "forward"
upstreams = ["{nsd.addr}"]
""",
        env={"PYTHONPATH": str(site)},
    )
    q = dns.message.make_query("www.games.example.test", "A", use_edns=0)
    r = dns.query.udp(q, "127.0.0.1", port=proxy.port, timeout=3)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert [(o.code, o.text) for o in r.options] == [(17, "quiet hours")]
    r = dns.query.udp(
        dns.message.make_query("www.example.test", "A"), "127.0.0.1", port=proxy.port, timeout=3
    )
    assert r.answer[0][0].address == "192.0.2.10"


def test_without_the_package_the_plugin_is_unknown(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('[[chain]]\nplugin = "quiet_hours"\ndomains = ["x.example"]\n')
    out = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1
    assert "chain[0]: plugin: unknown plugin 'quiet_hours'" in out.stderr


@pytest.mark.parametrize(
    ("start", "end", "now", "quiet"),
    [
        ("21:30", "07:00", 22 * 60, True),
        ("21:30", "07:00", 6 * 60, True),
        ("21:30", "07:00", 12 * 60, False),
        ("09:00", "17:00", 9 * 60, True),
        ("09:00", "17:00", 17 * 60, False),
    ],
)
def test_quiet_window(site, start, end, now, quiet, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    from dnsproxy_quiet_hours import QuietHours

    from dnsproxy import options
    from dnsproxy.testing import make_setup

    opts = options.build(
        QuietHours.Options, {"domains": ["games.example.org"], "start": start, "end": end}, "t"
    )
    step = QuietHours(opts, make_setup("quiet_hours"), clock=lambda: now)
    assert step.quiet() is quiet
