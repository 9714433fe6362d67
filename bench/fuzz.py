"""The fuzz campaign at full length: python bench/fuzz.py [--frames 100000]

Boots llmos with the tiny random model (tests/model/tiny_gguf.py) and runs tests/test_fuzz_frames.py's
campaign: well-formed calls of every syscall with fuzzed arguments, headers of the wrong types,
byte-mutated frames and CANCELs from raw sockets on the programs socket, the same frames forged on
the services socket. It fails (exit status 1) on any EIO answer, kernel_bug or op_failed log line,
an unanswered call, a forged frame not counted, a service not READY at the end, or a process whose
memory grew more than 24 MiB after the warm-up; and prints the answers by code, the frames per
second and each process's memory before and after. The test suite runs the same with 10^4 frames.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import FAST_CONFIG, Booted  # noqa: E402
from model.tiny_gguf import write_tiny_gguf  # noqa: E402
from test_fuzz_frames import fuzz  # noqa: E402
from tiny_system import MODEL_SERVICES  # noqa: E402


def report(tally, start, end, before, after) -> None:
    print(f"frames {tally.frames:,}: {tally.calls:,} calls, {tally.forged:,} also forged on the "
          f"services socket")
    for code, n in sorted(tally.by_code.items(), key=lambda kv: -kv[1]):
        print(f"  {code:<10} {n:>8,}")
    print(f"kernel counters: bad_frames +{after['bad_frames'] - before['bad_frames']:,}, "
          f"forged_service_messages +{after['forged_service_messages'] - before['forged_service_messages']:,}, "
          f"kernel_bugs {after['kernel_bugs']}")
    print("memory (RSS after the warm-up -> at the end):")
    for name in end:
        print(f"  {name:<10} {start.get(name, 0) / 2**20:7.1f} -> {end[name] / 2**20:7.1f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="llmos-fuzz-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf", context=4096)
    (home / "config.toml").write_text(FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\n' + MODEL_SERVICES)
    system = Booted(home).boot()
    t0 = time.monotonic()
    try:
        fuzz(system, args.frames, report)
    except AssertionError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        system.shutdown()
        shutil.rmtree(home, ignore_errors=True)
    took = time.monotonic() - t0
    print(f"passed: {args.frames:,} frames in {took:.0f} s ({args.frames / took:,.0f} frames/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
