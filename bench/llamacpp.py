"""llama.cpp on the same GGUF file, the baseline bench/generate.py compares llmos with.

llama-cpp-python is a measuring tool only, never a dependency of llmos (nothing outside bench/
imports it): `.venv/bin/pip install llama-cpp-python` builds llama.cpp from source, about 6 minutes
on 2 cores. Both modes get the same prompt token ids as llmos, generate exactly `tokens` greedy
tokens (end-of-text ignored) and use the same number of threads:

- one stream: the high-level `Llama` and its generate loop, as a Python program would use it;
- N streams: the low-level batch API, as llama.cpp's own batched example does: one llama_batch
  holding every sequence's prompt (sequence i has seq_id i; only each prompt's last token asks for
  logits), then one llama_decode per step with one token of every sequence, each sequence sampled
  by its own greedy sampler from its own logits row.

Each measurement runs in a process of its own (`measure`): llama.cpp's OpenMP threads and torch's
in one process slowed both by 10x here, each runtime's workers spinning while the other computed.
Model loading is not timed. Results have bench/engine.py's keys: aggregate_tok_s (all tokens over
the wall time), stream_tok_s (tokens after the first over the decode time, median), ttft_p50_ms,
ttft_p99_ms, and peak_rss_mb, the measuring process's peak RSS (bench/memory.py's baseline).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))

import llama_cpp as L  # noqa: E402

from bench.engine import pct  # noqa: E402


def measure(model: str, prompt: list[int], n: int, tokens: int, threads: int, n_ctx: int = 0) -> dict:
    """One llama.cpp run of n streams, in a fresh process; n_ctx (one stream only) sizes its KV cache."""
    out = subprocess.run([sys.executable, "-m", "bench.llamacpp", model, "--n", str(n), "--tokens", str(tokens),
                          "--threads", str(threads), "--prompt", json.dumps(prompt), "--n-ctx", str(n_ctx)],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@L.llama_log_callback
def _quiet(level, text, user_data):     # llama.cpp's load-time chatter would drown the table
    pass


class LlamaCpp:
    def __init__(self, path: str, threads: int):
        L.llama_log_set(_quiet, ctypes.c_void_p())
        L.llama_backend_init()
        self.path, self.threads = path, threads

    def run(self, prompt: list[int], n: int, tokens: int, n_ctx: int = 0) -> dict:
        out = self._single(prompt, tokens, n_ctx) if n == 1 else self._batched(prompt, n, tokens)
        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return out

    def _single(self, prompt: list[int], tokens: int, n_ctx: int = 0) -> dict:
        llm = L.Llama(self.path, n_ctx=n_ctx or len(prompt) + tokens + 16, n_batch=512, n_threads=self.threads,
                      n_threads_batch=self.threads, verbose=False)
        start = time.perf_counter()
        first = None
        produced = 0
        for _ in llm.generate(prompt, temp=0.0, reset=True):
            produced += 1
            if first is None:
                first = time.perf_counter()
            if produced == tokens:
                break
        end = time.perf_counter()
        ttft = (first - start) * 1000
        return {"aggregate_tok_s": tokens / (end - start), "stream_tok_s": (tokens - 1) / (end - first),
                "ttft_p50_ms": ttft, "ttft_p99_ms": ttft}

    def _batched(self, prompt: list[int], n: int, tokens: int) -> dict:
        model = L.llama_model_load_from_file(self.path.encode(), L.llama_model_default_params())
        if not model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cp = L.llama_context_default_params()
        cp.n_ctx = n * (len(prompt) + tokens + 16)
        cp.n_batch = max(512, n * len(prompt))            # every prompt in one llama_decode call
        cp.n_seq_max = n
        cp.n_threads = cp.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(cp.n_batch, 0, 1)
        samplers = [L.llama_sampler_init_greedy() for _ in range(n)]
        try:
            start = time.perf_counter()
            for s in range(n):
                for j, t in enumerate(prompt):
                    self._put(batch, s * len(prompt) + j, t, j, s, j == len(prompt) - 1)
            batch.n_tokens = n * len(prompt)
            self._decode(ctx, batch)
            last = [s * len(prompt) + len(prompt) - 1 for s in range(n)]
            out = [L.llama_sampler_sample(samplers[s], ctx, last[s]) for s in range(n)]
            first = time.perf_counter()
            for k in range(1, tokens):
                for s in range(n):
                    self._put(batch, s, out[s], len(prompt) + k - 1, s, True)
                batch.n_tokens = n
                self._decode(ctx, batch)
                out = [L.llama_sampler_sample(samplers[s], ctx, s) for s in range(n)]
            end = time.perf_counter()
        finally:
            for smpl in samplers:
                L.llama_sampler_free(smpl)
            L.llama_batch_free(batch)
            L.llama_free(ctx)
            L.llama_model_free(model)
        ttft = [(first - start) * 1000] * n
        return {"aggregate_tok_s": n * tokens / (end - start), "stream_tok_s": (tokens - 1) / (end - first),
                "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99)}

    @staticmethod
    def _put(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    @staticmethod
    def _decode(ctx, batch) -> None:
        rc = L.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")


def greedy_and_logits(model: str, prompt: list[int], tokens: int, out: Path) -> list[int]:
    """llama.cpp's greedy continuation of prompt, and its logits at every prompt position (saved to
    out, .npy), from a fresh process: bench/fidelity.py's baseline."""
    subprocess.run([sys.executable, "-m", "bench.llamacpp", model, "--n", "1", "--tokens", str(tokens),
                    "--threads", "2", "--prompt", json.dumps(prompt), "--logits", str(out)],
                   cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.with_suffix(".json").read_text())


