"""The user's own allow and block entries: the dashboard's one-click Allow and Block.

Two list files under the state directory (``blocklist/managed-allow.txt`` and
``blocklist/managed-block.txt``, adblock syntax, ``$important``) that every blocklist step
of the server loads as two more lists. So a managed entry costs no per-query work (it is
in the step's merged set like any list entry), survives restarts (the files), and beats
the configured lists: a managed allow wins over every block, a managed block over every
configured exception. `Managed` is shared by the server's steps (``setup.shared``); after
a change the caller has each step re-read the files (`Blocklist.apply_managed`).
"""

from __future__ import annotations

import os
from pathlib import Path

import dns.exception
import dns.name

from dnsproxy.errors import DnsProxyError

KINDS = ("allow", "block")
MAX_ENTRIES = 10_000  # per file: a list a person keeps by hand
HEADER = "! Managed by dnsproxy (the dashboard's Allow/Block buttons); edits are picked up.\n"


class ManagedError(DnsProxyError, ValueError):
    """A name that cannot be listed (bad syntax, list full)."""


def normalise(name: str) -> str:
    """A listable domain name, lower-case without the trailing dot; ManagedError if not."""
    text = name.strip().lower().removesuffix(".")
    if not text or text.startswith("*") or any(c in text for c in " /|^$@!#"):
        raise ManagedError(f"{name!r} is not a domain name")
    try:
        dns.name.from_text(text)
    except dns.exception.DNSException as exc:
        raise ManagedError(f"{name!r} is not a domain name: {exc}") from exc
    return text


class Managed:
    """The two managed lists of one server (by state directory)."""

    def __init__(self, state_dir: Path) -> None:
        folder = state_dir / "blocklist"
        self.paths = {k: folder / f"managed-{k}.txt" for k in KINDS}
        folder.mkdir(parents=True, exist_ok=True)
        for path in self.paths.values():
            if not path.exists():
                self._write(path, [])

    def entries(self, kind: str) -> list[str]:
        """The names in list ``kind`` as the file has them now, sorted."""
        try:
            text = self.paths[kind].read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        out = set()
        for line in text.splitlines():
            rule = line.strip().removeprefix("@@")
            if rule.startswith("||") and rule.endswith("^$important"):
                out.add(rule[2 : -len("^$important")])
        return sorted(out)

    def add(self, kind: str, name: str) -> str:
        """List ``name`` as ``kind`` (and take it off the other list). Returns the name."""
        name = normalise(name)
        other = "block" if kind == "allow" else "allow"
        current = self.entries(kind)
        if name not in current:
            if len(current) >= MAX_ENTRIES:
                raise ManagedError(f"the managed {kind} list is full ({MAX_ENTRIES} entries)")
            self._write(self.paths[kind], [*current, name], allow=kind == "allow")
        self.remove(other, name)
        return name

    def remove(self, kind: str, name: str) -> bool:
        """Take ``name`` off list ``kind``; whether it was there."""
        name = normalise(name)
        current = self.entries(kind)
        if name not in current:
            return False
        current.remove(name)
        self._write(self.paths[kind], current, allow=kind == "allow")
        return True

    @staticmethod
    def _write(path: Path, names: list[str], allow: bool = False) -> None:
        """Replace the file atomically, so a step never reads half of it."""
        prefix = "@@" if allow else ""
        body = HEADER + "".join(f"{prefix}||{n}^$important\n" for n in sorted(names))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)
