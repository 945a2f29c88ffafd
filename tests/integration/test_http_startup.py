"""`dnsproxy run` with an [http] listener that cannot start: one line, exit 1, nothing served."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port

CONFIG = """\
{plugins}
[server]
listen = ["127.0.0.1:{dns}"]
{table}
[[chain]]
plugin = "forward"
upstreams = ["127.0.0.1:9"]
"""

FAILING_SERVICE = '''
"""A service that fails when it starts serving (it has no separate bind step)."""
import attrs
from dnsproxy.errors import ConfigError
from dnsproxy.hookspecs import hookimpl

@attrs.frozen
class Options:
    pass

class Failing:
    Options = Options

    def __init__(self, options, server):
        self.server = server

    async def run(self, *, task_status=None):
        raise ConfigError("config.toml: failing: cannot start: no such device")

@hookimpl
def dnsproxy_add_services(registry):
    registry.add_service("failing", Failing)
'''


def run(tmp_path: Path, table: str, plugins: str = "") -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.format(plugins=plugins, dns=free_port(), table=table))
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )


def test_busy_http_port_is_one_line_and_exit_1(tmp_path):
    """Issue 21 item 5: no traceback, and no DNS listener announced before the failure."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = run(tmp_path, f'[http]\nlisten = "127.0.0.1:{port}"\n')
    output = (out.stdout + out.stderr).strip().splitlines()
    assert out.returncode == 1, out
    assert output == [
        f"config.toml: http: listen: cannot bind 127.0.0.1:{port}: Address already in use"
    ]


def test_service_config_error_while_starting_is_one_line(tmp_path):
    """A ConfigError raised inside the server's nurseries is still one line and exit 1."""
    (tmp_path / "failing.py").write_text(FAILING_SERVICE)
    out = run(tmp_path, "[failing]\n", plugins='plugins = ["failing.py"]')
    assert out.returncode == 1, out
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "config.toml: failing: cannot start: no such device"
    )
    assert sum("config.toml: failing" in line for line in out.stderr.splitlines()) == 1
