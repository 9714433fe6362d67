"""Null syscall (getpid) through the kernel versus a raw pyzmq+msgpack echo server, in one run.

    python bench/syscall_rtt.py [--calls 5000] [--rounds 5]

Both servers are separate processes on ipc:// sockets, driven by the same client loop with the
same llmos frames; the echo server decodes each request and encodes a reply, as the kernel must,
and does nothing else. Rounds alternate between the two so that machine noise hits both alike;
the medians over rounds are printed with the kernel/echo ratios. Targets (issue #2): kernel median
round trip <= 1.3x the echo's; throughput >= 0.7x the echo's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from syscalls import wire  # noqa: E402

ECHO = """
import sys, zmq, msgpack
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(sys.argv[1])
print("ready", flush=True)
while True:
    ident, frame = sock.recv_multipart()
    msg = msgpack.unpackb(frame, raw=False)
    sock.send_multipart([ident, msgpack.packb([1, 2, msg[2], 42], use_bin_type=True)])
"""


def dealer(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def reply(sock: zmq.Socket) -> list:
    while True:                    # skip the kernel's liveness probes
        msg = wire.decode(sock.recv())
        if msg[1] != wire.PING:
            return msg


def latencies(sock: zmq.Socket, n: int) -> list[float]:
    out = []
    for i in range(1, n + 1):
        frame = wire.call(i, "getpid", {})
        t = time.perf_counter_ns()
        sock.send(frame)
        msg = reply(sock)
        out.append((time.perf_counter_ns() - t) / 1000)
        assert msg[1] == wire.OK, msg
    return out


def throughput(sock: zmq.Socket, n: int, depth: int) -> float:
    sent = 0
    t = time.perf_counter()
    for _ in range(depth):
        sent += 1
        sock.send(wire.call(sent, "getpid", {}))
    for _ in range(n):
        reply(sock)
        if sent < n:
            sent += 1
            sock.send(wire.call(sent, "getpid", {}))
    return n / (time.perf_counter() - t)


def measure(endpoint: str, calls: int) -> dict:
    sock = dealer(endpoint)
    latencies(sock, 200)                       # warm up
    lat = latencies(sock, calls)
    q = statistics.quantiles(lat, n=100)
    result = {"median_us": statistics.median(lat), "p99_us": q[98],
              "rps_1": throughput(sock, calls, 1), "rps_64": throughput(sock, calls * 4, 64)}
    sock.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))
    env = dict(os.environ, LLMOS_HOME=str(home), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "userland.llmos", "boot"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    echo_ep = f"ipc://{home}/echo.sock"
    echo = subprocess.Popen([sys.executable, "-c", ECHO, echo_ep], stdout=subprocess.PIPE, text=True)
    echo.stdout.readline()
    kernel_ep = f"ipc://{home}/run/programs.sock"
    runs: dict[str, list[dict]] = {"echo": [], "kernel": []}
    try:
        for _ in range(args.rounds):
            runs["echo"].append(measure(echo_ep, args.calls))
            runs["kernel"].append(measure(kernel_ep, args.calls))
    finally:
        echo.kill()
        subprocess.run([sys.executable, "-m", "userland.llmos", "shutdown"], env=env,
                       stdout=subprocess.DEVNULL)
    med = {who: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for who, rs in runs.items()}
    print(f"null syscall, {args.calls} calls x {args.rounds} rounds (medians over rounds)")
    print(f"{'':<8} {'median us':>10} {'p99 us':>10} {'calls/s @1':>12} {'calls/s @64':>12}")
    for who in ("echo", "kernel"):
        m = med[who]
        print(f"{who:<8} {m['median_us']:>10.1f} {m['p99_us']:>10.1f} {m['rps_1']:>12.0f} "
              f"{m['rps_64']:>12.0f}")
    e, k = med["echo"], med["kernel"]
    print(f"ratio    {k['median_us'] / e['median_us']:>10.2f} {k['p99_us'] / e['p99_us']:>10.2f} "
          f"{k['rps_1'] / e['rps_1']:>12.2f} {k['rps_64'] / e['rps_64']:>12.2f}"
          "   (kernel / echo; targets: median <= 1.3, throughput >= 0.7)")


if __name__ == "__main__":
    main()
