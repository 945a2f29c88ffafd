"""Config loading: table-driven cases of input, expected result or expected error line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from dnsproxy import config, options
from dnsproxy.errors import ConfigError
from dnsproxy.loader import build_chain, make_setup
from dnsproxy.loader import load as load_config
from dnsproxy.registry import build_registry, make_plugin_manager

REG = build_registry(make_plugin_manager())
FORWARD = '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:5300"]\n'


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return config.parse(path, config.read_toml(path), REG)


def errors(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    return exc.value.lines


def test_defaults(tmp_path):
    cfg = load(tmp_path, FORWARD)
    s = cfg.server
    assert [str(a) for a in s.listen] == ["127.0.0.1:5353"]
    assert ipaddress.ip_network("192.168.0.0/16") in s.allow
    assert (s.tcp_idle_timeout, s.max_tcp_connections, s.max_inflight, s.edns_udp_size) == (
        10.0,
        1024,
        4096,
        1232,
    )
    assert len(cfg.chain) == 1 and cfg.chain[0].plugin == "forward"


def test_bundled_config_is_valid():
    path = Path(__file__).resolve().parents[2] / "config.toml"
    cfg = config.parse(path, config.read_toml(path), REG)
    assert cfg.chain[-1].plugin == "forward"


def test_generic_keys(tmp_path):
    cfg = load(
        tmp_path,
        '[[chain]]\nplugin = "forward"\nzones = ["Corp.Example.ORG."]\nclients = ["10.0.0.0/8"]\n'
        'upstreams = ["127.0.0.1"]\n',
    )
    step = cfg.chain[0]
    assert step.zones == (b"\x04corp\x07example\x03org\x00",)
    assert step.clients == (ipaddress.ip_network("10.0.0.0/8"),)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            FORWARD.replace("upstreams", "upstrems"),
            "config.toml: chain[0] (forward): unknown option 'upstrems' (did you mean 'upstreams'?)",
        ),
        (
            '[[chain]]\nplugin = "forwrd"\n',
            "config.toml: chain[0]: plugin: unknown plugin 'forwrd' (did you mean 'forward'?)",
        ),
        ('[[chain]]\nupstreams = ["x"]\n', "config.toml: chain[0]: missing 'plugin'"),
        (
            FORWARD.replace("]\n", ']\ntimeout = "soon"\n', 1).replace(
                'plugin = "forward"\n', 'plugin = "forward"\n'
            ),
            "config.toml: chain[0] (forward): option 'timeout':",
        ),
        (
            '[server]\nlisten = ["127.0.0.1:99999"]\n' + FORWARD,
            "config.toml: server: option 'listen':",
        ),
        (
            '[server]\nmax_inflight = "many"\n' + FORWARD,
            "config.toml: server: option 'max_inflight' must be an integer",
        ),
        (
            "[server]\nedns_udp_size = 100\n" + FORWARD,
            "config.toml: server: option 'edns_udp_size'",
        ),
        (
            "[server]\nlisen = []\n" + FORWARD,
            "config.toml: server: unknown option 'lisen' (did you mean 'listen'?)",
        ),
        ("[sever]\n" + FORWARD, "config.toml: unknown table 'sever' (did you mean 'server'?)"),
        ("", "config.toml: chain: no steps"),
        (
            FORWARD.replace('plugin = "forward"', 'plugin = "forward"\nzones = [3]'),
            "config.toml: chain[0] (forward): zones:",
        ),
        (
            FORWARD.replace('plugin = "forward"', 'plugin = "forward"\nclients = ["nope"]'),
            "config.toml: chain[0] (forward): clients:",
        ),
        (
            FORWARD.replace('"127.0.0.1:5300"', "42"),
            "config.toml: chain[0] (forward): option 'upstreams'",
        ),
        (
            '[[chain]]\nplugin = "forward"\n',
            "config.toml: chain[0] (forward): missing required option 'upstreams'",
        ),
    ],
)
def test_errors_name_file_table_and_key(tmp_path, text, expected):
    lines = errors(tmp_path, text)
    assert any(line.startswith(expected) for line in lines), lines


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'tls_reload_interval = "0.4s"',
            "'tls_reload_interval': must be between 0.5 and 3600, got 0.4",
        ),
        (
            'tls_reload_interval = "2h"',
            "'tls_reload_interval': must be between 0.5 and 3600, got 7200.0",
        ),
        (
            'tls_handshake_timeout = "0.05s"',
            "'tls_handshake_timeout': must be between 0.1 and 60, got 0.05",
        ),
        (
            'tls_handshake_timeout = "61s"',
            "'tls_handshake_timeout': must be between 0.1 and 60, got 61.0",
        ),
        (
            "tls_handshake_timeout = true",
            """'tls_handshake_timeout': expected a duration such as 30, "30s" or "24h\"""",
        ),
        ('trusted_proxies = ["nope"]', "'trusted_proxies': 'nope' is not an IP network"),
        ("packet_cache_size = -1", "'packet_cache_size': must be between 0 and 10000000, got -1"),
        (
            "packet_cache_size = 10000001",
            "'packet_cache_size': must be between 0 and 10000000, got 10000001",
        ),
        ('packet_cache_size = "big"', "'packet_cache_size' must be an integer, got 'big'"),
        ('worker_records = "many"', "'worker_records' must be an integer, got 'many'"),
        ("timezone = 3", "'timezone' must be a string, got 3"),
    ],
)
def test_server_keys_out_of_range_or_of_the_wrong_type(tmp_path, text, expected):
    """Each [server] key the change added: its bounds and a wrong type, naming file,
    table and key."""
    assert errors(tmp_path, f"[server]\n{text}\n" + FORWARD) == [
        f"config.toml: server: option {expected}"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"5ms"', "must be between 0.01 s and 3600 s, got 0.005 s"),
        ('"3601s"', "must be between 0.01 s and 3600 s, got 3601 s"),
        ("[]", 'expected a duration such as 30, "30s" or "24h", got []'),
    ],
)
def test_step_deadline_out_of_range_or_of_the_wrong_type(tmp_path, value, expected):
    text = FORWARD.replace('plugin = "forward"', f'plugin = "forward"\ndeadline = {value}')
    assert errors(tmp_path, text) == [f"config.toml: chain[0] (forward): deadline: {expected}"]


