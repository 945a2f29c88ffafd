"""Blocklist parsing: every supported line format, detected per line.

`parse_line` is the reference parser and the only place the formats' semantics live.
`parse_list` runs it over a whole list, except that the four line shapes that make up
almost every real list (``d``, ``0.0.0.0 d``, ``||d^``, ``server=/d/``) are recognised for
a whole chunk at once with numpy and hashed without a Python loop per line; a line the
vectorised pass is not certain about goes to `parse_line`. Tests check that both paths
give the same result on the real lists.

A parsed list is a pair of numpy arrays (64-bit name hashes and kind bits, see
`domainset`) plus the wildcard and regex rules, which cannot be hashed.
"""

from __future__ import annotations

import ipaddress
import re
import re._parser as _sre
from typing import Any

import attrs
import numpy as np

from dnsproxy.errors import DnsProxyError

# Kind bits of an entry (the list's index is added above them when lists are merged).
EXACT = 1  # the name only (adblock |d^, or subdomains = false)
SUBONLY = 2  # its subdomains only (*.d)
ALLOW = 4  # an exception (@@ rules, allow lists)
IMPORTANT = 8  # $important: wins over exceptions that are not important themselves
KIND_BITS = 4

SPECIAL = frozenset(
    b"localhost localhost.localdomain local broadcasthost ip6-localhost ip6-loopback "
    b"ip6-localnet ip6-mcastprefix ip6-allnodes ip6-allrouters ip6-allhosts 0.0.0.0".split()
)  # what hosts files map to loopback for the machine itself: never a block
SUPPORTED_MODIFIERS = frozenset({"important"})
CHUNK = 1 << 20  # bytes per vectorised chunk: bounds the temporary arrays (~12 MB)
MAX_PROBLEMS = 20  # line-level messages kept per list (the counts are exact)
MAX_LINE = 4096  # longer lines are errors (no rule is that long; bounds regex compiles)
MAX_UNBOUNDED = 3  # unbounded repeats per regex/wildcard rule (cubic worst case on 253 bytes)

_NAME_CHARS = re.compile(rb"[a-z0-9_.-]+")
_WILD_CHARS = re.compile(rb"[a-z0-9_.*-]+")


@attrs.frozen
class LineResult:
    """What one line contributes: names with kinds, patterns, or why it was dropped."""

    names: tuple[tuple[bytes, int], ...] = ()
    patterns: tuple[tuple[str, int], ...] = ()  # (regex source, kind)
    skipped: str = ""  # a rule we do not support (counted, never half-applied)
    error: str = ""  # a line that is not a rule at all


NOTHING = LineResult()


def valid_name(raw: bytes) -> bytes | None:
    """The lower-case text form of a host name, or None if it is not one."""
    name = raw.lower().rstrip(b".") if raw.endswith(b".") else raw.lower()
    if not name or len(name) > 253:
        return None
    if not name.isascii():
        try:
            name = name.decode().encode("idna").lower()
        except (UnicodeError, ValueError):
            return None
    if not _NAME_CHARS.fullmatch(name) or name in SPECIAL:
        return None
    if name.startswith(b".") or b".." in name:
        return None
    labels = name.split(b".")
    if labels[-1].isdigit():  # an IP address, or a name no resolver will ever see
        return None
    if len(name) > 63 and max(map(len, labels)) > 63:
        return None
    return name


def _name_rule(raw: bytes, kind: int) -> LineResult:
    """A domain from a hosts/plain/dnsmasq line; ``*.d`` means d's subdomains."""
    if raw.startswith(b"*.") and b"*" not in raw[2:]:
        name = valid_name(raw[2:])
        if name is None:
            return LineResult(error=f"not a domain name: {raw.decode(errors='replace')!r}")
        return LineResult(names=((name, (kind & ~EXACT) | SUBONLY),))
    name = valid_name(raw)
    if name is None:
        if raw.lower().rstrip(b".") in SPECIAL:
            return NOTHING
        return LineResult(error=f"not a domain name: {raw.decode(errors='replace')!r}")
    return LineResult(names=((name, kind),))


def _is_ip(token: bytes) -> bool:
    try:
        ipaddress.ip_address(token.partition(b"%")[0].decode())
    except (ValueError, UnicodeError):
        return False
    return True


