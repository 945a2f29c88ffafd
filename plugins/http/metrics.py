"""What the HTTP service counts per query, and how /metrics renders it.

Per query (the observer from ``dnsproxy_observers``, hot path) `Observed.observe` only bumps
plain dict and list counters; prometheus-client objects are never touched per query
(their locks and label lookups cost more than a cache hit). Label values come from bounded
sets (a qtype outside `QTYPES` counts as ``other``), so no client can grow the series.

At scrape time `Collector.snapshot` copies those counters, the core's `Stats` and every
step's `metrics()` on the event loop (plain copies of bounded data); the `Snapshot` turns
them into metric families in a worker thread, so rendering never stalls DNS.
"""

from __future__ import annotations

import collections
import re
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import dns.rcode
import dns.rdatatype
from prometheus_client.core import HistogramMetricFamily, Metric

from dnsproxy.chain import Metric as StepMetric
from dnsproxy.chain import Setup
from dnsproxy.reply import Reply
from dnsproxy.wire import Query, key_to_text

if TYPE_CHECKING:
    from dnsproxy.server import Server

# Latency buckets in seconds: a cache hit is tens of microseconds, an upstream miss ms to s.
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
          2.5, 5.0)  # fmt: skip
DROPPED = -1  # rcode key of a query that got no response
OTHER = -2  # qtype key of a type outside QTYPES
QTYPES = frozenset(int(t) for t in dns.rdatatype.RdataType if t)  # types known by name
RCODES = frozenset(int(r) for r in dns.rcode.Rcode)
CORE_COUNTERS = ("queries", "dropped", "formerr", "refused_acl", "servfail_overload",
                 "step_errors", "step_timeouts", "tcp_rejected", "tcp_evicted",
                 "tls_handshake_failures", "packet_hits")  # fmt: skip
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

    def copy(self) -> Bucket:
        out = Bucket(self.start)
        out.queries, out.blocked = self.queries, self.blocked
        out.clients_untracked, out.names_untracked = self.clients_untracked, self.names_untracked
        out.clients, out.names = dict(self.clients), dict(self.names)
        return out


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
        qtype = q.qtype if q.qtype in QTYPES else OTHER
        key = (q.transport, qtype, DROPPED if reply is None else reply.wire[3] & 0xF)
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
        if reply is not None and reply.blocked:
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

    def copy(self) -> Observed:
        """The stats history, for reading in a worker thread while the loop counts on:
        past buckets no longer change and are shared, the current one is copied."""
        out = Observed(self.bucket_seconds, self.history.maxlen or 1, self.max_keys, 0.0)
        out.bucket = self.bucket.copy()
        out.history = collections.deque(self.history, self.history.maxlen)
        out.history[-1] = out.bucket
        return out

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
    if rcode == DROPPED:
        return "DROPPED"
    return dns.rcode.to_text(rcode) if rcode in RCODES else "other"


def _qtype_text(qtype: int) -> str:
    return dns.rdatatype.to_text(qtype) if qtype in QTYPES else "other"


@attrs.frozen
class StepSamples:
    """One step's `metrics()` at scrape time, counters already made monotonic."""

    plugin: str
    index: int
    samples: tuple[StepMetric, ...]