def test_all_errors_are_reported_at_once(tmp_path):
    lines = errors(tmp_path, "[server]\nlisen = 1\n" + FORWARD.replace("upstreams", "upstrems"))
    assert len(lines) == 3  # unknown key, its suggestion target missing, unknown server key


def test_bad_toml_names_the_file(tmp_path):
    (tmp_path / "config.toml").write_text("[server\n")
    with pytest.raises(ConfigError) as exc:
        config.read_toml(tmp_path / "config.toml")
    assert "config.toml: not valid TOML" in exc.value.lines[0]


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        config.read_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (1.5, 1.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
    ],
)
def test_duration(text, seconds):
    assert options.duration(text) == seconds


@pytest.mark.parametrize("bad", ["soon", "-1s", True, -3, "1y"])
def test_bad_duration(bad):
    with pytest.raises((TypeError, ValueError)):
        options.duration(bad)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:53", "127.0.0.1", 53),
        ("[::1]:5353", "::1", 5353),
        ("::1", "::1", 53),
        ("10.0.0.1", "10.0.0.1", 53),
    ],
)
def test_address_parse(text, host, port):
    a = config.Address.parse(text)
    assert (a.host, a.port) == (host, port)


# --- listen mistakes `run` cannot bind (issue 21 item 6) ------------------------------

