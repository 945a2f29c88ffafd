"""The rules of a rewrite step: parsed and checked from the config, and how each one
matches a name, renames it and maps names of the answer back."""

from __future__ import annotations

import re
from collections.abc import Mapping

import attrs
import dns.exception
import dns.name
import dns.rdatatype

from dnsproxy import options, wire

KINDS = ("exact", "zone", "prefix", "suffix", "substring", "regex")
RCODES = {"NXDOMAIN": wire.NXDOMAIN, "REFUSED": wire.REFUSED, "NODATA": wire.NOERROR}
RULE_KEYS = ("match", "from", "to", "answer", "types", "rcode", "ttl")
MAX_TTL = 2**31 - 1  # RFC 2181 §8
_GROUP = re.compile(r"\{(\d+)\}")


@attrs.frozen
class Rule:
    """One compiled rule; ``index`` is its position, which decides precedence."""

    index: int
    kind: str
    pattern: str  # ``from``, normalised
    to: str | None
    types: frozenset[int]
    rcode: int | None
    ttl: tuple[int, int] | None
    regex: re.Pattern[str] | None = attrs.field(eq=False)
    label: str

    def applies(self, qtype: int) -> bool:
        return not self.types or qtype in self.types

    def test(self, text: str) -> str | None:
        """For a text kind: the rewritten name (or ``text`` without ``to``) if it matches."""
        pat = self.pattern
        if self.kind == "suffix":
            if not text.endswith(pat):
                return None
            return text if self.to is None else text[: len(text) - len(pat)] + self.to
        if self.kind == "prefix":
            if not text.startswith(pat):
                return None
            return text if self.to is None else self.to + text[len(pat) :]
        if self.kind == "substring":
            if pat not in text:
                return None
            return text if self.to is None else text.replace(pat, self.to, 1)
        assert self.regex is not None
        m = self.regex.fullmatch(text)
        if m is None:
            return None
        if self.to is None:
            return text
        return _GROUP.sub(lambda g: m.group(int(g.group(1))) or "", self.to)

    def rename(self, text: str) -> str:
        """The new name for a matching ``text`` (exact and zone kinds)."""
        assert self.to is not None
        if self.kind == "exact":
            return self.to
        if self.kind == "zone":
            return self.to if text == self.pattern else text[: -len(self.pattern)] + self.to
        result = self.test(text)
        assert result is not None
        return result

    def back(self, text: str) -> str | None:
        """Map a name from the rewritten side back to the asked side, if the rule made it."""
        to, pat = self.to, self.pattern
        assert to is not None
        if self.kind == "zone":
            if text == to:
                return pat
            if text.endswith("." + to):
                return text[: -len(to)] + pat
        elif self.kind == "suffix" and text.endswith(to):
            return text[: len(text) - len(to)] + pat
        elif self.kind == "prefix" and text.startswith(to):
            return pat + text[len(to) :]
        elif self.kind == "substring" and to in text:
            return text.replace(to, pat, 1)
        return None


def _dns_name(value: str, what: str) -> str:
    """Normalise a full domain name (lower-case, no trailing dot), checking it is valid."""
    try:
        name = dns.name.from_text(value)
    except dns.exception.DNSException as exc:
        raise ValueError(f"{what}: {value!r} is not a domain name ({exc})") from exc
    return name.to_text(omit_final_dot=True).lower()


def _ttl_range(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        raise ValueError("ttl: expected [min, max] in seconds, e.g. [60, 3600]")
    lo, hi = value
    if not 0 <= lo <= hi <= MAX_TTL:
        raise ValueError(f"ttl: need 0 <= min <= max <= {MAX_TTL}, got [{lo}, {hi}]")
    return (lo, hi)


def _types(value: object) -> frozenset[int]:
    out = set()
    for item in options.string_tuple(value):
        try:
            out.add(dns.rdatatype.from_text(item))
        except dns.rdatatype.UnknownRdatatype as exc:
            raise ValueError(f"types: unknown record type {item!r}") from exc
    return frozenset(out)


def _rule(index: int, table: object) -> Rule:
    if not isinstance(table, Mapping):
        raise ValueError('expected a table such as { match = "zone", from = ..., to = ... }')
    for key in table:
        if key not in RULE_KEYS:
            raise ValueError(f"unknown key {key!r}{options.suggest(key, RULE_KEYS)}")
    kind = table.get("match", "exact")
    if kind not in KINDS:
        raise ValueError(f"match: must be one of {', '.join(KINDS)}, got {kind!r}")
    pattern, to, rcode_text = table.get("from"), table.get("to"), table.get("rcode")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("from: required, a non-empty string")
    if to is not None and (not isinstance(to, str) or not to.strip(".")):
        raise ValueError("to: must be a non-empty name")
    if table.get("answer", "auto") != "auto":
        raise ValueError('answer: only "auto" is supported (answers are mapped back)')
    if rcode_text is not None and rcode_text not in RCODES:
        raise ValueError(f"rcode: must be one of {', '.join(RCODES)}, got {rcode_text!r}")
    ttl = _ttl_range(table["ttl"]) if "ttl" in table else None
    if to is None and rcode_text is None and ttl is None:
        raise ValueError("needs an action: to, rcode or ttl")
    if rcode_text is not None and (to is not None or ttl is not None):
        raise ValueError("rcode answers at once: it cannot be combined with to or ttl")
    types = _types(table["types"]) if "types" in table else frozenset()
    regex = None
    if kind in ("exact", "zone"):
        pattern = _dns_name(pattern, "from")
        if to is not None:
            to = _dns_name(to, "to")
    elif kind == "regex":
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"from: bad regex {pattern!r}: {exc}") from exc
        for ref in _GROUP.findall(to or ""):
            if int(ref) > regex.groups:
                raise ValueError(f"to: {{{ref}}} but the regex has {regex.groups} group(s)")
        to = to.lower().rstrip(".") if to is not None else None
    else:
        pattern = pattern.lower()
        if kind != "prefix":
            pattern = pattern.rstrip(".") or pattern
        if to is not None:
            to = to.lower() if kind == "prefix" else to.lower().rstrip(".")
    label = f"{kind} {pattern}"
    return Rule(
        index=index,
        kind=kind,
        pattern=pattern,
        to=to,
        types=types,
        rcode=RCODES[rcode_text] if rcode_text is not None else None,
        ttl=ttl,
        regex=regex,
        label=label[:60],
    )


def _rules(value: object) -> tuple[Rule, ...]:
    if isinstance(value, tuple) and all(isinstance(r, Rule) for r in value):
        return value
    if not isinstance(value, list | tuple):
        raise TypeError("expected a list of rule tables")
    out = []
    for i, table in enumerate(value):
        try:
            out.append(_rule(i, table))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"[{i}]: {exc}") from exc
    return tuple(out)


@attrs.frozen
class RewriteOptions:
    rules: tuple[Rule, ...] = attrs.field(converter=_rules)
    max_rules: int = attrs.field(default=10000, validator=options.in_range(1, 1_000_000))

    def __attrs_post_init__(self) -> None:
        if not self.rules:
            raise ValueError("'rules' is empty: add at least one rule")
        if len(self.rules) > self.max_rules:
            raise ValueError(
                f"'rules' has {len(self.rules)} entries, more than max_rules = {self.max_rules}"
            )
