"""The model driver's peak memory, against llama.cpp's and against the model's own size: python bench/memory.py

1. SmolLM2-135M (the default model) with a 2,048-token KV pool (128 blocks of 16) and
   `dense_copy = "never"`: llmos is booted, a program generates --tokens tokens through syscalls,
   and the driver process's peak RSS (VmHWM) is read. llama.cpp (when llama-cpp-python is
   installed) loads the same file with n_ctx 2048 and generates as many tokens, in a process of its
   own, whose peak RSS is the baseline. The issue's floor: llmos at most 2.0x llama.cpp's (goal 1.5x).
   The same boot with the default `dense_copy = "auto"` is shown too, for what speed costs.
2. A synthetic ~1.1B-parameter Q4_0 model (bench/synthetic.py, TinyLlama's shapes), booted the
   same way: its driver's peak RSS against (file size + KV pool bytes). The issue's target: <= 1.3x.

Each figure is the median of --repeat boots. The driver's RSS is also split into anonymous memory
(what llmos allocated: KV, norms, the interpreter's and, on the torch engine, torch's own state)
and file pages (the model file's pages read, and shared libraries), so a reader sees what a fixed
cost is and what grows with the model. With `dense_copy = "never"` the driver runs the lean engine
(drivers/model/lean.py, no torch) where native.c multiplies the file; each line names its engine.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import syscalls  # noqa: E402
from bench.engine import PROMPT, proc_status, smollm_path  # noqa: E402
from bench.synthetic import TINYLLAMA, write_synthetic  # noqa: E402
from syscalls.runtime.devices import is_driver  # noqa: E402

POOL_TOKENS = 2048
BLOCK = 16


def boot_and_measure(model: Path, dense_copy: str, tokens: int) -> dict:
    """Boot llmos on `model`, generate `tokens` tokens, and read the driver's memory."""
    home = Path(tempfile.mkdtemp(prefix="llmos-mem-", dir="/tmp"))
    (home / "config.toml").write_text(
        f'[driver]\nmodel = "{model}"\nkv_blocks = {POOL_TOKENS // BLOCK}\nblock_size = {BLOCK}\n'
        f'dense_copy = "{dense_copy}"\n[gateway]\nenabled = false\n')
    env = dict(os.environ, LLMOS_HOME=str(home), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "userland.llmos", "boot"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        with syscalls.connect(home, name="bench-memory", timeout=600) as c:
            if not any(m["path"] == str(model) for m in c.models()):
                c.model_add(str(model), "measured")          # so that models shows what its driver holds
            pid = next(s["pid"] for s in c.services() if is_driver(s["name"]))
            reply = c.chat([{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0.0,
                           ignore_eos=True)
            reply.text                                 # the whole answer: the stream has ended
            generated = reply.result["generated_tokens"]
            loaded = next(m for m in c.models() if m.get("memory"))["memory"]
        return {**proc_status(pid), "generated": generated, "kv_bytes": loaded["kv_bytes"],
                "weight_bytes": loaded["weight_bytes"], "engine": loaded.get("engine", "torch")}
    finally:
        subprocess.run([sys.executable, "-m", "userland.llmos", "shutdown"], env=env, stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) if k != "engine" else runs[0][k] for k in runs[0]}


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-synthetic", action="store_true", help="only part 1 (SmolLM2)")
    args = ap.parse_args()

    model = Path(smollm_path())
    print(f"SmolLM2-135M Q4_1 ({mib(model.stat().st_size)} file), KV pool {POOL_TOKENS} tokens, "
          f"{args.tokens} tokens generated, median of {args.repeat}:")
    lean = median_of([boot_and_measure(model, "never", args.tokens) for _ in range(args.repeat)])
    print(f"  llmos driver, dense_copy never ({lean['engine']} engine): peak RSS {mib(lean['VmHWM'])} (now "
          f"{mib(lean['VmRSS'])}: anonymous {mib(lean['RssAnon'])}, file pages {mib(lean['RssFile'])}; "
          f"weights {mib(lean['weight_bytes'])}, KV {mib(lean['kv_bytes'])})", flush=True)
    fast = median_of([boot_and_measure(model, "auto", args.tokens) for _ in range(args.repeat)])
    print(f"  llmos driver, dense_copy auto ({fast['engine']} engine):  peak RSS {mib(fast['VmHWM'])} "
          f"(weights and copies {mib(fast['weight_bytes'])})", flush=True)
    if importlib.util.find_spec("llama_cpp") is not None:
        from bench.llamacpp import measure
        from drivers.model.tokenizer import Tokenizer
        prompt = Tokenizer.from_gguf(model).encode_chat([{"role": "user", "content": PROMPT}])
        threads = os.cpu_count() or 1
        base = statistics.median(measure(str(model), prompt, 1, args.tokens, threads, n_ctx=POOL_TOKENS)
                                 ["peak_rss_mb"] for _ in range(args.repeat)) * 2**20
        print(f"  llama.cpp, n_ctx {POOL_TOKENS}: peak RSS {mib(base)}")
        print(f"  ratio llmos (never) / llama.cpp: {lean['VmHWM'] / base:.2f}  (floor <= 2.0, goal <= 1.5)")
        print(f"  ratio llmos (auto) / llama.cpp:  {fast['VmHWM'] / base:.2f}")
    else:
        print("  llama.cpp: not compared (.venv/bin/pip install llama-cpp-python to add it)")

    if args.skip_synthetic:
        return
    with tempfile.TemporaryDirectory(prefix="llmos-synthetic-", dir="/tmp") as tmp:
        path = write_synthetic(Path(tmp) / "synthetic-1b.Q4_0.gguf", **TINYLLAMA)
        size = path.stat().st_size
        runs = [boot_and_measure(path, "never", 16) for _ in range(args.repeat)]
        big = median_of(runs)
        kv = big["kv_bytes"]
        print(f"synthetic 1.1B Q4_0 ({mib(size)} file), KV pool {POOL_TOKENS} tokens ({mib(kv)}), "
              f"dense_copy never ({big['engine']} engine), median of {args.repeat}:")
        print(f"  llmos driver: peak RSS {mib(big['VmHWM'])} (now {mib(big['VmRSS'])}: anonymous "
              f"{mib(big['RssAnon'])}, file pages {mib(big['RssFile'])}; weights {mib(big['weight_bytes'])})")
        print(f"  ratio peak RSS / (file + KV pool): {big['VmHWM'] / (size + kv):.2f}  (target <= 1.3)")


if __name__ == "__main__":
    main()
