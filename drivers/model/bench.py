"""Measure prefill and decode speed of the paged forward pass: python -m drivers.model.bench MODEL.gguf

Decode speed is median tokens/s over the steps (each step feeds one token to every sequence in the batch,
whose KV caches hold prompt + generated tokens). Greedy argmax stands in for sampling.
A measuring tool only: nothing in the library imports it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from drivers.model import kernels
from drivers.model.llama import Chunk, Llama


def run(model: Llama, batch: int, prompt_len: int, steps: int, block_size: int = 16) -> dict:
    per_seq = (prompt_len + steps + block_size - 1) // block_size
    pool = model.new_kv_pool(batch * per_seq, block_size)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.config.vocab_size, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    start = time.perf_counter()
    logits = model.step(pool, [Chunk(p, 0, t) for p, t in zip(prompts, tables)])
    prefill = time.perf_counter() - start
    last = logits.argmax(-1).tolist()
    times = []
    for s in range(steps):
        start = time.perf_counter()
        logits = model.step(pool, [Chunk([tok], prompt_len + s, t) for tok, t in zip(last, tables)])
        last = logits.argmax(-1).tolist()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"batch": batch, "prompt": prompt_len, "prefill_tok_s": batch * prompt_len / prefill,
            "decode_ms_per_step": median * 1000, "decode_tok_s": batch / median, "best_tok_s": batch / min(times)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="path to a Llama GGUF")
    ap.add_argument("--cache", default=None, help="model cache directory (kernel measurements are kept there)")
    ap.add_argument("--dense-copy", default="auto", choices=("auto", "never", "always"))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Llama.from_gguf(args.model)
    kernels.choose(model, args.cache, args.dense_copy, budget=1 << 34)
    for b in args.batch:
        r = run(model, b, args.prompt, args.steps)
        print(f"batch {r['batch']:3d}  prompt {r['prompt']}  prefill {r['prefill_tok_s']:7.1f} tok/s  "
              f"decode {r['decode_ms_per_step']:6.1f} ms/step = {r['decode_tok_s']:6.1f} tok/s "
              f"(best {r['best_tok_s']:.1f})  threads {torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    main()
