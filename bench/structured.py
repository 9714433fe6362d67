"""The cost of constrained decoding: python bench/structured.py

Runs the default model (SmolLM2-135M-Instruct) in this process, as a driver does (the engine and
the driver's ModelRunner, services.inference.step_in_process), and times decode steps:
  - N=1: one sequence, unconstrained, then constrained by a JSON schema;
  - N=8: eight sequences, unconstrained, then with half of them constrained;
each for --tokens greedy tokens after the prefill (end-of-text ignored, one token a step), and
prints each case's median step time and the constrained/unconstrained ratio (the issue's target:
<= 1.1x). Then the time to build one mask, per token, replaying a constrained output through a
fresh matcher (llguidance's compute: beside the forward pass where the driver has a spare core,
else just before sampling), and the time to apply one to a logits row.

With --repeat K every case runs K times, interleaved, and the best median of each is shown, and
its fastest step: on a machine shared with other work the least disturbed run is the fairest, for
both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from drivers.model import Tokenizer  # noqa: E402
from drivers.model import constraints as C  # noqa: E402
from drivers.runner import ModelRunner  # noqa: E402
from services.inference.engine import Engine, step_in_process  # noqa: E402
from syscalls.runtime.models import default_path  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string"}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    "tags": {"type": "array", "items": {"type": "string"}}, "summary": {"type": "string"}},
    "required": ["title", "year", "tags", "summary"], "additionalProperties": False}
PROMPT = "Describe a film you like as JSON, with a long summary."


def steps(runner: ModelRunner, tok: Tokenizer, n: int, constrained: int, tokens: int, grammar: str) -> list[float]:
    """Seconds per decode step of n sequences (the first `constrained` of them constrained)."""
    engine = Engine(runner.info(), tok, max_running=n, token_budget=4096, decode_steps=1)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    for i in range(n):
        engine.add(prompt, {"temperature": 0.0}, max_tokens=tokens, ignore_eos=True,
                   constraint=grammar if i < constrained else None)
    step_in_process(engine, runner)              # the prefill (and the first token)
    times = []
    while engine.has_work():
        t0 = time.perf_counter()
        step_in_process(engine, runner)
        times.append(time.perf_counter() - t0)
    return times[:-1] or times                   # the last step also finishes everyone


def mask_costs(tok: Tokenizer, grammar: str, output: list[int]) -> tuple[list[float], list[float]]:
    """Per token: seconds to build its mask, and to apply it to a logits row."""
    c = C.Constraint(C.vocabulary(tok), grammar, 0)
    build, apply = [], []
    row = np.zeros(tok.vocab_size, dtype=np.float32)
    for k, t in enumerate(output):
        c.sync(output[:k])
        t0 = time.perf_counter()
        c.compute()
        t1 = time.perf_counter()
        c.apply(row)
        t2 = time.perf_counter()
        build.append(t1 - t0)
        apply.append(t2 - t1)
        if c.blocked():
            break
    return build, apply


def constrained_output(runner: ModelRunner, tok: Tokenizer, grammar: str, tokens: int) -> list[int]:
    engine = Engine(runner.info(), tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    engine.add(prompt, {"temperature": 0.0}, max_tokens=tokens, constraint=grammar)
    out: list[int] = []
    while engine.has_work():
        for ev in step_in_process(engine, runner):
            out += ev["tokens"]
    return [t for t in out if t not in tok.eog_ids]


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.0f} us"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per case")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case, interleaved; the best is shown")
    ap.add_argument("--model", default=None, help="a GGUF file (default: SmolLM2-135M-Instruct)")
    args = ap.parse_args()
    path = args.model or default_path()
    runner = ModelRunner.from_gguf(path, num_blocks=512)
    tok = Tokenizer.from_gguf(path)
    grammar = C.grammar_for(response_format={"type": "json_schema", "json_schema": {"name": "film", "schema": SCHEMA}})
    print(f"model {Path(path).name}, engine {runner.info().get('engine', 'torch')}, vocabulary {tok.vocab_size}")
    cases = [("N=1 unconstrained", 1, 0), ("N=1 constrained", 1, 1),
             ("N=8 unconstrained", 8, 0), ("N=8 half constrained", 8, 4)]
    steps(runner, tok, 1, 1, 4, grammar)                 # warm: the driver's vocabulary, first calls
    best: dict[str, float] = {}
    fastest: dict[str, float] = {}
    for _ in range(args.repeat):
        for name, n, k in cases:
            times = steps(runner, tok, n, k, args.tokens, grammar)
            best[name] = min(best.get(name, 1e9), statistics.median(times))
            fastest[name] = min(fastest.get(name, 1e9), min(times))
    print(f"\n{'decode step':24} {'median':>11}  ratio {'fastest':>11}  ratio")
    for name, n, k in cases:
        base, quick = best[f"N={n} unconstrained"], fastest[f"N={n} unconstrained"]
        print(f"{name:24} {us(best[name])}  {best[name] / base:5.3f}x {us(fastest[name])}  "
              f"{fastest[name] / quick:5.3f}x" + ("" if k == 0 else "   (target <= 1.1x)"))
    output = constrained_output(runner, tok, grammar, 120)
    build, apply = mask_costs(tok, grammar, output)
    print(f"\nmask per token, over {len(build)} tokens of a constrained output:")
    where = "beside the forward pass" if runner._constrained.background else "before sampling: no spare core"
    print(f"  build ({where}): median {us(statistics.median(build))}, "
          f"p99 {us(np.percentile(build, 99))}, max {us(max(build))}")
    print(f"  apply to a {tok.vocab_size}-logit row: median {us(statistics.median(apply))}")


if __name__ == "__main__":
    main()