def parse_line(line: bytes, subdomains: bool = True) -> LineResult:
    """Parse one line of any supported format (see the README for the semantics)."""
    line = line.strip()
    if not line or line[0] in b"#![":
        return NOTHING
    if len(line) > MAX_LINE:
        return LineResult(error=f"line longer than {MAX_LINE} bytes")
    base = 0 if subdomains else EXACT
    if adblock_syntax(line):
        return _adblock(line)
    if line.startswith((b"address=/", b"server=/", b"local=/")):
        return _dnsmasq(line, base)
    if b"##" in line or b"#@#" in line or b"#?#" in line or b"#$#" in line:
        return LineResult(skipped="cosmetic rule")
    tokens = line.partition(b"#")[0].split()
    if len(tokens) > 1 and _is_ip(tokens[0]):
        names = []
        for token in tokens[1:]:
            result = _name_rule(token, base)
            if result.error:
                return result
            names.extend(result.names)
        return LineResult(names=tuple(names))
    if len(tokens) == 1:
        if _is_ip(tokens[0]):
            return LineResult(error="an address without names")
        if b"*" in tokens[0] and not tokens[0].startswith(b"*."):
            return _wildcard(tokens[0], b"sub" if subdomains else b"exact", 0)
        return _name_rule(tokens[0], base)
    return LineResult(error="not a rule in any supported format")


def adblock_syntax(line: bytes) -> bool:
    """Whether a stripped line is an adblock-syntax rule (``||d^``, ``@@``, ``/re/``, ``$``)."""
    return line.startswith((b"||", b"|", b"@@", b"/")) or b"^" in line or b"$" in line


def _dnsmasq(line: bytes, base: int) -> LineResult:
    option, _, rest = line.partition(b"=")
    parts = rest.split(b"/")  # "", d1, ..., dn, target
    if len(parts) < 3 or parts[0]:
        return LineResult(error=f"malformed {option.decode()}= line")
    target = parts[-1].strip()
    if option == b"server" and target and target != b"#":
        return LineResult(skipped="server=/d/addr forwards, it does not block")
    names = []
    for raw in parts[1:-1]:
        if raw in (b"", b"#"):
            return LineResult(skipped=f"{option.decode()}=/#/ matches every name")
        result = _name_rule(raw, base)
        if result.error:
            return result
        names.extend(result.names)
    return LineResult(names=tuple(names))


def _adblock(line: bytes) -> LineResult:
    kind = 0
    if line.startswith(b"@@"):
        kind |= ALLOW
        line = line[2:]
    if line.startswith(b"/"):
        if len(line) > 2 and line.endswith(b"/"):
            body, mods = line[1:-1], b""
        elif b"/$" in line:
            body, _, mods = line[1:].rpartition(b"/$")
        else:
            return LineResult(error="regex rule without a closing /")
    else:
        body, _, mods = line.partition(b"$")
    if mods:
        for mod in mods.decode(errors="replace").split(","):
            if mod.strip().lower() not in SUPPORTED_MODIFIERS:
                return LineResult(skipped=f"unsupported modifier ${mod.strip()}")
        kind |= IMPORTANT
    if line.startswith(b"/"):
        try:
            source = body.decode()
            problem = regex_problem(source)
        except (UnicodeError, re.error, RecursionError) as exc:
            return LineResult(error=f"bad regex: {exc}")
        if problem:
            return LineResult(skipped=f"regex {problem}")
        return LineResult(patterns=((source, kind),))
    body = body.lower()
    if body.startswith(b"||"):
        anchor, body = b"sub", body[2:]
    elif body.startswith(b"|"):
        anchor, body = b"exact", body[1:]
    else:
        anchor = b""
    if body.endswith(b"^|"):
        body = body[:-1]
    if body.endswith(b"^") or (body.endswith(b"|") and anchor == b"exact"):
        body = body[:-1]
    elif anchor:
        return LineResult(skipped="URL rule without ^: not a whole host name")
    if not body or b"^" in body or b"|" in body or b"/" in body or b":" in body:
        return LineResult(skipped="URL path or port rule")
    if b"*" in body:
        if body.startswith(b"*.") and b"*" not in body[2:] and anchor == b"sub":
            return _name_rule(body, kind)
        return _wildcard(body, anchor, kind)
    if anchor == b"":
        return LineResult(skipped="unanchored rule: matches any substring of a URL")
    return _name_rule(body, kind | (EXACT if anchor == b"exact" else 0))


