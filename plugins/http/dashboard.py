"""The dashboard: server-rendered pages (Jinja2) with htmx for live parts and uPlot for
the overview chart, both vendored under static/vendor (no internet, no node).

Pages: overview (/), query log (/log, one row: /log/{id}), managed allow/block lists
(/managed), blocking pause (/blocking), every blocklist's lists (/lists), cache (/cache),
login (/login). Everything is read from what the server already keeps (the query log's
SQLite file through `dnsproxy_query_logs`, the in-memory stats, the steps' public state)
at request time, in worker threads where it touches the disk: serving a page adds no
work per DNS query. State changes are POSTs with the session's CSRF token (`App.authorize`).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import jinja2
import trio
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from dnsproxy import options

from .app import COOKIE, MAX_DISABLE, HttpError, Principal, json_response
from .auth import verify_password

if TYPE_CHECKING:
    from dnsproxy.chain import Metric, Setup, Step

    from .app import App

HERE = Path(__file__).parent
DAY, CHART_STEP = 86400.0, 600.0  # the overview chart: 24 h in 10 min bars
OVERVIEW_TTL = 30.0  # seconds an overview is reused: on a big log it reads every row of 24 h
TOP = 10
PAUSES = {"5m": 300.0, "1h": 3600.0, "forever": None}


def _when(ts: float | None) -> str:
    if ts is None:
        return "—"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _local_time(text: str, key: str) -> float | None:
    """A ``datetime-local`` form value (server's local time) as a Unix time."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise HttpError(400, f"{key}: expected YYYY-MM-DDTHH:MM") from exc


class Dashboard:
    """The pages and their form actions; reads the server through ``app``."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.server = app.server
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
        )
        env.filters["when"] = _when
        self.templates = Jinja2Templates(env=env)
        self.overview_cache: tuple[float, dict[str, Any]] | None = None

    def routes(self) -> list[Route]:
        get = [
            ("/", self.overview),
            ("/ui/overview", self.overview_numbers),
            ("/ui/overview/chart", self.overview_chart),
            ("/log", self.log_page),
            ("/ui/log/rows", self.log_rows),
            ("/log/{rowid:int}", self.log_row),
            ("/trace", self.trace),
            ("/managed", self.managed_page),
            ("/blocking", self.blocking_page),
            ("/ui/blocking", self.blocking_part),
            ("/lists", self.lists_page),
            ("/cache", self.cache_page),
            ("/login", self.login_page),
        ]
        post = [
            ("/login", self.login),
            ("/logout", self.logout),
            ("/ui/allow", self.allow),
            ("/ui/block", self.block),
            ("/ui/managed/remove", self.managed_remove),
            ("/ui/blocking/pause", self.pause),
            ("/ui/blocking/resume", self.resume),
            ("/ui/lists/refresh", self.refresh_list),
            ("/ui/cache/flush", self.flush),
        ]
        return [Route(p, fn, methods=["GET"]) for p, fn in get] + [
            Route(p, fn, methods=["POST"]) for p, fn in post
        ]

    # --- rendering ------------------------------------------------------------------------

    async def _viewer(self, request: Request) -> Principal:
        """The principal of a page view; LoginRequired (a redirect) without one."""
        await self.app.authorize(request, write=False, api=False)
        who = self.app.principal(request)
        assert who is not None
        return who

    def _render(
        self, request: Request, who: Principal, name: str, ctx: dict[str, Any], status: int = 200
    ) -> Response:
        """The template with the session's CSRF token; a visitor without a session (no
        password configured, loopback only) is given one, so its buttons carry a token."""
        cookie = None
        nonce = who.nonce
        if nonce is None:
            cookie = self.app.sessions.new()
            nonce = self.app.sessions.check(cookie)
            assert nonce is not None
        context = {
            "csrf": self.app.sessions.csrf(nonce),
            "login": bool(self.app.opts.password_hash) and who.kind == "session",
            "path": request.url.path,
            **ctx,
        }
        resp = self.templates.TemplateResponse(request, name, context, status_code=status)
        resp.headers["cache-control"] = "no-store"
        if cookie is not None:
            self._set_cookie(resp, cookie)
        return resp

    def _set_cookie(self, resp: Response, value: str) -> None:
        resp.set_cookie(
            COOKIE, value, max_age=int(self.app.opts.session_ttl), httponly=True,
            samesite="strict", path="/",
        )  # fmt: skip

    def _back(self, request: Request, form: dict[str, str], default: str) -> Response:
        """After a form action: htmx gets 204 plus a refresh trigger, a plain form a 303
        back to the page it came from."""
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"hx-refresh": "true"})
        target = form.get("next", default)
        if not target.startswith("/") or target.startswith("//"):
            target = default
        return RedirectResponse(target, 303)

    # --- data -----------------------------------------------------------------------------

    def _log_db(self) -> Path | None:
        """The SQLite file of the first querylog step that has one."""
        found = self.server.pm.hook.dnsproxy_query_logs(server=self.server)
        for group in found:
            for log in group or ():
                path = log.db()
                if path is not None:
                    return path
        return None

    def _steps(self, attribute: str) -> list[Step]:
        """The running chain's steps that have ``attribute`` (public, duck-typed)."""
        return [s for s in self.server.chain.steps if hasattr(s, attribute)]

    async def _step_metrics(self) -> list[tuple[Setup, list[Metric]]]:
        """Every step's metrics as /metrics exports them (with workers > 1, summed over
        the workers: the supervisor's own steps answer no queries)."""
        await self.server.gather_metrics()
        return self.server.step_metrics()

    @staticmethod
    def _cache_stats(metrics: list[tuple[Setup, list[Metric]]]) -> dict[str, Any]:
        out = []
        hits = misses = 0
        for setup, samples in metrics:
            if setup.name != "cache":
                continue
            m = {x.name: x.value for x in samples if not x.labels}
            hits += int(m.get("hits", 0))
            misses += int(m.get("misses", 0))
            out.append({"where": setup.where, **m})
        total = hits + misses
        return {"steps": out, "hit_rate": round(hits / total, 4) if total else None}

    @staticmethod
    def _upstream_health(metrics: list[tuple[Setup, list[Metric]]]) -> list[dict[str, Any]]:
        out = []
        for setup, samples in metrics:
            rows: dict[str, dict[str, Any]] = {}
            for m in samples:
                labels = dict(m.labels)
                if m.name.startswith("upstream_") and "upstream" in labels:
                    rows.setdefault(labels["upstream"], {})[m.name] = m.value
            out += [{"where": setup.where, "upstream": k, **v} for k, v in rows.items()]
        return out

    async def _overview_data(self) -> dict[str, Any]:
        now = trio.current_time()
        if self.overview_cache is not None and self.overview_cache[0] > now:
            return self.overview_cache[1]
        data = await self.app.limited(self._compute_overview)
        self.overview_cache = (trio.current_time() + OVERVIEW_TTL, data)
        return data

    async def _compute_overview(self) -> dict[str, Any]:
        from dnsproxy.plugins.querylog import read

        path = self._log_db()
        wall = time.time()
        if path is not None:
            data = await trio.to_thread.run_sync(read.overview, path, wall, DAY, CHART_STEP, TOP)
            data["source"] = "querylog"
        else:
            history = self.app.observed.copy()
            data = await trio.to_thread.run_sync(_memory_overview, history, wall)
        metrics = await self._step_metrics()
        data["cache"] = self._cache_stats(metrics)
        health = {(u["where"], u["upstream"]): u for u in self._upstream_health(metrics)}
        data["upstream_health"] = list(health.values())
        data["blocking"] = self._blocking()
        totals = data["totals"]
        q = totals["queries"] or 0
        data["shares"] = {
            k: round(100 * (totals.get(k) or 0) / q, 1) if q else 0.0
            for k in ("blocked", "cached", "forwarded", "error")
        }
        return data

    def _blocking(self) -> dict[str, Any] | None:
        if not any(s.pausable for s in self.server.chain.steps):
            return None
        return self.server.blocking.status()

    # --- overview -------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        who = await self._viewer(request)
        return self._render(request, who, "overview.html", {"d": await self._overview_data()})

    async def overview_numbers(self, request: Request) -> Response:
        who = await self._viewer(request)
        return self._render(request, who, "_numbers.html", {"d": await self._overview_data()})

    async def overview_chart(self, request: Request) -> Response:
        await self._viewer(request)
        return json_response(200, (await self._overview_data())["chart"])

    # --- query log ------------------------------------------------------------------------

    def _filters(self, request: Request) -> tuple[Any, dict[str, str]]:
        from dnsproxy.plugins.querylog import read

        p = request.query_params
        given = {k: p.get(k, "").strip() for k in ("client", "name", "result", "rcode", "from",
                                                    "to")}  # fmt: skip
        if given["result"] and given["result"] not in read.RESULTS:
            raise HttpError(400, f"result must be one of {', '.join(read.RESULTS)}")
        before = p.get("before")
        try:
            before_id = int(before) if before else None
        except ValueError as exc:
            raise HttpError(400, "before must be a row id") from exc
        f = read.Filters(
            client=given["client"][:64],
            name=given["name"].lower()[:255],
            result=given["result"],
            rcode=given["rcode"].upper()[:16],
            since=_local_time(given["from"], "from"),
            until=_local_time(given["to"], "to"),
            before=before_id,
            limit=self.app.opts.log_page_size,
        )
        return f, {k: v for k, v in given.items() if v}

    async def _rows(self, request: Request) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from dnsproxy.plugins.querylog import read

        f, given = self._filters(request)
        path = self._log_db()
        if path is None:
            return [], {"given": given, "f": f, "no_log": True}
        rows = await self.app.limited(lambda: trio.to_thread.run_sync(read.page, path, f))
        older = None
        if len(rows) == f.limit:
            older = "?" + urlencode({**given, "before": rows[-1]["rowid"]})
        ctx = {"given": given, "f": f, "older": older, "query": urlencode(given),
               "results": read.RESULTS, "no_log": False}  # fmt: skip
        return rows, ctx

    async def log_page(self, request: Request) -> Response:
        who = await self._viewer(request)
        rows, ctx = await self._rows(request)
        return self._render(request, who, "log.html", {"rows": rows, **ctx})

    async def log_rows(self, request: Request) -> Response:
        who = await self._viewer(request)
        rows, ctx = await self._rows(request)
        return self._render(request, who, "_rows.html", {"rows": rows, **ctx})

    async def log_row(self, request: Request) -> Response:
        from dnsproxy.plugins.querylog import read

        who = await self._viewer(request)
        path = self._log_db()
        rowid = request.path_params["rowid"]
        row = None if path is None else await trio.to_thread.run_sync(read.one, path, rowid)
        if row is None:
            raise HttpError(404, f"no query log row {rowid}")
        return self._render(request, who, "row.html", {"row": row})

    async def trace(self, request: Request) -> Response:
        """Run a query through the chain now and show its trace (as GET /api/query)."""
        who = await self._viewer(request)
        p = request.query_params
        params = {k: p[k] for k in ("name", "type", "client") if p.get(k)}
        doc = await self.app.query(params)
        return self._render(request, who, "trace.html", {"doc": doc})

    # --- allow / block --------------------------------------------------------------------

    async def _managed_change(
        self, request: Request, change: Callable[[Any, str], Any]
    ) -> Response:
        form = await self.app.authorize(request, write=True, api=False)
        steps = self._steps("managed")
        if not steps:
            raise HttpError(409, "no blocklist step: nothing to allow or block")
        name = form.get("name", "")
        try:
            change(steps[0].managed, name)
        except ValueError as exc:
            raise HttpError(400, str(exc)) from exc
        await self._apply_managed(steps)
        return self._back(request, form, "/managed")

    async def _apply_managed(self, steps: list[Step]) -> None:
        """Have every blocklist step re-read the managed lists, then flush the caches: a
        cached answer must not outlive the click that changed it."""
        for step in steps:
            await step.apply_managed()  # type: ignore[attr-defined]
        self.server.flush()

    async def allow(self, request: Request) -> Response:
        return await self._managed_change(request, lambda m, n: m.add("allow", n))

    async def block(self, request: Request) -> Response:
        return await self._managed_change(request, lambda m, n: m.add("block", n))

    async def managed_remove(self, request: Request) -> Response:
        form = await self.app.authorize(request, write=True, api=False)
        kind = form.get("kind", "")
        if kind not in ("allow", "block"):
            raise HttpError(400, "kind must be allow or block")
        steps = self._steps("managed")
        if not steps:
            raise HttpError(409, "no blocklist step")
        try:
            steps[0].managed.remove(kind, form.get("name", ""))  # type: ignore[attr-defined]
        except ValueError as exc:
            raise HttpError(400, str(exc)) from exc
        await self._apply_managed(steps)
        return self._back(request, form, "/managed")

    async def managed_page(self, request: Request) -> Response:
        who = await self._viewer(request)
        steps = self._steps("managed")
        lists = {}
        if steps:
            managed = steps[0].managed  # type: ignore[attr-defined]
            lists = {k: managed.entries(k) for k in ("block", "allow")}
        return self._render(request, who, "managed.html", {"lists": lists, "any": bool(steps)})

    # --- blocking, lists, cache -----------------------------------------------------------

    async def blocking_page(self, request: Request) -> Response:
        who = await self._viewer(request)
        return self._render(request, who, "blocking.html", self._blocking_context())

    async def blocking_part(self, request: Request) -> Response:
        who = await self._viewer(request)
        return self._render(request, who, "_blocking.html", self._blocking_context())

    def _blocking_context(self) -> dict[str, Any]:
        """Blocking for all, and per [groups] group: paused (with its end) or not."""
        paused = self.server.blocking.group_status()
        names = sorted(g.name for g in self.server.config.clients.groups)
        return {"b": self._blocking(), "groups": [(g, paused.get(g)) for g in names]}

    async def pause(self, request: Request) -> Response:
        """Pause blocking for everyone, or for one [groups] group (form field ``group``)."""
        form = await self.app.authorize(request, write=True, api=False)
        if self._blocking() is None:
            raise HttpError(409, "no step supports blocking control (no blocklist step?)")
        group = self.app.group_param(form)
        text = form.get("duration", "")
        if text in PAUSES:
            duration = PAUSES[text]
        else:
            try:
                duration = options.duration(text)
            except (TypeError, ValueError) as exc:
                raise HttpError(400, f"duration: {exc}") from exc
            if not 0 < duration <= MAX_DISABLE:
                raise HttpError(400, f"duration must be > 0 and at most {MAX_DISABLE:g} s")
        if group is None:
            self.server.blocking.pause(duration)
        else:
            self.server.blocking.pause_group(group, duration)
        return self._back(request, form, "/blocking")

    async def resume(self, request: Request) -> Response:
        form = await self.app.authorize(request, write=True, api=False)
        group = self.app.group_param(form)
        if group is None:
            self.server.blocking.resume()
        else:
            self.server.blocking.resume_group(group)
        return self._back(request, form, "/blocking")

    async def lists_page(self, request: Request) -> Response:
        who = await self._viewer(request)
        steps = []
        for step in self._steps("managed_sources"):
            lists = []
            for src in step.sources:  # type: ignore[attr-defined]
                parsed = src.parsed
                kind = "allow" if src.allow else "block"
                if src in step.managed_sources:  # type: ignore[attr-defined]
                    kind = f"managed {kind}"
                lists.append(
                    {
                        "index": src.index,
                        "name": src.name,
                        "source": src.url or str(src.path),
                        "kind": kind,
                        "entries": None if parsed is None else parsed.names,
                        "rules": None if parsed is None else parsed.rules,
                        "skipped": None if parsed is None else parsed.skipped,
                        "errors": None if parsed is None else parsed.errors,
                        "loaded_at": src.loaded_at,
                        "problem": step.problems.get(src.index),  # type: ignore[attr-defined]
                        "next": step.next_refresh(src),  # type: ignore[attr-defined]
                    }
                )
            steps.append({"where": step.setup.where, "index": step.setup.index, "lists": lists})
        return self._render(request, who, "lists.html", {"steps": steps})

    async def refresh_list(self, request: Request) -> Response:
        form = await self.app.authorize(request, write=True, api=False)
        try:
            step_index, list_index = int(form.get("step", "")), int(form.get("list", ""))
        except ValueError as exc:
            raise HttpError(400, "step and list must be numbers") from exc
        steps = {s.setup.index: s for s in self._steps("managed_sources")}
        step = steps.get(step_index)
        if step is None or not 0 <= list_index < len(step.sources):  # type: ignore[attr-defined]
            raise HttpError(404, "no such list")
        await self.server.refresh_list(step, list_index)
        return self._back(request, form, "/lists")

    async def cache_page(self, request: Request) -> Response:
        who = await self._viewer(request)
        stats = self._cache_stats(await self._step_metrics())
        return self._render(request, who, "cache.html", {"c": stats})

    async def flush(self, request: Request) -> Response:
        form = await self.app.authorize(request, write=True, api=False)
        self.server.flush()
        return self._back(request, form, "/cache")

    # --- login ----------------------------------------------------------------------------

    async def login_page(self, request: Request) -> Response:
        if not self.app.opts.password_hash:
            return RedirectResponse("/", 303)
        nxt = request.query_params.get("next", "/")
        ctx = {"next": nxt, "error": None, "csrf": "", "login": False, "path": "/login"}
        return self.templates.TemplateResponse(request, "login.html", ctx)

    async def login(self, request: Request) -> Response:
        from .app import read_form

        stored = self.app.opts.password_hash
        if not stored:
            return RedirectResponse("/", 303)
        form = await read_form(request)
        client = request.client.host if request.client else "?"
        now = time.monotonic()
        nxt = form.get("next", "/")
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"
        ctx = {"next": nxt, "csrf": "", "login": False, "path": "/login"}
        wait = self.app.logins.blocked_for(client, now)
        if wait > 0:
            ctx["error"] = f"Too many failed logins: try again in {int(wait) + 1} s."
            return self.templates.TemplateResponse(
                request, "login.html", ctx, status_code=429,
                headers={"retry-after": str(int(wait) + 1)},
            )  # fmt: skip
        password = form.get("password", "")
        ok = await trio.to_thread.run_sync(verify_password, password, stored)
        if not ok:
            self.app.logins.failed(client, now)
            ctx["error"] = "Wrong password."
            return self.templates.TemplateResponse(request, "login.html", ctx, status_code=401)
        self.app.logins.succeeded(client)
        resp = RedirectResponse(nxt, 303)
        self._set_cookie(resp, self.app.sessions.new())
        return resp

    async def logout(self, request: Request) -> Response:
        await self.app.authorize(request, write=True, api=False)
        resp = RedirectResponse("/login" if self.app.opts.password_hash else "/", 303)
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp


def _memory_overview(history: Any, now: float) -> dict[str, Any]:
    """The overview from the in-memory stats (no query log): queries and blocked only."""
    stats = history.stats(now, {"day": DAY}, TOP)["day"]
    buckets = sorted(history.history, key=lambda b: b.start)
    chart = {
        "time": [b.start for b in buckets],
        "queries": [b.queries for b in buckets],
        "blocked": [b.blocked for b in buckets],
        "cached": [0 for _ in buckets],
        "forwarded": [0 for _ in buckets],
        "error": [0 for _ in buckets],
    }
    return {
        "source": "memory",
        "chart": chart,
        "totals": {"queries": stats["queries"], "blocked": stats["blocked"]},
        "top_names": [],
        "top_blocked": stats["top_blocked"],
        "top_clients": stats["top_clients"],
        "upstreams": [],
    }
