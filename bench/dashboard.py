"""The query-log page on a big log: time to render /log with 1,000,000 rows in SQLite.

    python bench/dashboard.py [--rows 1000000] [--repeat 7]

Builds a query-log database (the querylog step's own schema and indexes) with ``--rows``
rows over the last 24 h (50 clients, 20,000 names, the usual mix of forwarded, cached,
blocked and local answers), starts an in-process server whose querylog step uses it and
whose ``[http]`` serves the dashboard, and times full HTTP requests (routing, the SQLite
page, the Jinja2 render) for the first page and filtered pages. Reports the median and the
worst of ``--repeat`` requests each; the target is < 300 ms. The overview (computed in a
worker thread and kept for a few seconds) is timed too, uncached.

Serving the dashboard adds no per-query work: pages read the database and the counters
the querylog step and the stats observer already keep; ``bench/cachehit.py`` measures the
query path itself.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dnsproxy.server import Server  # noqa: E402
from tests.conftest import free_port  # noqa: E402

SOURCES = ["forward"] * 50 + ["cache"] * 30 + ["blocklist"] * 15 + ["hosts"] * 5
PAGES = [
    ("first page", "/log"),
    ("client filter", "/log?client=10.0.0.7"),
    ("name substring (common)", "/log?name=shop"),
    ("name substring (rare: 1 in 20,000)", "/log?name=name-19999."),
    ("result = blocked", "/log?result=blocked"),
    ("client + name", "/log?client=10.0.0.7&name=shop"),
    ("page 2 (keyset)", None),
]


def build(path: Path, rows: int) -> None:
    import logging

    from dnsproxy.plugins.querylog.store import COLUMNS, INSERT, QueryLogOptions, Store

    store = Store(
        QueryLogOptions(max_size_mb=100_000), path, None, logging.getLogger("bench"), "bench"
    )
    store.open()
    assert store.db is not None
    rng = random.Random(15)
    names = [f"name-{i}.{'shop' if i % 10 == 0 else 'site'}.example." for i in range(20_000)]
    now = time.time()
    batch = []
    start = time.monotonic()
    store.db.execute("BEGIN")
    for i in range(rows):
        source = rng.choice(SOURCES)
        rcode = "SERVFAIL" if rng.random() < 0.005 else "NOERROR"
        row = {
            "ts": now - 86400 + 86400 * i / rows,
            "client": f"10.0.0.{rng.randrange(50)}",
            "transport": "udp",
            "name": rng.choice(names[:-1]),
            "qtype": "A",
            "rcode": rcode,
            "answered_by": source,
            "upstream": "udp://192.0.2.53:53" if source == "forward" else None,
            "duration_ms": round(rng.expovariate(1 / 12), 3),
            "blocked": int(source == "blocklist"),
        }
        batch.append(tuple(row.get(c) for c in COLUMNS))  # the columns left out are NULL
        if len(batch) == 50_000:
            store.db.executemany(INSERT, batch)
            batch.clear()
    store.db.executemany(INSERT, batch)
    # the one row with the rare name, in the middle of the log
    store.db.execute("UPDATE queries SET name = ? WHERE rowid = ?", (names[-1], max(1, rows // 2)))
    store.db.execute("COMMIT")
    store.close()
    print(f"built {rows} rows in {time.monotonic() - start:.1f} s ({path.stat().st_size >> 20} MB)")


async def measure(db: Path, repeat: int) -> list[tuple[str, float, float]]:
    http_port = free_port()
    config = db.parent / "config.toml"
    config.write_text(
        f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\nstate_dir = "{db.parent}/state"\n'
        f'[http]\nlisten = "127.0.0.1:{http_port}"\n'
        f'[[chain]]\nplugin = "querylog"\ndatabase = "{db}"\nmax_size_mb = 100000\n'
        'retention = "3650d"\n'
        '[[chain]]\nplugin = "forward"\nupstreams = ["127.0.0.1:9"]\n'
    )
    out = []
    async with trio.open_nursery() as n:
        server = Server(config, handle_signals=False)
        await n.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
            while (await c.get("/log")).text.count("<tr class=") < 10:  # the step opened it
                await trio.sleep(0.1)
            first = (await c.get("/log")).text
            older = first.split('href="/log?before=', 1)[1].split('"', 1)[0]
            for label, path in PAGES:
                path = path or f"/log?before={older}"
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    r = await c.get(path)
                    times.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200, (path, r.status_code)
                rows = r.text.count("<tr class=")
                out.append((f"{label} ({rows} rows)", statistics.median(times), max(times)))
            times = []
            for _ in range(3):
                server_app_reset(server)
                t0 = time.perf_counter()
                assert (await c.get("/")).status_code == 200
                times.append((time.perf_counter() - t0) * 1000)
            out.append(("overview, uncached (24 h, every row)", statistics.median(times),
                        max(times)))  # fmt: skip
        server.stop()
    return out


def server_app_reset(server: Server) -> None:
    """Drop the overview's few-second cache, so the next request computes it."""
    for svc in server.services:
        app = getattr(svc, "app", None)
        if app is not None:
            app.dashboard.overview_cache = None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--repeat", type=int, default=7)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "querylog.sqlite"
        build(db, args.rows)
        results = trio.run(measure, db, args.repeat)
    print(f"\n{'page':48} {'median ms':>10} {'worst ms':>10}")
    for label, med, worst in results:
        flag = "" if worst < 300 or label.startswith("overview") else "  (over 300 ms)"
        print(f"{label:48} {med:10.1f} {worst:10.1f}{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
