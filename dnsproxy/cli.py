"""The command line: ``dnsproxy run|check|query`` (DESIGN.md §1)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import trio

from dnsproxy import __version__
from dnsproxy.config import read_toml, server_table, state_path, worker_count
from dnsproxy.errors import ConfigError
from dnsproxy.lint import lint
from dnsproxy.loader import build_chain, load
from dnsproxy.server import Server, prebind
from dnsproxy.service import (
    JournalFormatter,
    Notifier,
    Sockets,
    check_state_dir,
    drop_privileges,
    event_text,
    journal_stderr,
    prepare_state_dir,
    service_user,
)
from dnsproxy.wire import parse_query
from dnsproxy.workers import Supervisor, bind_groups, close_groups, explain

QUERY_READY_WAIT = 10.0  # seconds `dnsproxy query` waits for lists to load
QUERY_TIMEOUT = 10.0  # seconds for the query itself (forward gives up after its budget)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` — one line per event."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{ts} {record.levelname.lower():7} {event_text(self, record)}"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **(getattr(record, "fields", None) or {}),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Log to stderr: JSON lines for ``fmt = "json"``; else text, in the journal's form
    (no timestamp, ``<N>`` priority prefix) when stderr is the systemd journal."""
    handler = logging.StreamHandler(sys.stderr)
    formatter: logging.Formatter = TextFormatter()
    if fmt == "json":
        formatter = JsonFormatter()
    elif journal_stderr():
        formatter = JournalFormatter()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dnsproxy", description="A plugin-based DNS proxy.")
    p.add_argument("--version", action="version", version=f"dnsproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "serve DNS"), ("check", "validate the config and its lists")):
        sp = sub.add_parser(name, help=text)
        sp.add_argument("-c", "--config", default="config.toml", type=Path, metavar="PATH")
    sp = sub.add_parser("query", help="run one query through the chain and explain it")
    sp.add_argument("name", nargs="?", help="a name, or an IP address (its PTR name)")
    sp.add_argument("type", nargs="?", help="record type (default A; PTR for an address)")
    sp.add_argument("-x", dest="reverse", metavar="ADDR", help="reverse lookup, as dig -x")
    sp.add_argument(
        "--client",
        metavar="NAME|ADDR",
        default="127.0.0.1",
        help="ask as this client: an address, or a client name ([clients], hosts, leases)",
    )
    sp.add_argument("-c", "--config", default="config.toml", type=Path, metavar="PATH")
    sub.add_parser(
        "hash-password", help="print a [http] password_hash (reads the password from stdin)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args.config)
        if args.command == "check":
            return trio.run(_check, args.config)
        if args.command == "hash-password":
            return _hash_password()
        name, type_text = _question(args.name, args.type, args.reverse)
        return trio.run(_query, args.config, name, type_text, args.client)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:  # raised inside a nursery: report config errors alone
        errors, rest = group.split(ConfigError)
        if errors is None or rest is not None:
            raise
        for exc in _leaves(errors):
            for line in exc.lines:
                print(line, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _hash_password() -> int:
    """Print the scrypt hash of a password typed at the prompt (or piped in)."""
    import getpass

    from dnsproxy.plugins.http.auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise ConfigError("the two passwords differ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise ConfigError("empty password")
    print(hash_password(password))
    return 0


def _leaves(group: BaseExceptionGroup[ConfigError]) -> list[ConfigError]:
    out: list[ConfigError] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


def _question(name: str | None, type_text: str | None, reverse: str | None) -> tuple[str, str]:
    """The name and type to ask. ``-x ADDR [TYPE]``, or an address as the name with PTR or
    no type, asks for the address's reverse name (as dig does); other names are as given."""
    if reverse is not None:
        if type_text is not None:
            raise ConfigError("give a name or -x ADDR, not both")
        name, type_text = reverse, name
    if name is None:
        raise ConfigError("give a name to query (or -x ADDR for a reverse lookup)")
    if reverse is None and type_text is not None and type_text.upper() != "PTR":
        return name, type_text
    try:
        ptr = dns.reversename.from_address(name).to_text()
    except (ValueError, dns.exception.SyntaxError) as exc:
        if reverse is not None:
            raise ConfigError(f"-x {reverse}: not an IP address") from exc
        return name, type_text or "A"
    return ptr, type_text or "PTR"


def _run(path: Path) -> int:
    """Serve: adopt systemd's sockets; with ``[server] user``, bind the rest as root and
    drop privileges before any plugin file is imported or any query served; then load."""
    doc = read_toml(path)
    sc = server_table(path, doc)
    setup_logging(sc.log_level, sc.log_format)
    notifier = Notifier.from_environment()
    sockets = Sockets.from_environment()
    groups = None  # with workers > 1: the DNS listeners, N steered sockets each
    try:
        if worker_count(sc.workers) > 1:
            groups = bind_groups(path.name, sc, sockets)
        if sc.user:
            where = f"{path.name}: server"
            uid, gid = service_user(sc.user, sc.group, where)
            prebind(path, doc, sc, sockets)
            state = state_path(path, sc)
            prepare_state_dir(state, uid, gid, where)
            drop_privileges(uid, gid, where)
            check_state_dir(state, sc.user, where)
        loaded = load(path)
    except BaseException:
        sockets.close_all()
        close_groups(groups or ())
        raise
    kw = {"freeze_gc": True, "loaded": loaded, "sockets": sockets, "notifier": notifier}
    server = Server(path, **kw) if groups is None else Supervisor(path, groups=groups, **kw)
    trio.run(server.run)
    return 0


async def _check(path: Path) -> int:
    setup_logging("warning")
    cfg, registry, _ = load(path)
    chain = build_chain(cfg, registry)
    for line in lint(cfg):
        print(line)
    errors = []
    try:
        for step in chain.steps:
            try:
                lines = await step.check()
            except ConfigError as exc:
                errors.extend(exc.lines)
                continue
            for line in lines:
                print(f"{step.setup.where}: {line}")
    finally:
        chain.close()
    if errors:
        for line in errors:
            print(line, file=sys.stderr)
        return 1
    print(f"{path}: {explain(cfg.server)}")
    print(f"{path}: ok ({len(chain.steps)} steps)")
    return 0


async def _query(path: Path, name: str, type_text: str, client: str = "127.0.0.1") -> int:
    """Run one query through the configured chain and explain it.

    Prints the chain, every trace line the steps wrote (what matched and why, what each
    upstream said), which step answered, the notes the query log would record (list,
    rule, upstream, cache) and the final response with its Extended DNS Errors.
    """
    setup_logging("warning")
    try:
        rdtype = dns.rdatatype.from_text(type_text)
    except dns.rdatatype.UnknownRdatatype as exc:
        raise ConfigError(f"unknown record type {type_text!r}") from exc
    try:
        msg = dns.message.make_query(name, rdtype, dns.rdataclass.IN, use_edns=0)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"bad name {name!r}: {exc}") from exc
    cfg, registry, pm = load(path)
    server = Server(path, handle_signals=False, loaded=(cfg, registry, pm))
    await server.clients.update()  # the IPv6 neighbours too, as the server's first pass
    found = server.clients.address_of(client)
    if found is None:
        raise ConfigError(f"--client: {client!r} is neither an address nor a known client name")
    q = parse_query(msg.to_wire(), (found[0], 0), "udp")
    q.client_id = found[1]
    q.trace = []
    chain = server.chain
    who = server.clients.lookup(found[0], found[1])
    known = f" ({who.name or 'no name'}; groups: {', '.join(sorted(who.groups)) or 'none'})"
    print(
        f";; query: {q.text} {dns.rdatatype.to_text(rdtype)} from {found[0]}"
        f"{known if server.clients.enabled else ''} (udp)"
    )
    print(";; chain:")
    for step in chain.steps:
        print(f";;   {step.setup.where}")
    reply = None
    start = time.monotonic()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run_steps)
        with trio.move_on_after(QUERY_READY_WAIT):
            while not chain.ready():  # lists load in the background: wait for them
                await trio.sleep(0.05)
        waiting = [s.setup.where for s in chain.steps if not s.ready()]
        for where in waiting:
            print(f";; warning: {where}: not ready after {QUERY_READY_WAIT:g} s")
        start = time.monotonic()
        with trio.move_on_after(QUERY_TIMEOUT) as cs:
            reply = await server.query(q)
        nursery.cancel_scope.cancel()
    elapsed = (time.monotonic() - start) * 1000
    chain.close()
    print(";; trace:")
    for line in q.trace:
        print(f";;   {line}")
    if cs.cancelled_caught:
        print(f";; no answer within {QUERY_TIMEOUT:g} s")
        return 1
    notes = dict(q.notes or {})
    for key, label in (("list", "matched list"), ("rule", "matched rule"),
                       ("upstream", "upstream"), ("cache", "cache")):  # fmt: skip
        if key in notes:
            print(f";; {label}: {notes.pop(key)}")
    for key, value in notes.items():
        print(f";; note {key}: {value}")
    if reply is None:
        print(";; dropped: no response would be sent")
        return 1
    answered = [ln.rpartition(": answered")[0] for ln in q.trace if ": answered (rcode" in ln]
    if reply.source == "chain":
        print(";; answered by: no step (the query fell off the end of the chain)")
    else:
        print(f";; answered by: {reply.source} ({answered[-1] if answered else 'unknown step'})")
    rcode = dns.rcode.to_text(reply.rcode)
    print(f";; response: {rcode}, {reply.ancount} answer(s), {elapsed:.1f} ms")
    for code, text in reply.ede:
        print(f";; EDE {code}: {text}")
    print(reply.message().to_text())
    return 0
