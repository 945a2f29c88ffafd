"""dnsproxy's own cost per query, in one process, without the client's syscalls.

    taskset -c 0 python bench/inprocess.py hit [--steps ratelimit,hosts,blocklist,cache]
    taskset -c 0 python bench/inprocess.py blocked [--steps ...]
    taskset -c 0 python bench/inprocess.py miss
    taskset -c 0 python bench/inprocess.py hit --packet-cache-size 0   # the chain path alone

dnsperf figures on this machine move by ±20 % from run to run; this harness does not
involve a load generator, and times hits and blocked answers in CPU time, so it shows
changes of a few per cent. It builds the real
`Server` on a config like the benchmarks' (nsd on loopback as the upstream) and feeds
query packets to `Server.handle` directly, with a send function that keeps the answers.

- ``hit``: 1000 names, cached after a warm-up; microseconds of Python per answer, and the
  Python opcodes and calls one answer runs (a count no load on the machine changes).
- ``blocked``: 1000 names of basic.hosts; the same per blocked answer.
- ``miss``: forward only, 200 queries kept outstanding like dnsperf; user and system CPU
  per query (upstream sockets included, the client's datagrams not), and the Python
  opcodes and calls per miss, traced over a batch from the first query to the last
  answer (`miss_opcodes`).

Each figure is the best of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import dns.message
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BLOCKLISTS, chain_config, names_zone, start_nsd, workdir

from dnsproxy.server import Server

CLIENT = ("127.0.0.1", 5555)
MISS_TRACED = 50  # misses traced for the opcode count (a trace is ~50x slower)
ANSWERS_ARRIVE = 0.2  # seconds for nsd to answer MISS_TRACED queries, many times over


def packets(names: list[str]) -> list[bytes]:
    return [dns.message.make_query(n, "A", use_edns=0, payload=1232).to_wire() for n in names]


async def answer_all(server: Server, pkts: list[bytes], outstanding: int) -> list[bytes | None]:
    """Run every packet through the server, ``outstanding`` at a time; their answers."""
    answers: list[bytes | None] = []
    room = trio.Event()

    def send(out: bytes | None) -> None:
        answers.append(out)
        room.set()

    for sent, pkt in enumerate(pkts):
        while sent - len(answers) >= outstanding:
            room = trio.Event()
            await room.wait()
        server.handle(pkt, CLIENT, "udp", send)
    while len(answers) < len(pkts):
        room = trio.Event()
        await room.wait()
    return answers


def synchronous(server: Server, pkts: list[bytes], rounds: int) -> float:
    """Best µs per answer of `Server.handle` for packets answered without I/O.

    CPU time of this process (the work is synchronous), so a machine loaded by other
    processes lengthens it less than it does wall-clock time."""
    out: list[bytes | None] = []
    send: Callable[[bytes | None], None] = out.append
    handle = server.handle
    best = float("inf")
    for _ in range(rounds):
        out.clear()
        start = time.process_time()
        for _ in range(10):
            for pkt in pkts:
                handle(pkt, CLIENT, "udp", send)
        best = min(best, (time.process_time() - start) / (10 * len(pkts)))
    if len(out) != 10 * len(pkts) or not all(out):
        raise SystemExit("some queries were not answered at once: not a hit/blocked path")
    return best * 1e6


class Counter:
    """A `sys.settrace` function counting Python opcodes run and functions entered:
    counts that do not depend on how loaded the machine is (C work, such as dict lookups
    and byte slicing, is not in them)."""

    def __init__(self) -> None:
        self.ops = self.calls = 0

    def __call__(self, frame: FrameType, event: str, arg: object) -> Callable[..., object]:
        frame.f_trace_opcodes = True
        if event == "opcode":
            self.ops += 1
        elif event == "call":
            self.calls += 1
        return self


def opcodes(server: Server, pkt: bytes) -> tuple[int, int]:
    """Python opcodes run and Python functions entered by `Server.handle` for one packet
    answered without I/O (`Counter`)."""
    count = Counter()
    out: list[bytes | None] = []
    sys.settrace(count)
    try:
        server.handle(pkt, CLIENT, "udp", out.append)
    finally:
        sys.settrace(None)
    if not out or out[0] is None:
        raise SystemExit("the query was not answered at once: not a hit/blocked path")
    return count.ops, count.calls


async def miss_opcodes(server: Server, pkts: list[bytes]) -> tuple[float, float]:
    """Python opcodes and calls per miss (`Counter`), from the first query's handling to
    the last answer.

    `sys.settrace` covers the thread: every task of the run (the query path, the upstream
    reader and its callbacks, the scheduler's calls) is traced, the kernel's work is not.
    Every query is sent before any answer is read, and the answers are left to arrive
    first (a blocking sleep), so the reader takes them in one wake-up: the count does not
    depend on how the upstream's answers happen to be batched.
    """
    count = Counter()
    answers: list[bytes | None] = []
    finished = trio.Event()

    def send(out: bytes | None) -> None:
        answers.append(out)
        if len(answers) == len(pkts):
            finished.set()

    sys.settrace(count)
    try:
        for pkt in pkts:
            server.handle(pkt, CLIENT, "udp", send)
        time.sleep(ANSWERS_ARRIVE)
        await finished.wait()
    finally:
        sys.settrace(None)
    if not all(answers):
        raise SystemExit("some traced queries got no answer")
    return count.ops / len(pkts), count.calls / len(pkts)


async def measure(args: argparse.Namespace, config: Path, names: list[str]) -> str:
    server = Server(config, handle_signals=False)
    pkts = packets(names)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        while not server.chain.ready():  # lists loaded
            await trio.sleep(0.05)
        warm = await answer_all(server, pkts, 200)
        if not all(warm):
            raise SystemExit("the warm-up got no answer for some queries")
        if (
            args.kind == "blocked"
            and dns.message.from_wire(warm[0]).answer[0][0].address != "0.0.0.0"
        ):  # type: ignore[arg-type]
            raise SystemExit("not blocked: is blocklist in --steps?")
        if args.kind != "miss":
            result = f"{synchronous(server, pkts, args.rounds):.2f} µs of Python per answer"
            ops, calls = opcodes(server, pkts[0])
            result += f" ({ops} opcodes, {calls} Python calls)"
        else:
            best = (float("inf"), 0.0)
            for _ in range(args.rounds):
                before = resource.getrusage(resource.RUSAGE_SELF)
                await answer_all(server, pkts * 5, 200)
                after = resource.getrusage(resource.RUSAGE_SELF)
                n = 5 * len(pkts)
                user = (after.ru_utime - before.ru_utime) / n * 1e6
                kernel = (after.ru_stime - before.ru_stime) / n * 1e6
                best = min(best, (user, kernel), key=sum)
            result = f"user {best[0]:.1f} µs, kernel {best[1]:.1f} µs per miss"
            # the fewest of a few batches: a periodic task of the server that wakes up
            # during one (a timer, the clients' table) is not the query path's work
            ops, calls = min([await miss_opcodes(server, pkts[:MISS_TRACED]) for _ in range(3)])
            result += f" ({ops:.0f} opcodes, {calls:.1f} Python calls)"
        server.stop()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("kind", choices=["hit", "blocked", "miss"])
    ap.add_argument("--steps", default="ratelimit,hosts,blocklist,cache")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument(
        "--packet-cache-size", type=int, help="[server] packet_cache_size (default: its default)"
    )
    args = ap.parse_args()
    steps = [] if args.kind == "miss" else [s for s in args.steps.split(",") if s]
    if args.kind == "blocked":
        listed = (BLOCKLISTS / "basic.hosts").read_text().splitlines()
        names = [line.split()[1] for line in listed if line.startswith("0.0.0.0 ")][1000:2000]
    else:
        names = [f"h{i}.bench.test" for i in range(1000)]
    with workdir() as d:
        (d / "nsd").mkdir()
        nsd = start_nsd(d / "nsd", {"bench.test": names_zone("bench.test", 1000)})
        try:
            config = d / "dnsproxy.toml"
            text = chain_config(f"127.0.0.1:{nsd.port}", [*steps, "forward"])
            if args.packet_cache_size is not None:
                size = f"packet_cache_size = {args.packet_cache_size}\n"
                text = text.replace("[server]\n", "[server]\n" + size)
            config.write_text(text.replace("{port}", "0"))
            result = trio.run(measure, args, config, names)
        finally:
            nsd.stop()
    print(f"{args.kind} ({', '.join([*steps, 'forward'])}): {result}")


if __name__ == "__main__":
    main()
