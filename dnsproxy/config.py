"""Loading config.toml into frozen objects, with every error naming file, table and key.

Loading is all-or-nothing: `load` returns a complete `Config` or raises ConfigError with
one line per problem, so a bad reload never leaves half-applied state.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from dnsproxy import options, schedule
from dnsproxy.chain import DEADLINE, DEADLINE_RANGE
from dnsproxy.clients import ClientsConfig, networks_and_names, parse_config
from dnsproxy.errors import ConfigError
from dnsproxy.registry import Registry
from dnsproxy.wire import hostport, name_to_key

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_ALLOW = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
    "fe80::/10",
)


MAX_WORKERS = 256  # [server] workers
SCHEMES = {"tls": 853, "https": 443}  # encrypted listeners: scheme and default port
DOH_PATH = "/dns-query"


@attrs.frozen
class Address:
    """A listen or upstream address: host and port; an encrypted listener (``tls://``,
    ``https://``) also has its scheme and, for DoH, its path."""

    host: str
    port: int
    scheme: str = ""  # "" (plain UDP and TCP), "tls" (DoT) or "https" (DoH)
    path: str = ""  # the DoH path ("/dns-query")

    @classmethod
    def parse(cls, text: str, default_port: int = 53) -> Address:
        """Parse "127.0.0.1:5353", "[::1]:5353", "::1", "127.0.0.1" or "localhost:53"."""
        host, port = text, default_port
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"bad address {text!r}")
            if rest:
                port = int(rest[1:])
        elif text.count(":") == 1:
            host, _, p = text.partition(":")
            port = int(p)
        if not host or not 0 <= port <= 65535:
            raise ValueError(f"bad address {text!r}")
        return cls(host, port)

    @classmethod
    def parse_listen(cls, text: str) -> Address:
        """A ``[server] listen`` entry: an `Address`, ``tls://ADDR[:853]`` or
        ``https://ADDR[:443][/dns-query]``."""
        scheme, sep, rest = text.partition("://")
        if not sep:
            return cls.parse(text)
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} (tls:// or https://)")
        rest, slash, path = rest.partition("/")
        if slash and scheme != "https":
            raise ValueError("only https:// listeners take a path")
        path = "/" + path.rstrip("/") if slash else DOH_PATH
        if scheme == "https" and (path == "/" or not path.isprintable() or "?" in path):
            raise ValueError(f"bad DoH path {path!r}")
        plain = cls.parse(rest, SCHEMES[scheme])
        return cls(plain.host, plain.port, scheme, path if scheme == "https" else "")

    @property
    def encrypted(self) -> bool:
        return bool(self.scheme)

    def __str__(self) -> str:
        return hostport(self.host, self.port, self.scheme) + self.path


def _addresses(value: object) -> tuple[Address, ...]:
    if isinstance(value, tuple) and all(isinstance(v, Address) for v in value):
        return value
    out = []
    for item in options.string_tuple(value):
        fix = _bracket_fix(item.partition("://")[2] or item)
        if fix:
            raise ValueError(f"{item!r}: an IPv6 address with a port needs brackets: {fix}")
        try:
            out.append(Address.parse_listen(item))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not host:port ({exc})") from exc
    if not out:
        raise ValueError("needs at least one address")
    return tuple(out)


def _bracket_fix(text: str) -> str:
    """How to write an unbracketed IPv6 listen address whose last group reads as a port.

    ``"::1:5353"`` parses as the address ::1:5353 on port 53, which is almost never what
    was meant; ``"::1"`` or ``"fe80::1"`` are unambiguous and stay valid. "" when fine.
    """
    if text.startswith("[") or text.count(":") < 2:
        return ""
    head, _, tail = text.rpartition(":")
    if not tail.isdigit():
        return ""
    try:
        ipaddress.IPv6Address(head)
    except ValueError:
        return ""
    return f"write [{head}]:{tail} (or [{text}]:53 for that address on port 53)"


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def overlap(a: Address, b: Address) -> bool:
    """Whether ``a`` and ``b`` cannot both be bound: the same port and the same address, or
    one the wildcard of the other's family (IPv6 sockets are bound V6ONLY, so 0.0.0.0 and ::
    coexist). Port 0 (any free port) never clashes; host names compare as written."""
    if a.port != b.port or a.port == 0:
        return False
    ia, ib = _ip(a.host), _ip(b.host)
    if ia is None or ib is None:
        return a.host.lower() == b.host.lower()
    return ia == ib or (ia.version == ib.version and (ia.is_unspecified or ib.is_unspecified))


def _distinct(_inst: object, _attr: object, value: tuple[Address, ...]) -> None:
    """attrs validator: no two listen addresses clash (`run` could not bind them)."""
    for i, a in enumerate(value):
        for b in value[i + 1 :]:
            if not overlap(a, b):
                continue
            if _ip(a.host) == _ip(b.host):
                raise ValueError(f"{a} is listed twice")
            raise ValueError(
                f"{a} and {b} overlap: a wildcard address covers every address of its "
                "family on that port; keep one"
            )


def worker_count(value: int | str) -> int:
    """The number of worker processes ``[server] workers`` asks for ("auto": usable CPUs)."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(value)


def _workers(_inst: object, _attr: attrs.Attribute, value: int | str) -> None:
    if value != "auto" and not 1 <= int(value) <= MAX_WORKERS:
        raise ValueError(f'must be "auto" or between 1 and {MAX_WORKERS}, got {value!r}')
    if worker_count(value) > 1 and not reuseport_steering():
        raise ValueError(
            f"{value!r} needs SO_REUSEPORT and SO_ATTACH_REUSEPORT_CBPF (Linux), which this"
            " platform lacks: set workers = 1"
        )


def reuseport_steering() -> bool:
    """Whether this platform can share a listener between processes steered by a
    classic-BPF program (Linux: SO_REUSEPORT and SO_ATTACH_REUSEPORT_CBPF)."""
    return sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


@attrs.frozen
class ServerConfig:
    """The ``[server]`` table."""

    listen: tuple[Address, ...] = attrs.field(
        default=("127.0.0.1:5353",), converter=_addresses, validator=_distinct
    )
    allow: tuple[Network, ...] = attrs.field(default=DEFAULT_ALLOW, converter=options.networks)
    tcp_idle_timeout: float = options.seconds(10.0, 0.1, 3600)
    tcp_idle_timeout_min: float = options.seconds(1.0, 0.1, 3600)
    max_tcp_connections: int = attrs.field(default=1024, validator=options.in_range(1, 1_000_000))
    max_tcp_per_client: int = attrs.field(default=64, validator=options.in_range(1, 1_000_000))
    max_tcp_pipeline: int = attrs.field(default=100, validator=options.in_range(1, 65535))
    max_inflight: int = attrs.field(default=4096, validator=options.in_range(1, 1_000_000))
    max_inflight_per_client: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(options.in_range(1, 1_000_000))
    )
    edns_udp_size: int = attrs.field(default=1232, validator=options.in_range(512, 4096))
    tls_cert: str = ""  # PEM certificate chain for tls:// and https:// listeners
    tls_key: str = ""  # its PEM private key
    tls_server_name: str = ""  # DoT SNI "<client id>.<tls_server_name>" names the client
    tls_reload_interval: float = options.seconds("5s", 0.5, 3600)  # cert files' mtime poll
    tls_handshake_timeout: float = options.seconds("5s", 0.1, 60)
    trusted_proxies: tuple[Network, ...] = attrs.field(default=(), converter=options.networks)
    ddr: bool = True  # answer _dns.resolver.arpa SVCB for the encrypted listeners (RFC 9462)
    packet_cache_size: int = attrs.field(default=10_000, validator=options.in_range(0, 10_000_000))
    # Processes serving the DNS listeners (dnsproxy.workers); "auto": one per usable CPU.
    workers: int | Literal["auto"] = attrs.field(default=1, validator=_workers)
    # Query records a worker holds for a supervisor that does not keep up, then drops.
    worker_records: int = attrs.field(default=100_000, validator=options.in_range(100, 10_000_000))
    state_dir: str = ".dnsproxy-state"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    user: str = ""  # run as this user after binding the listeners as root ("" = stay)
    group: str = ""  # and this group ("" = the user's primary group)
    # The IANA zone step schedules (``active``) are read in; "" is the system's.
    timezone: str = attrs.field(default="", validator=lambda _i, _a, v: schedule.timezone(v))


@attrs.frozen
class StepConfig:
    """One ``[[chain]]`` table, validated."""

    index: int
    plugin: str
    where: str
    zones: tuple[bytes, ...]
    clients: tuple[Network, ...]
    options: Any
    deadline: float = DEADLINE  # seconds for the step's I/O phase (``deadline``)
    names: frozenset[str] = frozenset()  # client and group names of ``clients``
    active: tuple[schedule.Window, ...] = ()  # the ``active`` key: when the step applies


@attrs.frozen
class ServiceConfig:
    """A top-level table served by a plugin service (``[http]`` for example)."""

    table: str
    where: str
    options: Any


@attrs.frozen
class Config:
    """A whole, valid configuration."""

    path: Path
    server: ServerConfig
    chain: tuple[StepConfig, ...]
    services: tuple[ServiceConfig, ...]
    plugin_files: tuple[Path, ...]
    clients: ClientsConfig = attrs.field(factory=ClientsConfig)  # [clients] and [groups]

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    @property
    def encrypted(self) -> tuple[Address, ...]:
        """The ``tls://`` and ``https://`` listeners."""
        return tuple(a for a in self.server.listen if a.encrypted)

    def tls_files(self) -> tuple[Path, Path]:
        """``[server] tls_cert`` and ``tls_key``, relative to the config file."""
        sc = self.server
        return tuple(  # type: ignore[return-value]
            p if p.is_absolute() else self.base_dir / p
            for p in (Path(sc.tls_cert).expanduser(), Path(sc.tls_key).expanduser())
        )

    @property
    def state_dir(self) -> Path:
        return state_path(self.path, self.server)


def state_path(path: Path, server: ServerConfig) -> Path:
    """``state_dir`` of the config at ``path``: relative to the config's directory."""
    p = Path(server.state_dir).expanduser()
    return p if p.is_absolute() else path.parent / p


GENERIC_STEP_KEYS = ("plugin", "zones", "clients", "deadline", "active")


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; errors name the file."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file (pass -c PATH to name the config)") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def server_table(path: Path, doc: Mapping[str, Any]) -> ServerConfig:
    """The ``[server]`` table alone, validated: what `dnsproxy run` needs before it binds
    the listeners and drops privileges, without importing any plugin."""
    raw = doc.get("server", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{path.name}: server must be a table")
    return options.build(ServerConfig, raw, f"{path.name}: server")


def plugin_files(path: Path, doc: Mapping[str, Any]) -> tuple[Path, ...]:
    """The top-level ``plugins = [...]`` list of Python files, resolved."""
    value = doc.get("plugins", [])
    try:
        files = options.string_tuple(value)
    except TypeError as exc:
        raise ConfigError(f"{path.name}: plugins: {exc}") from exc
    return tuple(p if p.is_absolute() else path.parent / p for p in map(Path, files))


def parse(path: Path, doc: Mapping[str, Any], registry: Registry) -> Config:
    """Validate a parsed TOML document against the registered plugins."""
    name = path.name
    errors: list[str] = []
    known = {"server", "chain", "plugins", "clients", "groups", *registry.services}
    for key in doc:
        if key not in known:
            errors.append(f"{name}: unknown table {key!r}{options.suggest(key, known)}")

    server = ServerConfig()
    try:
        server = server_table(path, doc)
    except ConfigError as exc:
        errors.extend(exc.lines)

    clients = ClientsConfig()
    try:
        clients = parse_config(name, path.parent, doc)
    except ConfigError as exc:
        errors.extend(exc.lines)

    steps = []
    raw_chain = doc.get("chain", [])
    if not isinstance(raw_chain, list):
        errors.append(f"{name}: chain must be an array of tables ([[chain]])")
        raw_chain = []
    for i, table in enumerate(raw_chain):
        try:
            steps.append(_step(name, i, table, registry, clients.names))
        except ConfigError as exc:
            errors.extend(exc.lines)
    if not raw_chain:
        errors.append(f'{name}: chain: no steps; add [[chain]] tables (e.g. plugin = "forward")')

    services = []
    for table, cls in registry.services.items():
        if table in doc:
            where = f"{name}: {table}"
            raw = doc[table]
            if not isinstance(raw, dict):
                errors.append(f"{where}: must be a table")
                continue
            try:
                services.append(ServiceConfig(table, where, options.build(cls.Options, raw, where)))
            except ConfigError as exc:
                errors.extend(exc.lines)

    if not any(e.startswith(f"{name}: server") for e in errors):  # else listen is a default
        errors.extend(_service_clashes(server, services))
    cfg = Config(path, server, tuple(steps), tuple(services), plugin_files(path, doc), clients)
    if not errors and cfg.encrypted:
        errors.extend(_tls_errors(cfg))
    if errors:
        raise ConfigError(errors)
    return cfg


def _tls_errors(cfg: Config) -> list[str]:
    """Errors for encrypted listeners without a usable certificate and key."""
    from dnsproxy.tls import TlsError, load_context

    where = f"{cfg.path.name}: server"
    sc = cfg.server
    missing = [k for k in ("tls_cert", "tls_key") if not getattr(sc, k)]
    if missing:
        first = next(str(a) for a in cfg.encrypted)
        return [f"{where}: {k}: required by the listener {first}" for k in missing]
    try:
        load_context(*cfg.tls_files(), ())
    except TlsError as exc:
        return [f"{where}: {exc}"]
    return []


def _service_clashes(server: ServerConfig, services: list[ServiceConfig]) -> list[str]:
    """Errors for a service (``[http]``) listening where a DNS listener does (DNS binds TCP
    on every listen address too, so the two cannot share it)."""
    out = []
    for svc in services:
        addr = getattr(svc.options, "listen", None)
        if not isinstance(addr, Address):
            continue
        for dns in server.listen:
            if overlap(addr, dns):
                out.append(
                    f"{svc.where}: option 'listen': {addr} clashes with the DNS listener {dns}"
                    " ([server] listen; both need TCP there): pick another port"
                )
    return out


def _step(
    name: str, i: int, table: object, registry: Registry, known: frozenset[str]
) -> StepConfig:
    where = f"{name}: chain[{i}]"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table")
    plugin = table.get("plugin")
    if not isinstance(plugin, str):
        raise ConfigError(
            f"{where}: missing 'plugin' (one of: {', '.join(sorted(registry.steps))})"
        )
    cls = registry.steps.get(plugin)
    if cls is None:
        raise ConfigError(
            f"{where}: plugin: unknown plugin {plugin!r}{options.suggest(plugin, registry.steps)}"
            f" (known: {', '.join(sorted(registry.steps))})"
        )
    where = f"{where} ({plugin})"
    errors = []
    zones: tuple[bytes, ...] = ()
    clients: tuple[Network, ...] = ()
    try:
        zones = tuple(name_to_key(z) for z in options.string_tuple(table.get("zones", [])))
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: zones: {exc}")
    names: frozenset[str] = frozenset()
    try:
        clients, names = _clients_key(table.get("clients", []), known)
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: clients: {exc}")
    active: tuple[schedule.Window, ...] = ()
    if "active" in table:
        try:
            active = schedule.parse_windows(table["active"])
        except (TypeError, ValueError) as exc:
            errors.append(f"{where}: active: {exc}")
    deadline = DEADLINE
    try:
        deadline = options.duration(table.get("deadline", DEADLINE))
        low, high = DEADLINE_RANGE
        if not low <= deadline <= high:
            raise ValueError(f"must be between {low:g} s and {high:g} s, got {deadline:g} s")
    except (TypeError, ValueError) as exc:
        errors.append(f"{where}: deadline: {exc}")
    rest = {k: v for k, v in table.items() if k not in GENERIC_STEP_KEYS}
    opts = None
    try:
        opts = options.build(cls.Options, rest, where)
    except ConfigError as exc:
        errors.extend(exc.lines)
    if errors:
        raise ConfigError(errors)
    return StepConfig(i, plugin, where, zones, clients, opts, deadline, names, active)


def _clients_key(
    value: object, known: frozenset[str]
) -> tuple[tuple[Network, ...], frozenset[str]]:
    """A step's ``clients``: networks, and names of [clients] entries or [groups]."""
    return networks_and_names(
        options.string_tuple(value),
        known,
        what="an IP network nor a client or group name",
        none="none; declare names in [clients] or [groups]",
    )
