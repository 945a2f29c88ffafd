"""What the HTTP service counts per query, and how /metrics renders it.

Per query (the observer from ``dnsproxy_observers``, hot path) `Observed.observe` only bumps
plain dict and list counters; prometheus-client objects are never touched per query
(their locks and label lookups cost more than a cache hit). At scrape time a custom
collector turns those counters, the core's `Stats` and every step's `metrics()` into
metric families.
"""

from __future__ import annotations

import collections
import re
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import dns.rcode
import dns.rdatatype
from prometheus_client.core import HistogramMetricFamily, Metric

from dnsproxy.reply import Reply
from dnsproxy.wire import Query, key_to_text

if TYPE_CHECKING:
    from dnsproxy.server import Server

# Latency buckets in seconds: a cache hit is tens of microseconds, an upstream miss ms to s.
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
          2.5, 5.0)  # fmt: skip
BLOCKING_SOURCES = frozenset({"blocklist"})  # reply.source values counted as blocked
DROPPED = -1  # rcode key of a query that got no response
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


class Bucket:
    """Counts for one stats interval; the dicts hold at most ``max_keys`` keys each."""

    __slots__ = (
        "blocked",
        "clients",
        "clients_untracked",
        "names",
        "names_untracked",
        "queries",
        "start",
    )

    def __init__(self, start: float) -> None:
        self.start = start
        self.queries = 0
        self.blocked = 0
        self.clients_untracked = 0  # queries from clients beyond max_keys: not in the top
        self.names_untracked = 0  # blocked answers for names beyond max_keys
        self.clients: dict[str, int] = {}
        self.names: dict[bytes, int] = {}  # blocked names, by wire key


class Observed:
    """Counters fed by the observer hook and read by the collector and /api/stats."""

    def __init__(self, bucket_seconds: float, buckets: int, max_keys: int, now: float) -> None:
        self.requests: dict[tuple[str, int, int], int] = {}
        self.hist = [0] * (len(BOUNDS) + 1)
        self.elapsed_sum = 0.0
        self.bucket_seconds = bucket_seconds
        self.max_keys = max_keys
        self.bucket = Bucket(now)
        self.history: collections.deque[Bucket] = collections.deque([self.bucket], buckets)

    def observe(self, q: Query, reply: Reply | None, elapsed: float) -> None:
        """Hot path: plain increments only."""
        key = (q.transport, q.qtype, DROPPED if reply is None else reply.wire[3] & 0xF)
        req = self.requests
        req[key] = req.get(key, 0) + 1
        self.hist[bisect_left(BOUNDS, elapsed)] += 1
        self.elapsed_sum += elapsed
        b = self.bucket
        b.queries += 1
        counts = b.clients
        host = q.client[0]
        if host in counts:
            counts[host] += 1
        elif len(counts) < self.max_keys:
            counts[host] = 1
        else:
            b.clients_untracked += 1
        if reply is not None and reply.source in BLOCKING_SOURCES:
            b.blocked += 1
            names = b.names
            if q.key in names:
                names[q.key] += 1
            elif len(names) < self.max_keys:
                names[q.key] = 1
            else:
                b.names_untracked += 1

    def rotate(self, now: float) -> None:
        """Start a new stats interval (from the service's background task)."""
        self.bucket = Bucket(now)
        self.history.append(self.bucket)

    def stats(self, now: float, windows: dict[str, float], top: int) -> dict[str, Any]:
        out = {}
        for label, span in windows.items():
            picked = [b for b in self.history if b.start > now - span - self.bucket_seconds]
            clients: collections.Counter[str] = collections.Counter()
            names: collections.Counter[bytes] = collections.Counter()
            for b in picked:
                clients.update(b.clients)
                names.update(b.names)
            total = sum(b.queries for b in picked)
            blocked = sum(b.blocked for b in picked)
            out[label] = {
                "queries": total,
                "blocked": blocked,
                "blocked_share": round(blocked / total, 4) if total else 0.0,
                "top_blocked": [
                    {"name": key_to_text(k) + ".", "count": c} for k, c in names.most_common(top)
                ],
                "top_clients": [{"client": h, "count": c} for h, c in clients.most_common(top)],
                # counted, but past stats_max_keys: the top lists leave these out
                "untracked": {
                    "clients": sum(b.clients_untracked for b in picked),
                    "blocked_names": sum(b.names_untracked for b in picked),
                },
            }
        return out


def _rcode_text(rcode: int) -> str:
    return "DROPPED" if rcode == DROPPED else dns.rcode.to_text(rcode)


class Collector:
    """prometheus-client collector: core counters plus dnsproxy_<plugin>_<metric> per step."""

    def __init__(self, server: Server, observed: Observed) -> None:
        self.server = server
        self.observed = observed

    def collect(self) -> Iterator[Metric]:
        obs = self.observed
        fam = Metric("dnsproxy_requests", "Queries answered by transport, qtype, rcode.", "counter")
        for (transport, qtype, rcode), n in sorted(obs.requests.items()):
            labels = {
                "transport": transport,
                "qtype": dns.rdatatype.to_text(qtype),
                "rcode": _rcode_text(rcode),
            }
            fam.add_sample("dnsproxy_requests_total", labels, n)
        yield fam

        cumulative = []
        running = 0
        for bound, n in zip((*map(str, BOUNDS), "+Inf"), obs.hist, strict=True):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "dnsproxy_request_duration_seconds",
            "Time from receiving a query to sending its response.",
            buckets=cumulative,
            sum_value=obs.elapsed_sum,
        )

        stats = self.server.stats
        for field in ("queries", "dropped", "formerr", "refused_acl", "servfail_overload",
                      "step_errors", "tcp_rejected"):  # fmt: skip
            fam = Metric(f"dnsproxy_{field}", f"Core counter {field}.", "counter")
            fam.add_sample(f"dnsproxy_{field}_total", {}, getattr(stats, field))
            yield fam
        fam = Metric("dnsproxy_tcp_connections", "Open client TCP connections.", "gauge")
        fam.add_sample("dnsproxy_tcp_connections", {}, stats.tcp_connections)
        yield fam
        fam = Metric("dnsproxy_ready", "1 when every step is ready.", "gauge")
        fam.add_sample("dnsproxy_ready", {}, 1 if self.server.chain.ready() else 0)
        yield fam
        yield from self.step_metrics()

    def step_metrics(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for step in self.server.chain.steps:
            plugin = _UNSAFE.sub("_", step.setup.name)
            for m in step.metrics():
                name = f"dnsproxy_{plugin}_{_UNSAFE.sub('_', m.name)}"
                kind = "gauge" if m.kind == "gauge" else "counter"
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = Metric(name, m.help or f"{plugin} {m.name}", kind)
                elif fam.type != kind:
                    continue  # one name, one type: the first step's declaration wins
                labels = {"step": str(step.setup.index), **dict(m.labels)}
                fam.add_sample(name + "_total" if kind == "counter" else name, labels, m.value)
        yield from families.values()
