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

    elapsed = 0.0
    for _ in range(rounds):
        fill()
        start = time.perf_counter()
        for _ in range(chunk):
            server.recvfrom(BUF)
        elapsed += time.perf_counter() - start
    results["recvfrom, one per call"] = elapsed

    msgs, _ = messages(batch, BUF, None)
    elapsed = 0.0
    for _ in range(rounds):
        fill()
        start = time.perf_counter()
        got = 0
        while got < chunk:
            got += libc.recvmmsg(server.fileno(), msgs, batch, 0, None)
        elapsed += time.perf_counter() - start
    results[f"recvmmsg, {batch} per call"] = elapsed

    # The same, plus what a server must do with each: its bytes and its source address.
    names = ctypes.create_string_buffer(16 * batch)
    msgs, data = messages(batch, BUF, None)
    for i in range(batch):
        msgs[i].hdr.name = ctypes.addressof(names) + 16 * i
    view, name_view = memoryview(data), memoryview(names)
    header = memoryview(msgs).cast("B")
    fields = struct.Struct(
        f"8xI{ctypes.sizeof(MsgHdr) - 12}xI{ctypes.sizeof(MMsgHdr) - ctypes.sizeof(MsgHdr) - 4}x"
    )
    addresses: dict[bytes, tuple[str, int]] = {}
    elapsed = 0.0
    for _ in range(rounds):
        fill()
        start = time.perf_counter()
        got = 0
        while got < chunk:
            for i in range(batch):
                msgs[i].hdr.namelen = 16
            k = libc.recvmmsg(server.fileno(), msgs, batch, 0, None)
            for i, (_, size) in enumerate(fields.iter_unpack(header[: k * fields.size])):
                datagram = bytes(view[i * BUF : i * BUF + size])
                raw = bytes(name_view[16 * i : 16 * i + 8])
                source = addresses.get(raw)
                if source is None:
                    port = struct.unpack_from("!H", raw, 2)[0]
                    source = addresses[raw] = (socket.inet_ntoa(raw[4:8]), port)
                del datagram, source
            got += k
        elapsed += time.perf_counter() - start
    results[f"recvmmsg, {batch} per call, with bytes and address per datagram"] = elapsed

    addr = client.getsockname()
    elapsed = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(chunk):
            server.sendto(packet, addr)
        elapsed += time.perf_counter() - start
        drain_client()
    results["sendto, one per call"] = elapsed

    sockaddr = ctypes.create_string_buffer(
        struct.pack("=H", socket.AF_INET) + struct.pack("!H", addr[1]) + socket.inet_aton(addr[0]),
        16,
    )
    msgs, data = messages(batch, len(packet), sockaddr)
    ctypes.memmove(data, packet * batch, len(packet) * batch)
    elapsed = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        sent = 0
        while sent < chunk:
            done = libc.sendmmsg(server.fileno(), msgs, batch, 0)
            if done < 0:
                raise OSError(ctypes.get_errno(), "sendmmsg")
            sent += done
        elapsed += time.perf_counter() - start
        drain_client()
    results[f"sendmmsg, {batch} per call"] = elapsed

    print("| way | µs per datagram |\n|---|---|")
    for way, seconds in results.items():
        print(f"| {way} | {seconds / n * 1e6:.2f} |")


if __name__ == "__main__":
    main()
