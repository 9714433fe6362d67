"""The HTTP gateway versus direct syscalls, in one run: python bench/gateway.py

Boots llmos with the default model (SmolLM2-135M-Instruct) and the gateway on a free port, and
measures both paths in the same command, interleaved where they alternate:

- per-request overhead: a short request answered whole (one token of a short prompt), the
  median of --requests each: /v1/completions and /v1/chat/completions through the openai
  package against generate and chat on a syscalls connection. A chat that no held history
  begins pays for opening its context here (userland/gateway/conversations.py);
- streaming throughput for each N in --clients (1 32): N clients at once, each streaming
  --tokens greedy tokens (end of text ignored), the openai package's streaming completions
  against N syscalls connections' generate streams, --rounds times each, alternating: aggregate
  tok/s, per-stream tok/s and the gateway/direct ratio of the best rounds (the issue's target:
  >= 0.9); on a shared machine the best of a few is the round least disturbed, for both alike;
- a --turns-turn chat resent whole, as OpenAI clients send it: each follow-up's time to first
  token with its history's KV reused (the key "bench-warm", which holds the conversation)
  against the same request recomputed (the key "bench-cold", which asks for one token only, so
  never holds a history the next turn begins with), and whether both chose the same first token.

The load average is printed first and last: on a shared machine the figures move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

import syscalls  # noqa: E402
from bench.engine import PROMPT  # noqa: E402

KV_BLOCKS = 1024
SYSTEM = "You are a helpful assistant. Answer in a few sentences."
QUESTIONS = ("What is an operating system?", "Why do kernels schedule processes?",
             "What does a microkernel leave out?", "How do processes talk to each other?",
             "What is virtual memory for?", "Why are system calls slower than function calls?",
             "What does a file system keep on disk?", "How does a scheduler pick who runs next?")


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def cli(env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "userland.llmos", *args], env=env, check=True,
                          capture_output=True, text=True)
    return done.stdout


# -- per-request overhead -------------------------------------------------------------------------
def overhead(url: str, home: Path, model: str, n: int) -> None:
    client = openai.OpenAI(base_url=url + "/v1", api_key="llmos", max_retries=0)
    messages = [{"role": "user", "content": PROMPT}]
    one = {"max_tokens": 1, "temperature": 0}
    with syscalls.connect(home, name="bench-direct") as conn:
        paths = {
            "completions": (lambda: client.completions.create(model=model, prompt=PROMPT, **one),
                            lambda: conn.generate(PROMPT, max_tokens=1, temperature=0.0).text),
            "chat": (lambda: client.chat.completions.create(model=model, messages=messages, **one),
                     lambda: conn.chat(messages, max_tokens=1, temperature=0.0).text)}
        for name, (gateway, direct) in paths.items():
            times: dict[str, list[float]] = {"gateway": [], "direct": []}
            for i in range(n + 5):                  # the first 5 of each warm up, uncounted
                for path, call in (("gateway", gateway), ("direct", direct)):
                    t = time.perf_counter()
                    call()
                    if i >= 5:
                        times[path].append(time.perf_counter() - t)
            g, d = (statistics.median(times[p]) * 1000 for p in ("gateway", "direct"))
            print(f"  {name:<12} gateway {g:6.1f} ms   direct {d:6.1f} ms   overhead {g - d:5.1f} ms"
                  f"   ratio {g / d:.2f}   (median of {n})", flush=True)


# -- streaming throughput -------------------------------------------------------------------------
async def gateway_streams(url: str, model: str, n: int, tokens: int) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="llmos", max_retries=0, timeout=600)
    start = asyncio.Event()

    async def one() -> dict:
        await start.wait()
        t0, first, used = time.perf_counter(), None, 0
        stream = await client.completions.create(
            model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter()
            if chunk.usage:
                used = chunk.usage.completion_tokens
        return {"t0": t0, "first": first, "end": time.perf_counter(), "tokens": used}
    try:
        # each client's connection opened first, as the direct clients' are (with a 404: a
        # /v1/models would make the tokenizer service describe every model file, ~0.2 s each)
        await asyncio.gather(*(warm_up(client) for _ in range(n)))
        return await run_clients([asyncio.create_task(one()) for _ in range(n)], start)
    finally:
        await client.close()


async def warm_up(client: openai.AsyncOpenAI) -> None:
    try:
        await client.get("/warm-up", cast_to=object)
    except openai.NotFoundError:
        pass


async def direct_streams(home: Path, n: int, tokens: int) -> list[dict]:
    conns = [await syscalls.connect_async(home, name="bench-direct") for _ in range(n)]
    start = asyncio.Event()

    async def one(conn) -> dict:
        await start.wait()
        t0, first = time.perf_counter(), None
        stream = await conn.generate(PROMPT, max_tokens=tokens, temperature=0.0, ignore_eos=True)
        async for chunk in stream:
            if first is None and chunk["text"]:
                first = time.perf_counter()
        return {"t0": t0, "first": first, "end": time.perf_counter(),
                "tokens": stream.result["generated_tokens"]}
    try:
        return await run_clients([asyncio.create_task(one(c)) for c in conns], start)
    finally:
        for conn in conns:
            await conn.close()


async def run_clients(tasks: list[asyncio.Task], start: asyncio.Event) -> list[dict]:
    await asyncio.sleep(0.2)                # every client waiting before the clock starts
    start.set()
    return await asyncio.gather(*tasks)


def summary(results: list[dict]) -> dict:
    began = min(r["t0"] for r in results)
    wall = max(r["end"] for r in results) - began
    return {"aggregate": sum(r["tokens"] for r in results) / wall,
            "stream": statistics.median((r["tokens"] - 1) / (r["end"] - r["first"]) for r in results),
            "ttft_ms": statistics.median(r["first"] - r["t0"] for r in results) * 1000}


def throughput(url: str, home: Path, model: str, clients: list[int], tokens: int, rounds: int) -> None:
    for n in clients:
        paths = {"gateway": lambda: gateway_streams(url, model, n, tokens),
                 "direct": lambda: direct_streams(home, n, tokens)}
        runs: dict[str, list[dict]] = {name: [] for name in paths}
        for _ in range(rounds):             # interleaved, so that both paths share the conditions
            for name, run in paths.items():
                runs[name].append(summary(asyncio.run(run())))
        best = {name: max(rs, key=lambda r: r["aggregate"]) for name, rs in runs.items()}
        for name, r in best.items():
            each = ", ".join(f"{x['aggregate']:.1f}" for x in runs[name])
            print(f"  N={n:<3} {name:<8} aggregate {r['aggregate']:7.1f} tok/s   per stream "
                  f"{r['stream']:6.1f} tok/s   TTFT p50 {r['ttft_ms']:6.0f} ms   (each round: {each})",
                  flush=True)
        g, d = best["gateway"], best["direct"]
        print(f"  N={n:<3} ratio    aggregate {g['aggregate'] / d['aggregate']:7.2f}         per stream "
              f"{g['stream'] / d['stream']:6.2f}          (gateway / direct, best rounds; target >= 0.9)",
              flush=True)


# -- a chat resent whole --------------------------------------------------------------------------
def first_token(client: openai.OpenAI, model: str, messages: list[dict], max_tokens: int) -> dict:
    """Stream one chat answer: its time to first token, text, first token and usage."""
    t0, first, token, texts, usage = time.perf_counter(), None, None, [], None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        logprobs=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if token is None and choice.logprobs and choice.logprobs.content:
            first = time.perf_counter() - t0
            token = choice.logprobs.content[0]
        texts.append(choice.delta.content or "")
    return {"ttft": first, "text": "".join(texts), "token": token, "prompt": usage.prompt_tokens,
            "cached": usage.prompt_tokens_details.cached_tokens}


def conversation(url: str, model: str, warm_key: str, cold_key: str, turns: int, reply: int) -> None:
    warm = openai.OpenAI(base_url=url + "/v1", api_key=warm_key, max_retries=0, timeout=600)
    cold = openai.OpenAI(base_url=url + "/v1", api_key=cold_key, max_retries=0, timeout=600)
    for client in (warm, cold):         # connected, and each key's process opened, first
        try:
            client.get("/warm-up", cast_to=object)
        except openai.NotFoundError:
            pass
    messages, rows = [{"role": "system", "content": SYSTEM}], []
    for turn in range(1, turns + 1):
        messages.append({"role": "user", "content": f"{QUESTIONS[turn % len(QUESTIONS)]} (question {turn})"})
        w = first_token(warm, model, messages, reply)
        c = first_token(cold, model, messages, 1)
        rows.append((turn, w, c))
        messages.append({"role": "assistant", "content": w["text"]})
    print(f"  {'turn':>4} {'prompt':>7} {'reused':>7} {'TTFT reused':>12} {'recomputed':>11} {'speedup':>8}")
    shown = sorted({1, 2, turns // 4, turns // 2, 3 * turns // 4, turns} - {0})
    for turn, w, c in rows:
        if turn in shown:
            print(f"  {turn:>4} {w['prompt']:>7} {w['cached']:>7} {w['ttft'] * 1000:>9.0f} ms "
                  f"{c['ttft'] * 1000:>8.0f} ms {c['ttft'] / w['ttft']:>7.1f}x", flush=True)
    later = rows[1:]
    same = sum(w["token"].token == c["token"].token for _, w, c in rows)
    drift = max(abs(w["token"].logprob - c["token"].logprob) for _, w, c in rows)
    print(f"  follow-ups (turns 2..{turns}): median TTFT {statistics.median(w['ttft'] for _, w, _ in later) * 1000:.0f} ms"
          f" reused against {statistics.median(c['ttft'] for _, _, c in later) * 1000:.0f} ms recomputed;"
          f" median speedup {statistics.median(c['ttft'] / w['ttft'] for _, w, c in later):.1f}x")
    print(f"  first token the same with and without reuse in {same}/{turns} turns; largest logprob "
          f"difference {drift:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=60, help="short requests per path (median)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, default=48, help="tokens each streaming client asks for")
    ap.add_argument("--rounds", type=int, default=3,
                    help="streaming rounds per path, interleaved; the best of each is compared")
    ap.add_argument("--turns", type=int, default=20, help="turns of the chat resent whole")
    ap.add_argument("--reply", type=int, default=32, help="tokens of each of its answers")
    args = ap.parse_args()
    if args.turns < 2:
        ap.error("--turns must be at least 2: the first turn has no history to reuse")
    print(f"load average at start: {load()}", flush=True)
    home = Path(tempfile.mkdtemp(prefix="llmos-bench-", dir="/tmp"))
    (home / "config.toml").write_text(f'[driver]\nkv_blocks = {KV_BLOCKS}\n'
                                      f'[gateway]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    env = dict(os.environ, LLMOS_HOME=str(home), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-m", "userland.llmos", "boot"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    try:
        with syscalls.connect(home) as c:
            gateway = next(p for p in c.ps() if p["name"] == "gateway" and p["daemon"])
            url = gateway["advertised"]["url"]
            model = next(m["name"] for m in c.models() if m.get("device"))
        warm_key = cli(env, "keys", "add", "bench-warm").splitlines()[-1]
        cold_key = cli(env, "keys", "add", "bench-cold").splitlines()[-1]
        print(f"llmos booted: {model}, gateway at {url}", flush=True)
        print("per-request overhead, a 1-token answer:")
        overhead(url, home, model, args.requests)
        print(f"streaming, {args.tokens} greedy tokens a client, best of {args.rounds} rounds:")
        throughput(url, home, model, args.clients, args.tokens, args.rounds)
        print(f"a {args.turns}-turn chat resent whole ({args.reply}-token answers), each turn's time "
              f"to first token:")
        conversation(url, model, warm_key, cold_key, args.turns, args.reply)
    finally:
        subprocess.run([sys.executable, "-m", "userland.llmos", "shutdown"], env=env,
                       stdout=subprocess.DEVNULL)
        shutil.rmtree(home, ignore_errors=True)         # its weight cache alone is ~0.5 GB
        print(f"load average at end: {load()}")


if __name__ == "__main__":
    main()
