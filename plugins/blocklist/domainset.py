"""The compact domain set: every loaded list's names as sorted 64-bit hashes.

Python ``bytes`` in a ``set`` cost an object and a table slot per name; here each name costs
8 bytes of hash plus 2 bytes of tag (which list, which kind of rule), and a bucket index
of 4 bytes per power-of-two slot makes a probe two array reads and usually one compare,
whatever the size of the set.

Hashes are Python's ``hash()`` of the lower-case wire form of the name (``q.key`` and
its parents are slices of it, so a query hashes each suffix without any conversion). For bytes
that is SipHash keyed with a per-process random key, so a list author cannot craft
names that collide with other names (a collision would only block a name that shares a
64-bit hash with a listed one: about one in 10^13 per lookup for a 1M list).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np

from dnsproxy import wire

from .parse import ALLOW, EXACT, IMPORTANT, KIND_BITS, SUBONLY

NO_MATCH = -1


def pattern_text(key: bytes) -> str | None:
    """The text of a wire name key that pattern rules match, without the final dot.

    None for the root and for names that text can only show escaped (a dot or a byte
    outside printable ASCII inside a label, RFC 1035 §5.1): no pattern matches those.
    """
    text = wire.key_to_text(key)
    return None if text == "." or "\\" in text else text


def cname_rdata(msg: bytes, limit: int) -> list[int]:
    """Where the rdata of the first ``limit`` CNAMEs of the answer section start.

    Walks only the question and answer sections, with every length checked (cheaper
    than `Reply.records`, which this runs instead of for every reply passing back).
    Raises ValueError on a malformed message.
    """
    if len(msg) < 12:
        raise ValueError("short message")
    qdcount = (msg[4] << 8) | msg[5]
    ancount = (msg[6] << 8) | msg[7]
    off = 12
    for _ in range(qdcount):
        off = wire.skip_name(msg, off) + 4
    found = []
    for _ in range(ancount):
        off = wire.skip_name(msg, off)
        if off + 10 > len(msg):
            raise ValueError("record past the end")
        if msg[off] == 0 and msg[off + 1] == wire.CNAME:
            found.append(off + 10)
            if len(found) >= limit:
                break
        off += 10 + ((msg[off + 8] << 8) | msg[off + 9])
    return found


class DomainSet:
    """Sorted hashes with a bucket index, and the patterns of the same lists."""

    def __init__(
        self,
        hashes: np.ndarray,
        tags: np.ndarray,
        patterns: Sequence[tuple[str, int]] = (),
    ) -> None:
        """``hashes`` sorted int64; ``tags`` uint16 (list index << KIND_BITS | kind)."""
        n = len(hashes)
        self.size = n
        bits = max(1, (n - 1).bit_length())
        self._shift = 64 - bits
        self._half = 1 << (bits - 1)
        self._hash_array = np.ascontiguousarray(hashes, dtype=np.int64)
        self._tag_array = np.ascontiguousarray(tags, dtype=np.uint16)
        buckets = (self._hash_array >> self._shift) + self._half
        index = np.searchsorted(buckets, np.arange((1 << bits) + 1)).astype(np.uint32)
        self._index_array = index
        # memoryviews give plain ints on item access, at a fraction of numpy's cost.
        self._hashes = memoryview(self._hash_array)
        self._tags = memoryview(self._tag_array)
        self._index = memoryview(index)
        self.patterns = _Patterns(patterns) if patterns else None
        if self.patterns is None and not (self._tag_array & (ALLOW | IMPORTANT)).any():
            self.verdict = self.decide = self._first_block  # type: ignore[method-assign]

    @property
    def nbytes(self) -> int:
        return self._hash_array.nbytes + self._tag_array.nbytes + self._index_array.nbytes

    def verdict(self, key: bytes) -> int:
        """The tag of the rule that blocks this name, or NO_MATCH (none, or allowed)."""
        tag = self.decide(key)
        return NO_MATCH if tag & ALLOW else tag

    def decide(self, key: bytes) -> int:
        """`verdict`, except that an exception that overrode a block gives its own tag.

        So the step can say which exception let a listed name through, at no cost to
        names that match nothing. Precedence: important exception > important block >
        exception > block; among blocks and among exceptions, the most specific name wins
        (it names the list in the answer).
        """
        matched = list(self._matches(key))
        if self.patterns is not None:
            matched += self.patterns.match(key)
        block = imp_block = allow = imp_allow = NO_MATCH
        for tag in matched:
            if tag & ALLOW:
                if tag & IMPORTANT:
                    imp_allow = tag if imp_allow < 0 else imp_allow
                elif allow < 0:
                    allow = tag
            elif tag & IMPORTANT:
                imp_block = tag if imp_block < 0 else imp_block
            elif block < 0:
                block = tag
        if block < 0 and imp_block < 0:
            return NO_MATCH  # exceptions alone decide nothing
        if imp_allow >= 0:
            return imp_allow
        if imp_block >= 0:
            return imp_block
        return allow if allow >= 0 else block

    def matches(self, key: bytes) -> list[tuple[int, int | str]]:
        """Every rule matching ``key``, most specific name first, then the patterns: (tag,
        offset in ``key`` of the listed name, or the pattern's regex). For explanations."""
        out: list[tuple[int, int | str]] = []
        hashes, tags, index = self._hashes, self._tags, self._index
        off = 0
        while key[off]:
            h = hash(key[off:])
            b = (h >> self._shift) + self._half
            for i in range(index[b], index[b + 1]):
                if hashes[i] == h and not tags[i] & (EXACT if off else SUBONLY):
                    out.append((tags[i], off))
            off += key[off] + 1
        if self.patterns is not None:
            name = pattern_text(key)
            if name is not None:
                out += [(tag, rx.pattern) for rx, tag in self.patterns.rules if rx.search(name)]
        return out

    def _matches(self, key: bytes) -> Iterator[int]:
        """Tags of the listed names among ``key`` and its parents, most specific first."""
        hashes, tags, index = self._hashes, self._tags, self._index
        shift, half = self._shift, self._half
        off = 0
        while key[off]:
            h = hash(key[off:]) if off else hash(key)
            b = (h >> shift) + half
            i = index[b]
            end = index[b + 1]
            while i < end:
                if hashes[i] == h and not tags[i] & (EXACT if off else SUBONLY):
                    yield tags[i]
                i += 1
            off += key[off] + 1

    def _first_block(self, key: bytes) -> int:
        """`verdict` for sets of plain blocks: the most specific match, found first, wins.

        The walk of `_matches`, inlined: this is the blocked-answer path, where resuming
        a generator per match would be a large share of the lookup's cost.
        """
        hashes, tags, index = self._hashes, self._tags, self._index
        shift, half = self._shift, self._half
        off = 0
        while key[off]:
            h = hash(key[off:]) if off else hash(key)
            b = (h >> shift) + half
            i = index[b]
            end = index[b + 1]
            while i < end:
                if hashes[i] == h and not tags[i] & (EXACT if off else SUBONLY):
                    return tags[i]
                i += 1
            off += key[off] + 1
        return NO_MATCH


class _Patterns:
    """Wildcard and regex rules: one combined regex decides whether any rule matches.

    Only on a match are the rules tried one by one to find which (and which list); a
    name no pattern matches costs one regex search.
    """

    def __init__(self, patterns: Sequence[tuple[str, int]]) -> None:
        self.rules = [(re.compile(src), tag) for src, tag in patterns]
        self.any = re.compile("|".join(f"(?:{src})" for src, _ in patterns))

    def match(self, key: bytes) -> list[int]:
        name = pattern_text(key)
        if name is None or self.any.search(name) is None:
            return []
        return [tag for rx, tag in self.rules if rx.search(name)]


def merge(
    lists: Sequence[tuple[int, np.ndarray, np.ndarray, Sequence[tuple[str, int]]]],
) -> DomainSet:
    """One DomainSet from parsed lists: (list index, hashes, kinds, patterns) each."""
    if not lists:
        return DomainSet(np.empty(0, np.int64), np.empty(0, np.uint16))
    if len(lists) == 1:  # already sorted: no copy
        i, h, k, pats = lists[0]
        tags = k.astype(np.uint16) | np.uint16(i << KIND_BITS)
        return DomainSet(h, tags, [(src, kind | (i << KIND_BITS)) for src, kind in pats])
    hashes = np.concatenate([h for _, h, _, _ in lists])
    tags = np.concatenate(
        [(k.astype(np.uint16) | np.uint16(i << KIND_BITS)) for i, _, k, _ in lists]
    )
    order = np.argsort(hashes, kind="stable")
    patterns = [(src, kind | (i << KIND_BITS)) for i, _, _, pats in lists for src, kind in pats]
    return DomainSet(hashes[order], tags[order], patterns)