def regex_problem(source: str) -> str:
    """Why a regex could make one query slow, or "" if it is safe to run per query.

    Python's regex engine backtracks: nested repetition (``(a+)+``), repeated
    alternation (``(a|ab)*``) and many unbounded repeats in a row are exponential or
    high-degree polynomial on a crafted query name. Raises re.error if it does not compile.
    """
    re.compile(source)
    unbounded = 0

    def walk(items: Any, in_repeat: bool) -> str:
        nonlocal unbounded
        for op, av in items:
            if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT):
                _, high, sub = av
                if high == _sre.MAXREPEAT:
                    unbounded += 1
                if high > 1 and in_repeat:
                    return "with nested repetition"
                if found := walk(sub, in_repeat or high > 1):
                    return found
            elif op is _sre.BRANCH:
                if in_repeat:
                    return "with repeated alternation"
                for branch in av[1]:
                    if found := walk(branch, in_repeat):
                        return found
            elif op is _sre.SUBPATTERN:
                if found := walk(av[-1], in_repeat):
                    return found
            elif op in (_sre.ASSERT, _sre.ASSERT_NOT) and (found := walk(av[1], in_repeat)):
                return found
        return ""

    found = walk(_sre.parse(source), False)
    if not found and unbounded > MAX_UNBOUNDED:
        found = f"with more than {MAX_UNBOUNDED} unbounded repeats"
    return found


def _wildcard(body: bytes, anchor: bytes, kind: int) -> LineResult:
    """A ``*`` rule as an anchored regex over the lower-case name without its final dot."""
    if not _WILD_CHARS.fullmatch(body):
        return LineResult(error=f"bad wildcard rule {body.decode(errors='replace')!r}")
    if body.count(b"*") > MAX_UNBOUNDED:
        return LineResult(skipped=f"wildcard rule with more than {MAX_UNBOUNDED} '*'")
    core = ".*".join(re.escape(p.decode()) for p in body.split(b"*"))
    if anchor == b"sub":
        return LineResult(patterns=((f"(?:^|\\.){core}$", kind),))
    if anchor == b"exact":
        return LineResult(patterns=((f"^{core}$", kind),))
    return LineResult(patterns=((core, kind),))


# --- whole lists ------------------------------------------------------------------------


@attrs.define
class Parsed:
    """One parsed list: hashed names, patterns and counts for the load log."""

    hashes: np.ndarray  # int64, sorted, one per (name, kind) entry
    kinds: np.ndarray  # uint8 kind bits, parallel to hashes
    patterns: list[tuple[str, int]]
    rules: int = 0  # lines that contributed at least one entry
    adblock: int = 0  # of which in adblock syntax (explanations use the list's own syntax)
    skipped: int = 0
    errors: int = 0
    problems: list[str] = attrs.Factory(list)  # "line 12: ..." (first MAX_PROBLEMS)

    @property
    def names(self) -> int:
        return len(self.hashes)

    @property
    def in_adblock_syntax(self) -> bool:
        """Whether most rules are adblock rules (``||d^``) rather than hosts/domain lines."""
        return self.adblock * 2 > self.rules

    def summary(self) -> str:
        text = f"{self.rules} rules, {self.names} names"
        if self.patterns:
            text += f", {len(self.patterns)} patterns"
        return f"{text}, {self.skipped} skipped, {self.errors} errors"


class BadList(DnsProxyError, ValueError):
    """The list is unusable: a bound was exceeded, or nothing in it is a rule."""


def _allowed_table() -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    for c in b"abcdefghijklmnopqrstuvwxyz0123456789-_.":
        table[c] = True
    return table


_OK = _allowed_table()
_LETTER = np.zeros(256, dtype=bool)
_LETTER[list(b"abcdefghijklmnopqrstuvwxyz")] = True
_FIRST_OK = _OK.copy()
_FIRST_OK[[ord("."), ord("-")]] = False


def to_wire(name: bytes) -> bytes:
    """Wire form of a lower-case text name (``a.example`` -> ``\\x01a\\x07example\\x00``)."""
    return b"".join([bytes((len(label),)) + label for label in name.split(b".")]) + b"\0"


_SPECIAL_HASHES = np.array(sorted(hash(to_wire(s)) for s in SPECIAL), dtype=np.int64)
_COMMENT = np.zeros(256, dtype=bool)
_COMMENT[list(b"#![")] = True
for _table in (_OK, _LETTER, _FIRST_OK, _SPECIAL_HASHES, _COMMENT):
    _table.flags.writeable = False  # constant lookup tables, shared by every step
