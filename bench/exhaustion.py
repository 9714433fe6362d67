"""Resource exhaustion at full size: python bench/exhaustion.py [--connections 10000] [--calls 100000] [--rounds 3]

Boots llmos with the tiny random model (tests/model/tiny_gguf.py) and runs tests/test_exhaustion.py's
floods, printing what it measured: the CPU, the kernel's RSS (VmRSS of /proc/PID/status) before,
at its peak and after each flood, the kernel's tables after, and the answers by code.
- connections: `--rounds` rounds of `--connections` raw ZeroMQ connections opened and dropped (half
  of them make a getpid first) and a tenth as many of the real client; RSS after each round
  shows whether anything is kept per connection;
- one program at every limit (subscriptions, mailbox by count and by bytes, calls in flight,
  contexts), with another program working beside it, then gone;
- `--calls` getpid calls pipelined on one raw connection, then as many from the real client one
  at a time;
- storage.max_db_bytes = 4 MiB filled with 4 KB values until ENOSPC, deletes, and puts again.
It fails (exit status 1) where the test would: an unanswered call, a table not back to its
baseline, an error without its limit's name, memory kept.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import FAST_CONFIG, LIGHT_SERVICES, Booted  # noqa: E402
from model.tiny_gguf import write_tiny_gguf  # noqa: E402
from syscalls import errors  # noqa: E402
from test_exhaustion import (MiB, check_all_there, client_connections, fill, kernel_rss,  # noqa: E402
                             kstat, pipelined_getpids, raw_connections, settled,
                             test_one_program_at_its_limits_gets_named_errors_and_leaves_nothing as at_limits)
from tiny_system import MODEL_SERVICES  # noqa: E402


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines()
                 if line.startswith("Model name")), "unknown CPU")


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


def connections(system, n: int, rounds: int) -> None:
    raw_connections(system, 1000)
    client_connections(system, 100)
    base = settled(system, kstat(system)["tables"])
    rss0 = kernel_rss(system)
    print(f"connections: baseline kernel RSS {mib(rss0)}, tables {base}")
    for r in range(rounds):
        t0 = time.monotonic()
        codes = raw_connections(system, n)
        peak = kernel_rss(system)
        client = client_connections(system, n // 10)
        peak = max(peak, kernel_rss(system))
        took = time.monotonic() - t0
        after = settled(system, base)
        print(f"  round {r + 1}: {n:,} raw (answers {codes}) + {n // 10:,} client (answers {client}) "
              f"in {took:.1f} s; RSS peak {mib(peak)}, after {mib(kernel_rss(system))}; "
              f"processes {after['processes']}, connections {after['connections']}, "
              f"sweeps pending {after['sweeps']}")


def calls(system, n: int) -> None:
    rss0 = kernel_rss(system)
    t0 = time.monotonic()
    codes = pipelined_getpids(system, n)
    took = time.monotonic() - t0
    peak = kernel_rss(system)
    with system.connect() as c:
        t1 = time.monotonic()
        for _ in range(n):
            c.getpid()
        took1 = time.monotonic() - t1
    print(f"calls: {n:,} getpid pipelined (500 in flight) in {took:.1f} s ({n / took:,.0f}/s), "
          f"answers {codes}; {n:,} from the client one at a time in {took1:.1f} s "
          f"({n / took1:,.0f}/s); RSS {mib(rss0)} -> peak {mib(max(peak, kernel_rss(system)))} "
          f"-> {mib(kernel_rss(system))}")


def boot(config: str) -> Booted:
    home = Path(tempfile.mkdtemp(prefix="llmos-exh-", dir="/tmp"))
    (home / "config.toml").write_text(FAST_CONFIG + config)
    return Booted(home).boot()


def disk(max_db: int) -> None:
    system = boot(LIGHT_SERVICES + f"\n[storage]\nmax_db_bytes = {max_db}\n")
    try:
        with system.connect() as c:
            t0 = time.monotonic()
            acked, e = fill(c, 4000)
            took = time.monotonic() - t0
            assert isinstance(e, errors.ENOSPC), repr(e)
            check_all_there(c, acked)
            for key in list(acked)[:100]:
                c.delete(key)
                del acked[key]
            again, e2 = fill(c, 4000)
            check_all_there(c, acked)
        print(f"disk: max_db_bytes {max_db:,}: {len(acked) + 100:,} puts of 4 KB acknowledged in "
              f"{took:.1f} s, then {e.code}: {e.message}\n  after 100 deletes {len(again)} more "
              f"puts fit, then {e2.code}; every acknowledged put there")
    finally:
        system.discard()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu()}")
    models = Path(tempfile.mkdtemp(prefix="llmos-exh-model-", dir="/tmp"))
    model = write_tiny_gguf(models / "tiny.gguf", context=4096)
    system = boot(f'\n[driver]\nmodel = "{model}"\n' + MODEL_SERVICES)
    t0 = time.monotonic()
    try:
        connections(system, args.connections, args.rounds)
        print("one program at every limit:")
        at_limits(system)
        calls(system, args.calls)
        stat = kstat(system)
        print(f"kernel: counters {({k: v for k, v in stat['counters'].items() if v})}")
        assert stat["counters"]["kernel_bugs"] == 0
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        system.discard()
        shutil.rmtree(models, ignore_errors=True)
    try:
        disk(4 * MiB)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"passed in {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