@attrs.frozen
class Snapshot:
    """Everything one scrape exports, copied on the event loop; `collect` (called by
    prometheus-client's ``generate_latest``) may then run in a worker thread."""

    requests: tuple[tuple[tuple[str, int, int], int], ...]
    hist: tuple[int, ...]
    elapsed_sum: float
    core: tuple[tuple[str, int], ...]
    tcp_connections: int
    ready: bool
    steps: tuple[StepSamples, ...]

    def collect(self) -> Iterator[Metric]:
        fam = Metric("dnsproxy_requests", "Queries answered by transport, qtype, rcode.", "counter")
        totals: collections.Counter[tuple[str, str, str]] = collections.Counter()
        for (transport, qtype, rcode), n in self.requests:
            totals[(transport, _qtype_text(qtype), _rcode_text(rcode))] += n
        for (transport, qtype_text, rcode_text), n in sorted(totals.items()):
            labels = {"transport": transport, "qtype": qtype_text, "rcode": rcode_text}
            fam.add_sample("dnsproxy_requests_total", labels, n)
        yield fam

        cumulative = []
        running = 0
        for bound, n in zip((*map(str, BOUNDS), "+Inf"), self.hist, strict=True):
            running += n
            cumulative.append((bound, running))
        yield HistogramMetricFamily(
            "dnsproxy_request_duration_seconds",
            "Time from receiving a query to sending its response.",
            buckets=cumulative,
            sum_value=self.elapsed_sum,
        )
        for field, value in self.core:
            fam = Metric(f"dnsproxy_{field}", f"Core counter {field}.", "counter")
            fam.add_sample(f"dnsproxy_{field}_total", {}, value)
            yield fam
        fam = Metric("dnsproxy_tcp_connections", "Open client TCP connections.", "gauge")
        fam.add_sample("dnsproxy_tcp_connections", {}, self.tcp_connections)
        yield fam
        fam = Metric("dnsproxy_ready", "1 when every step is ready.", "gauge")
        fam.add_sample("dnsproxy_ready", {}, 1 if self.ready else 0)
        yield fam
        yield from _step_families(self.steps)


def _step_families(steps: Iterable[StepSamples]) -> Iterator[Metric]:
    families: dict[str, Metric] = {}
    for step in steps:
        plugin = _UNSAFE.sub("_", step.plugin)
        for m in step.samples:
            name = f"dnsproxy_{plugin}_{_UNSAFE.sub('_', m.name)}"
            kind = "gauge" if m.kind == "gauge" else "counter"
            fam = families.get(name)
            if fam is None:
                fam = families[name] = Metric(name, m.help or f"{plugin} {m.name}", kind)
            elif fam.type != kind:
                continue  # one name, one type: the first step's declaration wins
            labels = {"step": str(step.index), **dict(m.labels)}
            fam.add_sample(name + "_total" if kind == "counter" else name, labels, m.value)
    yield from families.values()


SeriesKey = tuple[str, int, str, tuple[tuple[str, str], ...]]  # plugin, index, name, labels


class Collector:
    """Takes `Snapshot`s of the core counters plus every step's metrics.

    Remembers, per step counter series (plugin, chain index, name, labels), the last raw
    value and an offset: a reload may replace a step whose counters then restart lower,
    and the exported counter must not go backwards (``rate()`` would read a reset).
    """

    def __init__(self, server: Server, observed: Observed) -> None:
        self.server = server
        self.observed = observed
        self.counters: dict[SeriesKey, tuple[float, float]] = {}  # raw last value, offset

    def snapshot(self) -> Snapshot:
        obs = self.observed
        stats = self.server.stats
        return Snapshot(
            requests=tuple(obs.requests.items()),
            hist=tuple(obs.hist),
            elapsed_sum=obs.elapsed_sum,
            core=tuple((field, getattr(stats, field)) for field in CORE_COUNTERS),
            tcp_connections=stats.tcp_connections,
            ready=self.server.chain.ready(),
            steps=tuple(
                StepSamples(setup.name, setup.index, tuple(self._monotonic(setup, samples)))
                for setup, samples in self.server.step_metrics()
            ),
        )

    def note_counters(self) -> None:
        """Read every step's counters now (after a chain swap: a fresh step reads low)."""
        for s in self.server.chain.steps:
            for _ in self._monotonic(s.setup, s.metrics()):
                pass

    def _monotonic(self, setup: Setup, samples: list[StepMetric]) -> Iterator[StepMetric]:
        for m in samples:
            if m.kind == "gauge":
                yield m
                continue
            key = (setup.name, setup.index, m.name, m.labels)
            last, offset = self.counters.get(key, (0.0, 0.0))
            if m.value < last:  # the step was replaced and restarted counting
                offset += last
            self.counters[key] = (m.value, offset)
            yield attrs.evolve(m, value=m.value + offset) if offset else m
