"""How close llmos's quantised path stays to fp32 and to llama.cpp, on the same file: python bench/fidelity.py

For each prompt (chat prompts of SmolLM2-135M, the default model, as token ids):
- KL divergence of the next-token distributions at every prompt position, from the fp32 reference
  (tests/model/reference.py: the file's weights dequantised by gguf-py, a plain fp32 Llama) to
  llmos (drivers/model: int4 weights, bf16 activations and KV, fp32-refined top logits) and to
  llama.cpp (when llama-cpp-python is installed; its logits for the same ids);
- greedy continuations of --tokens tokens from each of the three, and how many leading tokens
  llmos's and the fp32 reference's share with llama.cpp's (the issue: llmos at least as close to
  llama.cpp as the fp32 path).
A measuring tool only.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.engine import smollm_path  # noqa: E402
from drivers.model.gguf import load_gguf  # noqa: E402
from drivers.model import kernels  # noqa: E402
from drivers.model.llama import Chunk, Llama  # noqa: E402
from drivers.model.tokenizer import Tokenizer  # noqa: E402
from tests.model.reference import Reference, kl_divergence  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue.", "List three prime numbers and add them up."]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def greedy_llmos(model: Llama, prompt: list[int], tokens: int) -> list[int]:
    blocks = (len(prompt) + tokens + 15) // 16
    pool, table = model.new_kv_pool(blocks, 16), list(range(blocks))
    out = [int(model.step(pool, [Chunk(prompt, 0, table)])[0].argmax())]
    while len(out) < tokens:
        out.append(int(model.step(pool, [Chunk([out[-1]], len(prompt) + len(out) - 1, table)])[0].argmax()))
    return out


def greedy_reference(ref: Reference, prompt: list[int], tokens: int) -> list[int]:
    out: list[int] = []
    while len(out) < tokens:                      # no cache: the whole sequence again each token
        out.append(int(ref.logits(prompt + out)[-1].argmax()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--native", default="never", choices=("auto", "never", "always"),
                    help="llmos's compiled kernels for the model measured (drivers/model/native.py)")
    args = ap.parse_args()
    path = smollm_path()
    mf = load_gguf(path)
    native = kernels.prefer_native(mf, None, args.native)
    tok, model, ref = Tokenizer(mf.metadata), Llama(mf, native=native), Reference(mf)
    print("matrices held as:", sorted({m.layout for _, m in model.matrices()}), "| compiled ops:",
          "on" if model.ops is not None else "off")
    have_llamacpp = importlib.util.find_spec("llama_cpp") is not None
    print(f"{'prompt':<48} {'KL llmos':>9} {'KL llama.cpp':>13} {'llmos~llama.cpp':>16} {'fp32~llama.cpp':>15}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(PROMPTS):
            ids = tok.encode_chat([{"role": "user", "content": text}])
            want = ref.logits(ids)
            got = model.step(model.new_kv_pool((len(ids) + 15) // 16, 16),
                             [Chunk(ids, 0, list(range((len(ids) + 15) // 16)), "all")])
            kl_ours = kl_divergence(want, got).item()
            ours, fp32 = greedy_llmos(model, ids, args.tokens), greedy_reference(ref, ids, args.tokens)
            kl_cpp = shared_ours = shared_fp32 = None
            if have_llamacpp:
                from bench.llamacpp import greedy_and_logits
                theirs = greedy_and_logits(path, ids, args.tokens, Path(tmp) / f"p{i}.npy")
                kl_cpp = kl_divergence(want, torch.from_numpy(np.load(Path(tmp) / f"p{i}.npy"))).item()
                shared_ours, shared_fp32 = common_prefix(ours, theirs), common_prefix(fp32, theirs)
            rows.append((kl_ours, kl_cpp, shared_ours, shared_fp32, common_prefix(ours, fp32)))
            fmt = (lambda v, spec: "-" if v is None else format(v, spec))
            print(f"{text[:48]:<48} {kl_ours:>9.2e} {fmt(kl_cpp, '.2e'):>13} "
                  f"{fmt(shared_ours, 'd') + '/' + str(args.tokens):>16} {fmt(shared_fp32, 'd') + '/' + str(args.tokens):>15}"
                  f"   (llmos~fp32 {common_prefix(ours, fp32)}/{args.tokens})", flush=True)
    print(f"median KL(fp32 || llmos) {np.median([r[0] for r in rows]):.2e}", end="")
    if have_llamacpp:
        print(f", KL(fp32 || llama.cpp) {np.median([r[1] for r in rows]):.2e}; greedy tokens shared with "
              f"llama.cpp: llmos {sum(r[2] for r in rows)}, fp32 {sum(r[3] for r in rows)} "
              f"of {len(rows) * args.tokens}")
    else:
        print(" (llama.cpp not installed: .venv/bin/pip install llama-cpp-python to compare)")


if __name__ == "__main__":
    main()
