"""http_policy: ask an HTTP service whether a name may be resolved (README.md beside
pyproject.toml documents the options, metrics and examples).

Written from docs/writing-a-plugin.md only: a verdict in memory is decided in `query`;
otherwise the step returns AWAIT and asks the service in `resolve`, within its own
``timeout``, which must stay below the step's ``deadline`` so a slow service costs the
query the configured fail-open or fail-closed answer rather than a SERVFAIL.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import attrs
import httpx
import trio

from dnsproxy import options, wire
from dnsproxy.chain import AWAIT, Metric, Setup, Step
from dnsproxy.hookspecs import hookimpl
from dnsproxy.registry import Registry
from dnsproxy.reply import EDE_BLOCKED, Reply, respond

# httpx logs every request at INFO: far too much for a query path.
logging.getLogger("httpx").setLevel(logging.WARNING)

LOG_EVERY = 60.0  # seconds between two log lines about a failing service


def _url(value: object) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value


@attrs.frozen
class PolicyOptions:
    url: str = attrs.field(converter=_url)  # required: GET url?name=<name> -> {"allow": bool}
    timeout: float = options.seconds("1s", 0.01, 60)
    on_error: Literal["allow", "deny"] = "allow"
    cache_ttl: float = options.seconds("60s", 0, 86400)
    max_cache: int = attrs.field(default=10_000, validator=options.in_range(0, 10_000_000))
    max_concurrent: int = attrs.field(default=32, validator=options.in_range(1, 1024))


class HttpPolicy(Step):
    """REFUSED (EDE 15, Blocked) for the names the service does not allow."""

    Options = PolicyOptions

    def __init__(self, opts: PolicyOptions, setup: Setup) -> None:
        super().__init__(opts, setup)
        if opts.timeout >= setup.deadline:
            raise setup.error(
                "timeout",
                f"{opts.timeout:g} s must be below the step's deadline ({setup.deadline:g} s),"
                " or the deadline answers SERVFAIL before on_error applies",
            )
        self.http = httpx.AsyncClient(
            timeout=opts.timeout,
            trust_env=False,
            limits=httpx.Limits(max_connections=opts.max_concurrent),
        )
        self.slots = trio.CapacityLimiter(opts.max_concurrent)
        self.verdicts: dict[bytes, tuple[bool, float]] = {}  # key -> (allow, expires)
        self.counts = dict.fromkeys(("allowed", "denied", "cached", "errors", "timeouts"), 0)
        self.logged = -LOG_EVERY

    def query(self, q: wire.Query) -> Reply | None:
        verdict = self.verdicts.get(q.key)
        if verdict is None:
            return AWAIT
        allow, expires = verdict
        if expires <= time.monotonic():
            del self.verdicts[q.key]
            return AWAIT
        self.counts["cached"] += 1
        return self._decide(q, allow, "cached verdict")

    async def resolve(self, q: wire.Query) -> Reply | None:
        allow = await self._ask(wire.key_to_text(q.key))
        if allow is None:
            return self._decide(q, self.options.on_error == "allow", "service failed")
        self._remember(q.key, allow)
        return self._decide(q, allow, "service verdict")

    async def _ask(self, name: str) -> bool | None:
        """The service's verdict on ``name``; None when it failed or took too long."""
        with trio.move_on_after(self.options.timeout):
            async with self.slots:
                try:
                    resp = await self.http.get(self.options.url, params={"name": name})
                    resp.raise_for_status()
                    allow = resp.json().get("allow")
                except (httpx.HTTPError, ValueError, AttributeError) as exc:
                    return self._failed("errors", repr(exc))
            if isinstance(allow, bool):
                return allow
            return self._failed("errors", f'no boolean "allow" in {resp.text[:80]!r}')
        return self._failed("timeouts", f"no answer within {self.options.timeout:g} s")

    def _failed(self, kind: str, why: str) -> None:
        self.counts[kind] += 1
        now = time.monotonic()
        if now - self.logged >= LOG_EVERY:  # a failing service must not flood the log
            self.logged = now
            self.log.warning(
                "%s: %s: %s (%d errors, %d timeouts so far); on_error = %s",
                self.setup.where, self.options.url, why,
                self.counts["errors"], self.counts["timeouts"], self.options.on_error,
            )  # fmt: skip

    def _remember(self, key: bytes, allow: bool) -> None:
        opts = self.options
        if not opts.cache_ttl or not opts.max_cache:
            return
        if len(self.verdicts) >= opts.max_cache:
            del self.verdicts[next(iter(self.verdicts))]  # the oldest entry
        self.verdicts[key] = (allow, time.monotonic() + opts.cache_ttl)

    def _decide(self, q: wire.Query, allow: bool, why: str) -> Reply | None:
        if allow:
            self.counts["allowed"] += 1
            q.explain(f"{self.setup.where}: allowed ({why})")
            return None  # pass the query on
        self.counts["denied"] += 1
        q.note("rule", f"http_policy ({why})")
        q.explain(f"{self.setup.where}: denied ({why})")
        # EDE 15 (Blocked) makes /metrics, /api/stats, the dashboard and the query log
        # count the answer as blocked; the note says why.
        return respond(
            q, wire.REFUSED, ede=[(EDE_BLOCKED, "denied by policy")], source=self.setup.name
        )

    async def run(self) -> None:
        """Hold the HTTP client for the chain's life; close it when the chain retires."""
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(deadline=trio.current_time() + 1, shield=True):
                await self.http.aclose()

    def flush(self) -> None:
        self.verdicts.clear()

    def metrics(self) -> list[Metric]:
        out = [Metric(kind, n) for kind, n in self.counts.items()]
        out.append(Metric("verdicts", len(self.verdicts), "gauge", help="verdicts cached"))
        return out


@hookimpl
def dnsproxy_add_steps(registry: Registry) -> None:
    registry.add_step("http_policy", HttpPolicy)