# with a password, so that a wildcard listen is allowed and only the clash is reported
HTTP_ON = (
    '[http]\nlisten = "{addr}"\npassword_hash = "scrypt$15$8$1$PQAGWDHUARXEWJA9mutGyw$AF_Wf7-aX'
    'MrykDowKvA2D8L6AbBdOgYh7mZhFhs7km0-K6OYQde-g04mCJZ3Wz2Ybfe-Tg-q2rnQBe4wonLNsA"\n'
)


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        (
            '["127.0.0.1:5353", "127.0.0.1:5353"]',
            "config.toml: server: option 'listen': 127.0.0.1:5353 is listed twice",
        ),
        (
            '["[::1]:5353", "[0::1]:5353"]',
            "config.toml: server: option 'listen': [::1]:5353 is listed twice",
        ),
        (
            '["127.0.0.1:53", "0.0.0.0:53"]',
            "config.toml: server: option 'listen': 127.0.0.1:53 and 0.0.0.0:53 overlap",
        ),
        (
            '["[::]:53", "[::1]:53"]',
            "config.toml: server: option 'listen': [::]:53 and [::1]:53 overlap",
        ),
        (
            '["::1:5353"]',
            "config.toml: server: option 'listen': '::1:5353': an IPv6 address with a port"
            " needs brackets: write [::1]:5353",
        ),
    ],
)
def test_listen_clashes_are_config_errors(tmp_path, listen, expected):
    lines = errors(tmp_path, f"[server]\nlisten = {listen}\n" + FORWARD)
    assert len(lines) == 1 and lines[0].startswith(expected), lines


@pytest.mark.parametrize(
    "listen",
    [
        '["127.0.0.1:53", "127.0.0.2:53", "0.0.0.0:54"]',
        '["0.0.0.0:53", "[::]:53"]',  # IPv6 sockets are V6ONLY: both families bind
        '["::1", "fe80::1", "[::1]:5353"]',  # unambiguous without brackets: port 53
        '["127.0.0.1:0", "127.0.0.1:0"]',  # any free port, twice
    ],
)
def test_listen_without_clashes_is_valid(tmp_path, listen):
    cfg = load(tmp_path, f"[server]\nlisten = {listen}\n" + FORWARD)
    assert cfg.server.listen


@pytest.mark.parametrize(
    ("dns_listen", "http_listen"),
    [("127.0.0.1:5353", "127.0.0.1:5353"), ("127.0.0.1:5353", "0.0.0.0:5353"),
     ("0.0.0.0:5353", "127.0.0.1:5353"), ("[::1]:5353", "[::]:5353")],
)  # fmt: skip
def test_http_listen_on_a_dns_port_is_an_error(tmp_path, dns_listen, http_listen):
    text = f'[server]\nlisten = ["{dns_listen}"]\n' + HTTP_ON.format(addr=http_listen) + FORWARD
    lines = errors(tmp_path, text)
    assert len(lines) == 1, lines
    assert lines[0].startswith("config.toml: http: option 'listen': "), lines
    assert "clashes with the DNS listener" in lines[0] and "TCP" in lines[0]


def test_http_listen_next_to_dns_is_valid(tmp_path):
    text = '[server]\nlisten = ["127.0.0.1:5353"]\n' + HTTP_ON.format(addr="127.0.0.1:9153")
    assert load(tmp_path, text + FORWARD).services[0].table == "http"


def test_an_upstream_scheme_or_step_no_plugin_provides_is_a_config_error(tmp_path):
    """What `Setup.make_upstream` and `Setup.make_step` (a step building another) raise:
    the step's prefix, the key, and what is known."""
    path = tmp_path / "config.toml"
    path.write_text('[[chain]]\nplugin = "forward"\nupstreams = ["foo://192.0.2.53"]\n')
    cfg, registry, _ = load_config(path)
    with pytest.raises(ConfigError) as exc:
        build_chain(cfg, registry)
    assert exc.value.lines == [
        "config.toml: chain[0] (forward): upstreams: foo://192.0.2.53: no plugin handles"
        " foo:// (known: https, tcp, tls, udp; is the dot/doh plugin installed?)"
    ]
    where = "config.toml: chain[0] (router)"
    setup = make_setup(registry, where=where, index=0, name="router", base_dir=tmp_path,
                       state_dir=tmp_path, server=cfg.server, log=None)  # fmt: skip
    assert setup.make_step is not None
    with pytest.raises(ConfigError) as exc:
        setup.make_step("nosuch", {}, setup)
    assert exc.value.lines == [f"{where}: no plugin registers the step 'nosuch'"]
    with pytest.raises(ConfigError) as exc:
        setup.make_step("forward", {"upstreams": 3}, setup)
    assert exc.value.lines[0].startswith(f"{where}: option 'upstreams'")