del _table

# (prefix, suffix, kind) of the line shapes recognised in bulk; kind None = the plain
# subdomains option decides between subtree and exact.
_FAST: tuple[tuple[bytes, bytes, int | None], ...] = (
    (b"", b"", None),
    (b"0.0.0.0 ", b"", None),
    (b"127.0.0.1 ", b"", None),
    (b":: ", b"", None),
    (b"::1 ", b"", None),
    (b"||", b"^", 0),
    (b"@@||", b"^", ALLOW),
    (b"server=/", b"/", None),
    (b"address=/", b"/", None),
    (b"address=/", b"/0.0.0.0", None),
    (b"address=/", b"/#", None),
    (b"local=/", b"/", None),
)
_FAST_SHAPES = tuple(
    (prefix, suffix, kind, int((~_OK[np.frombuffer(prefix + suffix, np.uint8)]).sum()))
    for prefix, suffix, kind in _FAST
)


def _wire_hashes(arr: np.ndarray, ds: np.ndarray, de: np.ndarray, dots: np.ndarray) -> np.ndarray:
    """Hashes of the wire forms of the names at ``arr[ds:de]``, made in place in a copy.

    The byte before each name becomes the first label's length, every dot the length of
    the label after it, and the byte after the name a zero: ``␣ads.example⏎`` becomes
    ``\\x03ads\\x07example\\x00``. The caller makes sure no two names share a border
    byte; ``dots`` are the positions of every ``.`` in ``arr``, sorted.
    """
    if not len(ds):
        return np.empty(0, np.int64)
    out = arr.copy()
    k = np.searchsorted(ds, dots, side="right") - 1
    inside = dots[(k >= 0) & (dots < de[np.maximum(k, 0)])]
    mark = np.zeros(len(arr), dtype=bool)
    mark[ds - 1] = True
    mark[inside] = True
    mark[de] = True
    where = np.flatnonzero(mark)
    out[where[:-1]] = (where[1:] - where[:-1] - 1).astype(np.uint8)  # wraps at borders...
    out[de] = 0  # ...which are zeros
    wire = out.tobytes()
    return np.fromiter(
        map(hash, map(wire.__getitem__, map(slice, (ds - 1).tolist(), (de + 1).tolist()))),
        dtype=np.int64,
        count=len(ds),
    )


def _fast_chunk(
    buf: bytes, subdomains: bool
) -> tuple[list[np.ndarray], list[np.ndarray], list[tuple[int, bytes]], int, int]:
    """Vectorised pass over a chunk of lower-case whole lines (no CR).

    Returns per-shape hashes and kinds, the (index, line) pairs left for `parse_line`,
    the number of lines and how many of the hashed ones were adblock rules. Positions
    are in ``arr``, which is ``buf`` after a newline.
    """
    arr = np.frombuffer(b"\n" + buf + b"\n" + b"\0" * 16, dtype=np.uint8)
    size = len(buf) + 2
    body = arr[:size]
    ends = np.flatnonzero(body[1:] == 10).astype(np.int32) + 1
    starts = np.empty(len(ends), dtype=np.int32)
    starts[0] = 1
    starts[1:] = ends[:-1] + 1
    # Bad bytes per line: anything outside [a-z0-9._-] and every ".." (an empty label).
    bad = ~_OK[body]
    bad[:-1] |= (body[:-1] == 46) & (body[1:] == 46)
    line_bad = np.add.reduceat(bad, starts, dtype=np.int32) - 1  # minus the newline
    dots = np.flatnonzero(body == 46).astype(np.int32)
    first = arr[starts]
    lens = ends - starts
    todo = np.flatnonzero((lens > 0) & ~_COMMENT[first])
    hashes, kinds = [], []
    adblock = 0
    base = 0 if subdomains else EXACT
    for prefix, suffix, kind, extra_bad in _FAST_SHAPES:
        if not len(todo):
            break
        cand = todo
        if prefix:
            cand = cand[first[cand] == prefix[0]]
        cand = cand[line_bad[cand] == extra_bad]
        ds = starts[cand] + len(prefix)
        de = ends[cand] - len(suffix)
        m = (de - ds > 0) & (de - ds <= 63)
        for i, c in enumerate(prefix[1:], 1):
            m &= arr[starts[cand] + i] == c
        for i, c in enumerate(suffix):
            m &= arr[de + i] == c
        m &= _FIRST_OK[arr[ds]] & _LETTER[arr[de - 1]]
        if not m.any():
            continue
        cand, ds, de = cand[m], ds[m], de[m]
        todo = np.setdiff1d(todo, cand, assume_unique=True)
        if prefix or suffix:
            h = _wire_hashes(arr, ds, de, dots)
        else:  # plain lines share their newlines: every other line per pass
            h = np.concatenate([_wire_hashes(arr, ds[i::2], de[i::2], dots) for i in (0, 1)])
        special = np.isin(h, _SPECIAL_HASHES)
        if special.any():
            h = h[~special]
        hashes.append(h)
        kinds.append(np.full(len(h), base if kind is None else kind, dtype=np.uint8))
        if kind is not None:  # the || and @@|| shapes
            adblock += len(h)
    spans = zip(todo.tolist(), starts[todo].tolist(), ends[todo].tolist(), strict=True)
    rest = [(i, buf[s - 1 : e - 1]) for i, s, e in spans]
    return hashes, kinds, rest, len(starts), adblock