def prefill(model: str, prompt: list[int], threads: int) -> float:
    """llama.cpp's prompt tok/s on prompt (one llama_eval of it, n_batch 512), in a fresh process."""
    out = subprocess.run([sys.executable, "-m", "bench.llamacpp", model, "--n", "1", "--tokens", "1",
                          "--threads", str(threads), "--prompt", json.dumps(prompt), "--prefill"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["prompt_tok_s"]


def _prefill(path: str, prompt: list[int], threads: int) -> dict:
    L.llama_log_set(_quiet, ctypes.c_void_p())
    llm = L.Llama(path, n_ctx=len(prompt) + 16, n_batch=512, n_threads=threads, n_threads_batch=threads,
                  verbose=False)
    llm.eval(prompt[:16])                      # warm: the first evaluation pays one-off set-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return {"prompt_tok_s": len(prompt) / (time.perf_counter() - start)}


def _greedy_and_logits(path: str, prompt: list[int], tokens: int, out: Path, threads: int) -> None:
    import numpy as np
    L.llama_log_set(_quiet, ctypes.c_void_p())
    llm = L.Llama(path, n_ctx=len(prompt) + tokens + 16, n_batch=512, n_threads=threads, logits_all=True,
                  verbose=False)
    llm.eval(prompt)
    np.save(out, np.asarray(llm.scores[:len(prompt)], dtype=np.float32))
    llm.reset()
    produced = []
    for t in llm.generate(prompt, temp=0.0, reset=True):
        produced.append(int(t))
        if len(produced) == tokens:
            break
    out.with_suffix(".json").write_text(json.dumps(produced))


def main() -> None:
    ap = argparse.ArgumentParser(description="one llama.cpp measurement; prints its result as JSON")
    ap.add_argument("model")
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt", required=True, help="the prompt's token ids, a JSON list")
    ap.add_argument("--n-ctx", type=int, default=0, help="one stream's context size (0: just enough)")
    ap.add_argument("--logits", default=None, help="instead: save prompt logits here (.npy), greedy ids beside")
    ap.add_argument("--prefill", action="store_true", help="instead: time one evaluation of the prompt")
    args = ap.parse_args()
    if args.prefill:
        print(json.dumps(_prefill(args.model, json.loads(args.prompt), args.threads)))
        return
    if args.logits:
        _greedy_and_logits(args.model, json.loads(args.prompt), args.tokens, Path(args.logits), args.threads)
        return
    print(json.dumps(LlamaCpp(args.model, args.threads).run(json.loads(args.prompt), args.n, args.tokens,
                                                            args.n_ctx)))


if __name__ == "__main__":
    main()
