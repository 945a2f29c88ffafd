"""Warnings about a valid config that probably does not do what its author meant.

`dnsproxy check` prints these and still exits 0: the config works, but part of it never
will. The main case is split-DNS written in the wrong order: a general ``forward`` answers
every query that reaches it, so a step scoped to ``corp.example.org`` placed after it is
never consulted (dnsmasq and CoreDNS pick the most specific zone; we run steps in file
order, which is predictable but easy to get backwards).
"""

from __future__ import annotations

import ipaddress

from dnsproxy import wire
from dnsproxy.config import Config, Network, StepConfig

# Step types that answer every query in their scope (they never pass one on).
TERMINAL = frozenset({"forward"})


def _zones_covered(inner: tuple[bytes, ...], outer: tuple[bytes, ...]) -> bool:
    """Whether every name ``inner`` scopes to is also in ``outer`` (() means all names)."""
    if not outer:
        return True
    if not inner:
        return False
    outer_set = set(outer)
    return all(any(p in outer_set for p in wire.parents(z)) for z in inner)


def _clients_covered(inner: tuple[Network, ...], outer: tuple[Network, ...]) -> bool:
    """Whether every client ``inner`` scopes to is also in ``outer`` (() means everyone)."""
    if not outer:
        return True
    if not inner:
        return False
    return all(any(_subnet(n, o) for o in outer) for n in inner)


def _subnet(net: Network, outer: Network) -> bool:
    if net.version != outer.version:
        return False
    if isinstance(net, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return net.subnet_of(outer)
    if isinstance(net, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return net.subnet_of(outer)
    return False


def _scope_text(step: StepConfig) -> str:
    parts = []
    if step.zones:
        parts.append("zones " + ", ".join(wire.key_to_text(z) or "." for z in step.zones))
    if step.clients:
        parts.append("clients " + ", ".join(str(n) for n in step.clients))
    return " and ".join(parts) if parts else "every query"


def unreachable(cfg: Config) -> list[str]:
    """One warning per step (or per zone of a step) that an earlier terminal step answers."""
    out = []
    for j, later in enumerate(cfg.chain):
        shadowed: list[bytes] = []
        for earlier in cfg.chain[:j]:
            if earlier.plugin not in TERMINAL or not _clients_covered(
                later.clients, earlier.clients
            ):
                continue
            if _zones_covered(later.zones, earlier.zones):
                out.append(
                    f"{later.where}: warning: never reached: {earlier.where} answers"
                    f" {_scope_text(earlier)} first; move this step above it"
                )
                shadowed = []
                break
            shadowed += [
                z for z in later.zones if z not in shadowed and _zones_covered((z,), earlier.zones)
            ]
        if shadowed:
            names = ", ".join(wire.key_to_text(z) for z in shadowed)
            out.append(
                f"{later.where}: warning: never reached for {names}: an earlier forward"
                " answers those names first; move this step above it"
            )
    return out


def lint(cfg: Config) -> list[str]:
    """Every warning for ``cfg``, one line each, prefixed with the step they concern."""
    return unreachable(cfg)