def parse_list(
    data: bytes,
    *,
    subdomains: bool = True,
    max_entries: int = 5_000_000,
    max_patterns: int = 1000,
    fast: bool = True,
) -> Parsed:
    """Parse a whole list. Raises BadList past the bounds; bad lines are counted.

    ``fast = False`` sends every line through `parse_line` (the tests' reference).
    """
    all_hashes: list[np.ndarray] = []
    all_kinds: list[np.ndarray] = []
    patterns: list[tuple[str, int]] = []
    out = Parsed(np.empty(0, np.int64), np.empty(0, np.uint8), patterns)
    line_base = 0
    pos = 0
    entries = 0
    while pos < len(data):
        end = data.find(b"\n", pos + CHUNK) if len(data) - pos > CHUNK else -1
        end = len(data) if end < 0 else end
        chunk = data[pos:end].lower().replace(b"\r\n", b"\n")
        pos = end + 1
        if fast:
            hashes, kinds, lines, nlines, adblock = _fast_chunk(chunk, subdomains)
            all_hashes += hashes
            all_kinds += kinds
            out.rules += sum(map(len, hashes))
            out.adblock += adblock
        else:
            split = chunk.split(b"\n")
            lines, nlines = list(enumerate(split)), len(split)
        names: list[tuple[bytes, int]] = []
        for i, line in lines:
            result = parse_line(line, subdomains)
            if result.names or result.patterns:
                out.rules += 1
                out.adblock += adblock_syntax(line.strip())
                names.extend(result.names)
                patterns.extend(result.patterns)
            elif result.skipped or result.error:
                if result.skipped:
                    out.skipped += 1
                else:
                    out.errors += 1
                if len(out.problems) < MAX_PROBLEMS:
                    what = result.skipped or result.error
                    out.problems.append(f"line {line_base + i + 1}: {what}")
        if names:
            all_hashes.append(
                np.fromiter((hash(to_wire(n)) for n, _ in names), np.int64, len(names))
            )
            all_kinds.append(np.fromiter((k for _, k in names), np.uint8, len(names)))
        line_base += nlines
        entries = sum(map(len, all_hashes))
        if entries > max_entries:
            raise BadList(f"more than max_entries = {max_entries} names")
        if len(patterns) > max_patterns:
            raise BadList(f"more than max_patterns = {max_patterns} wildcard/regex rules")
    out.hashes, out.kinds = dedupe(all_hashes, all_kinds)
    return out


def dedupe(hashes: list[np.ndarray], kinds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate, sort by hash, and drop repeated (hash, kind) entries."""
    if not hashes:
        return np.empty(0, np.int64), np.empty(0, np.uint8)
    h = np.concatenate(hashes)
    k = np.concatenate(kinds)
    if not len(h) or not (k != k[0]).any():  # one kind (the usual case): a plain sort is enough
        h.sort()
        keep = np.ones(len(h), dtype=bool)
        keep[1:] = h[1:] != h[:-1]
        return h[keep], k[keep]
    order = np.lexsort((k, h))
    h, k = h[order], k[order]
    keep = np.ones(len(h), dtype=bool)
    keep[1:] = (h[1:] != h[:-1]) | (k[1:] != k[:-1])
    return h[keep], k[keep]
