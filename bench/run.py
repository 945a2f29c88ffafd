"""Run every benchmark in turn and print their tables (``make bench``).

    python bench/run.py [--quick]

Each benchmark starts its own peers (nsd, dnsmasq, kresd) and dnsproxy pinned to CPUs as
DESIGN.md §5 describes. ``--quick`` shortens every run (for a smoke test, not for figures).
Paste the output into bench/RESULTS.md with the date and the machine's load.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

RUNS = [
    ("forward", ["forward.py"], ["--seconds", "2", "--names", "20000"]),
    ("cache hits", ["cachehit.py"], ["--seconds", "2"]),
    ("blocklist", ["blocklist.py"], ["--seconds", "2", "--names", "100000"]),
    ("encrypted upstreams", ["encrypted.py"], ["--queries", "300"]),
    ("the floor under a Python server", ["floor.py"], ["--seconds", "2"]),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    failed = 0
    for title, script, quick in RUNS:
        cmd = [sys.executable, str(HERE / script[0]), *(quick if args.quick else [])]
        print(
            f"\n## {title}\n\n    {' '.join(['python', 'bench/' + script[0], *cmd[2:]])}\n",
            flush=True,
        )
        failed += subprocess.run(cmd).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
