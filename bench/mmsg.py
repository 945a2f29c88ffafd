"""Would batching datagram syscalls help? recvfrom/sendto against recvmmsg/sendmmsg.

    python bench/mmsg.py [--packets 20000] [--batch 32]

Python's socket module has no recvmmsg/sendmmsg; this calls them through ctypes (Linux,
glibc) on loopback and prints the cost per datagram of each way, in one process (pin it:
``taskset -c 0``). The third row adds what a server must do with each datagram batched
this way, make its bytes and its source address, which ``recvfrom`` does in C.
"""

from __future__ import annotations

import argparse
import ctypes
import socket
import struct
import time
from collections.abc import Callable

BUF = 2048


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.POINTER(IoVec)),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("hdr", MsgHdr), ("len", ctypes.c_uint)]


def messages(n: int, size: int, name: ctypes.Array | None) -> tuple[ctypes.Array, ctypes.Array]:
    """n message headers over one buffer of n * size bytes (each its own slot)."""
    data = ctypes.create_string_buffer(n * size)
    iovs = (IoVec * n)()
    msgs = (MMsgHdr * n)()
    for i in range(n):
        iovs[i].base = ctypes.addressof(data) + i * size
        iovs[i].len = size
        msgs[i].hdr.iov = ctypes.pointer(iovs[i])
        msgs[i].hdr.iovlen = 1
        if name is not None:
            msgs[i].hdr.name = ctypes.addressof(name)
            msgs[i].hdr.namelen = 16
    return msgs, data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=20_000)
    ap.add_argument("--chunk", type=int, default=1024, help="datagrams queued at a time")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    batch = args.batch
    chunk = args.chunk - args.chunk % batch  # what the receive buffer holds at once
    rounds = max(1, args.packets // chunk)
    n = rounds * chunk
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    server.bind(("127.0.0.1", 0))
    server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    client.bind(("127.0.0.1", 0))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
    client.connect(server.getsockname())
    packet = bytes(60)
    results = {}

    def fill() -> None:
        for _ in range(chunk):
            client.send(packet)

    def drain_client() -> None:
        while True:
            try:
                client.recv(BUF)
            except BlockingIOError:
                return

    def timed(way: str, chunk_of_work: Callable[[], None], received: bool) -> None:
        """Time ``chunk_of_work`` (one chunk of datagrams) ``rounds`` times."""
        elapsed = 0.0
        for _ in range(rounds):
            if received:
                fill()
            start = time.perf_counter()
            chunk_of_work()
            elapsed += time.perf_counter() - start
            if not received:
                drain_client()
        results[way] = elapsed

    def recvfrom() -> None:
        for _ in range(chunk):
            server.recvfrom(BUF)

    plain, _ = messages(batch, BUF, None)

    def recvmmsg() -> None:
        got = 0
        while got < chunk:
            got += libc.recvmmsg(server.fileno(), plain, batch, 0, None)

    # The same, plus what a server must do with each: its bytes and its source address.
    names = ctypes.create_string_buffer(16 * batch)
    named, data = messages(batch, BUF, None)
    for i in range(batch):
        named[i].hdr.name = ctypes.addressof(names) + 16 * i
    view, name_view = memoryview(data), memoryview(names)
    header = memoryview(named).cast("B")
    fields = struct.Struct(
        f"8xI{ctypes.sizeof(MsgHdr) - 12}xI{ctypes.sizeof(MMsgHdr) - ctypes.sizeof(MsgHdr) - 4}x"
    )
    addresses: dict[bytes, tuple[str, int]] = {}

    def recvmmsg_and_unpack() -> None:
        got = 0
        while got < chunk:
            for i in range(batch):
                named[i].hdr.namelen = 16
            k = libc.recvmmsg(server.fileno(), named, batch, 0, None)
            for i, (_, size) in enumerate(fields.iter_unpack(header[: k * fields.size])):
                datagram = bytes(view[i * BUF : i * BUF + size])
                raw = bytes(name_view[16 * i : 16 * i + 8])
                source = addresses.get(raw)
                if source is None:
                    port = struct.unpack_from("!H", raw, 2)[0]
                    source = addresses[raw] = (socket.inet_ntoa(raw[4:8]), port)
                del datagram, source
            got += k

    addr = client.getsockname()

    def sendto() -> None:
        for _ in range(chunk):
            server.sendto(packet, addr)

    sockaddr = ctypes.create_string_buffer(
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", addr[1]) + socket.inet_aton(addr[0]),
        16,
    )
    outgoing, payload = messages(batch, len(packet), sockaddr)
    ctypes.memmove(payload, packet * batch, len(packet) * batch)

    def sendmmsg() -> None:
        sent = 0
        while sent < chunk:
            done = libc.sendmmsg(server.fileno(), outgoing, batch, 0)
            if done < 0:
                raise OSError(ctypes.get_errno(), "sendmmsg")
            sent += done

    timed("recvfrom, one per call", recvfrom, received=True)
    timed(f"recvmmsg, {batch} per call", recvmmsg, received=True)
    timed(
        f"recvmmsg, {batch} per call, with bytes and address per datagram",
        recvmmsg_and_unpack,
        received=True,
    )
    timed("sendto, one per call", sendto, received=False)
    timed(f"sendmmsg, {batch} per call", sendmmsg, received=False)

    print("| way | µs per datagram |\n|---|---|")
    for way, seconds in results.items():
        print(f"| {way} | {seconds / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
