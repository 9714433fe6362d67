"""The inference engine: requests in, streamed text and token events out, one step at a time.

A step is: schedule (who runs, with how many tokens), the driver's step (forward and sample, in the
driver), postprocess (append tokens, stream text, check stops and limits). The engine owns requests,
the block allocator, the scheduler and detokenisation; the driver owns the model, the KV pool and
sampling. The engine never calls the driver: ``schedule()`` returns a Step, whose ``seqs`` go to
the driver's step op and whose ``release`` to its release op; the answer goes to ``postprocess()``
(or ``fail()``). The inference service sends them through the kernel; ``run_in_process`` hands them
to a ModelRunner in this process, for tests and benchmarks. ``cancel()`` between schedule and
postprocess is safe: a cancelled sequence's results are ignored.

Events are plain dicts, one per request per step that produced something:
    {"seq_id", "text", "tokens"[, "logprobs"]}                          while it runs
    ... plus "finish" ("stop" | "length" | "cancelled" | "error"), "stop_reason", "error",
    "prompt_tokens", "generated_tokens", "ttft_s", "decode_s", "preemptions"    on its last event
Never: touch tensors or logits, or reach the driver itself.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from collections.abc import Sequence as Seq
from typing import Any

from drivers.model.params import SamplingParams, SamplingParamsError
from drivers.model.tokenizer import StreamDecoder, Tokenizer
from services.inference.blocks import BlockAllocator
from services.inference.contexts import MAX_PER_PROCESS as MAX_CONTEXTS, Context, common_prefix
from services.inference.policy import Policy
from services.inference.scheduler import Batch, Scheduler, held_on
from services.inference.sequence import Sequence, Status
from syscalls.runtime.steps import Sampled, SeqStep


class RequestError(ValueError):
    """A request the engine refuses (bad parameter, prompt too long); the message says which and why."""


class QueueFull(RequestError):
    """The run queue is at its bound: try again later (EAGAIN)."""


class QuotaExceeded(RequestError):
    """The request would take its process past one of its limits (EDQUOT)."""


class ContextBusy(RequestError):
    """A turn on a context that already has one in flight (EAGAIN)."""


@dataclass
class Step:
    """One step's work: the scheduler's batch, the driver's messages, and what it must forget."""
    batch: Batch
    seqs: list[SeqStep]         # the driver's step op's "batch"; empty: nothing may run now
    events: list[dict]          # requests that ended without running (the KV cache cannot hold them)
    release: list[int]          # sequences the driver may forget (release op), sent before seqs


class Engine:
    def __init__(self, info: dict, tokenizer: Tokenizer, *, max_running: int = 32, token_budget: int = 256,
                 max_queue: int = 1024, decode_steps: int = 1, policy: Policy | None = None):
        """info is the driver's (its info op): the KV pool's geometry and the model's context length."""
        self.tokenizer = tokenizer
        self.context_length = int(info["context_length"])
        self.vocab_size = int(info["vocab_size"])
        self.blocks = BlockAllocator(int(info["num_blocks"]), int(info["block_size"]))
        self.scheduler = Scheduler(self.blocks, max_running, token_budget, policy)
        self.policy = self.scheduler.policy
        self.max_queue = max_queue
        self.decode_steps = decode_steps      # tokens a decoder may get per driver step when nobody waits
        self.contexts = self.scheduler.contexts
        self._ctx_ids = itertools.count(1)
        self._seqs: dict[int, Sequence] = {}
        self._decoders: dict[int, StreamDecoder] = {}
        self._ids = itertools.count(1)
        self._arrivals = itertools.count()
        self._release: list[int] = []     # finished sequences the driver has not been told about yet
        self._ended: list[dict] = []      # last events of requests that ended as they were added
        self._replayed: dict[int, str] = {}   # text of the tokens requests were added with, until schedule()

    # ------------------------------------------------------------------------------------------ requests

    def add(self, prompt: str | Seq[int], sampling: SamplingParams | dict | None = None, *, max_tokens: int = 256,
            stop: Iterable[str] = (), stop_ids: Iterable[int] = (), ignore_eos: bool = False,
            seq_id: int | None = None, pid: int = 0, ctx: Context | None = None,
            constraint: str | None = None, resume: Seq[int] = ()) -> int:
        """Queue a request of process pid; return its seq_id. Raises RequestError (or QueueFull,
        QuotaExceeded) for anything the engine cannot run. The process's priority and limits are
        the policy's (``engine.policy.update(pid, ...)`` first). With ctx, the prompt is the whole
        conversation: the prefix it shares with the context's history is not computed again.
        constraint is a grammar the output keeps to (drivers.model.constraints.grammar_for, checked
        by the caller); the driver masks each token of it. resume: tokens this request generated
        before (on an inference service that died, as its program had them): they count as its
        output, are computed with the prompt and never streamed again, and a seeded sampler goes
        on from where they leave its random stream; ``replayed(seq_id)``, asked before the next
        ``schedule()``, is their text."""
        if ctx is not None and ctx.busy is not None:
            raise ContextBusy(f"context {ctx.ctx} has a turn in flight (request {ctx.busy}); one turn "
                              f"at a time")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise RequestError("the prompt is empty")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
            raise RequestError(f"prompt token ids must be integers in 0..{self.vocab_size - 1}")
        if len(ids) >= self.context_length:
            raise RequestError(f"the prompt has {len(ids)} tokens but the model's context window is "
                               f"{self.context_length} tokens (at most {self.context_length - 1} leave room "
                               f"to generate)")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if len(ids) >= capacity:
            raise RequestError(f"the prompt has {len(ids)} tokens but the KV cache holds only {capacity}")
        try:
            params = sampling if isinstance(sampling, SamplingParams) else SamplingParams.from_dict(sampling)
        except (SamplingParamsError, TypeError) as e:
            raise RequestError(str(e)) from None
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        stop, stop_ids = [stop] if isinstance(stop, str) else list(stop), set(stop_ids)
        if any(not isinstance(s, str) or not s for s in stop):
            raise RequestError("stop strings must be non-empty strings")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in stop_ids):
            raise RequestError(f"stop_ids must be integers in 0..{self.vocab_size - 1}")
        if not ignore_eos:
            stop_ids |= set(self.tokenizer.eog_ids)
        resume = list(resume)
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in resume):
            raise RequestError(f"resumed token ids must be integers in 0..{self.vocab_size - 1}")
        self._admit(pid, len(ids) + len(resume))
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._seqs:
                seq_id = next(self._ids)
        elif seq_id in self._seqs:
            raise RequestError(f"seq_id {seq_id} is already in use")
        seq = Sequence(seq_id, ids, params.to_dict(), min(max_tokens, self.context_length - len(ids)),
                       frozenset(stop_ids), arrival=next(self._arrivals), pid=pid, constraint=constraint)
        self._seqs[seq_id] = seq
        self._decoders[seq_id] = StreamDecoder(self.tokenizer, stop)
        self.scheduler.add(seq)
        if ctx is not None:
            self._attach(seq, ctx)
        if resume:
            self._replay(seq, resume)
        return seq_id

    def replayed(self, seq_id: int) -> str:
        """The text of the tokens a request was just added with (resume); "" without."""
        return self._replayed.get(seq_id, "")

    def _replay(self, seq: Sequence, tokens: list[int]) -> None:
        """Take tokens generated before as seq's output: through its decoder (their text is what
        was shown, and what the decoder holds back it holds back again), then the same ends as a
        token sampled now; one that has ended already ends at the next schedule()."""
        decoder, text, end = self._decoders[seq.seq_id], [], None
        for token in tokens:
            seq.output.append(token)
            if token in seq.stop_ids:
                seq.stop_reason, end = token, "stop"
                break
            text.append(decoder.push(token))
            if decoder.stopped:
                seq.stop_reason, end = decoder.stopped_on, "stop"
                break
        self._replayed[seq.seq_id] = "".join(text)
        if end is None and len(seq.output) >= seq.max_tokens:
            end = "length"
        if end is not None:
            self._ended.append(self._finish(seq, end, {"seq_id": seq.seq_id, "tokens": [],
                                                       "text": decoder.flush()}))

    # ------------------------------------------------------------------------------------------ contexts

    def open_context(self, pid: int, model: str, messages: list[dict]) -> Context:
        mine = sum(1 for c in self.contexts.values() if c.pid == pid)
        if mine >= MAX_CONTEXTS:
            raise QuotaExceeded(f"pid {pid} has {mine} contexts open on model {model!r}, the most a "
                                f"process may hold on one model ({MAX_CONTEXTS}); close one first")
        ctx = Context(next(self._ctx_ids), pid, model, list(messages))
        self.contexts[ctx.ctx] = ctx
        return ctx

    def adopt_context(self, ctx: Context) -> None:
        """Take over a context from another engine (its model was unloaded, or updated to a new
        file): it keeps its messages; its K/V stayed behind, so its next turn recomputes them."""
        ctx.ctx, ctx.tokens, ctx.busy = next(self._ctx_ids), [], None
        self.contexts[ctx.ctx] = ctx

    def close_context(self, ctx: Context) -> None:
        if ctx.busy is not None:
            self.cancel(ctx.busy)
        self.blocks.free(ctx.owner)
        self.contexts.pop(ctx.ctx, None)

    def _attach(self, seq: Sequence, ctx: Context) -> None:
        """Start a turn on the context's cached prefix (all but the last prompt token, at most)."""
        keep = min(common_prefix(ctx.tokens, seq.prompt), len(seq.prompt) - 1)
        nblocks = self.blocks.blocks_for(keep)
        self.blocks.trim(ctx.owner, nblocks)           # past the common prefix its K/V are stale
        ctx.tokens = ctx.tokens[:keep]
        if keep and len(self.blocks.table(ctx.owner)) == nblocks:
            self.blocks.share(seq.seq_id, self.blocks.table(ctx.owner))
            seq.num_computed = seq.cached = keep
        seq.ctx, ctx.busy = ctx.ctx, seq.seq_id

    def _detach(self, seq: Sequence) -> None:
        """The turn has ended (however): its blocks and computed tokens are the context's history."""
        ctx = self.contexts.get(seq.ctx)
        if ctx is None or ctx.busy != seq.seq_id:
            return
        ctx.tokens = seq.tokens[:seq.num_computed]
        self.blocks.move(seq.seq_id, ctx.owner)
        ctx.busy, ctx.last_used = None, time.monotonic()

    def _admit(self, pid: int, prompt_len: int) -> None:
        """The run queue's bound and the process's limits, checked before a request is queued."""
        queued = len(self.scheduler.waiting)
        if queued >= self.max_queue:
            raise QueueFull(f"the run queue is full: {queued} requests wait (max_queue {self.max_queue}); "
                            f"try again later")
        proc = self.policy.procs.get(pid)
        limits = proc.limits if proc else {}
        if "sequences" in limits:
            mine = sum(1 for s in self.scheduler.seqs if s.pid == pid)
            if mine >= limits["sequences"]:
                raise QuotaExceeded(f"pid {pid} has {mine} requests running or queued; its sequences "
                                    f"limit is {limits['sequences']}")
        if "kv_blocks" in limits:
            # the limit counts every model's blocks; the process's idle contexts elsewhere give way
            need = self.blocks.blocks_for(prompt_len + 1)
            elsewhere = self.scheduler.elsewhere(pid)
            if need > limits["kv_blocks"] - sum(busy for _, busy in elsewhere.values()):
                raise QuotaExceeded(f"the prompt needs {need} KV blocks of {self.blocks.block_size} tokens; "
                                    f"pid {pid}'s kv_blocks limit is {limits['kv_blocks']}"
                                    f"{held_on(elsewhere, requests=True)}")
        if "tokens_per_minute" in limits:
            now = time.monotonic()
            wait = proc.throttle_left(now)
            if wait > 0:
                raise QuotaExceeded(f"pid {pid} generated {proc.tokens_last_minute(now)} tokens in the last "
                                    f"minute; its tokens_per_minute limit is {limits['tokens_per_minute']} "
                                    f"(try again in {wait:.0f} s)")

    def cancel(self, seq_id: int) -> dict | None:
        """Finish a request now and free its blocks; return its last event (None if it is unknown)."""
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        return self._finish(seq, "cancelled", {"seq_id": seq_id, "text": "", "tokens": []})

    def has_work(self) -> bool:
        return bool(self._ended) or self.scheduler.has_work()

    def usage(self) -> dict[str, int]:
        return {**self.blocks.usage(), "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting)}

    def by_process(self) -> dict[int, dict]:
        """Each process's model work: {pid: {state, kv_blocks, sequences, contexts}}; state is the
        most active of its requests' (running > ready > suspended), None with contexts only."""
        rank = {"running": 0, "ready": 1, "suspended": 2, "throttled": 2, "stopped": 3, None: 4}
        out: dict[int, dict] = {}

        def entry(pid: int) -> dict:
            return out.setdefault(pid, {"state": None, "kv_blocks": 0, "sequences": 0, "contexts": 0})
        for r in self.scheduler.describe():
            p = entry(r["pid"])
            p["sequences"] += 1
            if rank[r["state"]] < rank[p["state"]]:
                p["state"] = r["state"]
        for ctx in self.contexts.values():
            entry(ctx.pid)["contexts"] += 1
        for pid, p in out.items():
            p["kv_blocks"] = self.scheduler.held_blocks(pid)
        return out

    # ------------------------------------------------------------------------------------------ the step

    def schedule(self) -> Step:
        """Pick this step's work: the driver's messages, and events of requests that cannot run."""
        release, self._release = self._release, []
        ended, self._ended = self._ended, []
        self._replayed.clear()
        batch = self.scheduler.schedule()
        events = ended + [self._finish(seq, "length", {"seq_id": seq.seq_id, "text": self._decoders[seq.seq_id].flush(),
                                               "tokens": []},
                               error=f"the KV cache ({self.blocks.num_blocks} blocks of {self.blocks.block_size}"
                                     f" tokens) cannot hold {len(seq)} tokens")
                  for seq in batch.starved]
        for seq, why in batch.over_quota:
            events.append(self._finish(seq, "error", {"seq_id": seq.seq_id, "text": self._decoders[seq.seq_id].flush(),
                                                      "tokens": [], "error_code": "EDQUOT"}, error=why))
        msgs: list[SeqStep] = []
        ahead = self._decode_ahead(batch)
        for seq, n in batch.steps:
            start = seq.num_computed
            msgs.append({"seq_id": seq.seq_id, "tokens": seq.tokens[start:start + n], "start": start,
                         "block_table": list(self.blocks.table(seq.seq_id)), "sample": start + n == len(seq),
                         "params": seq.params if start == 0 or not seq.known else None})
            if msgs[-1]["params"] is not None and seq.constraint is not None:
                msgs[-1]["constraint"] = {"grammar": seq.constraint, "prompt_len": len(seq.prompt)}
            if msgs[-1]["params"] is not None and seq.output:
                msgs[-1]["drawn"] = len(seq.output)     # where its random stream stands
            if not seq.known:
                seq.known = True
                if start:
                    msgs[-1]["history"] = seq.tokens[:start]
            if ahead.get(seq.seq_id, 1) > 1:
                msgs[-1].update(steps=ahead[seq.seq_id], stop_ids=sorted(seq.stop_ids))
        return Step(batch, msgs, events, release)

    def _decode_ahead(self, batch: Batch) -> dict[int, int]:
        """How many tokens each decoder may take in this one driver step (multi-step decoding).

        Only when the batch is all decoders and no request waits (so no scheduling decision is
        delayed; a request that arrives meanwhile makes the driver hand back early), and not for
        processes with a kv_blocks or tokens_per_minute limit, which are counted token by token.
        The blocks for the extra positions are taken now, if free."""
        if self.decode_steps <= 1 or not batch.steps or any(s.pending != 1 for s, _ in batch.steps) \
                or any(s.status is not Status.RUNNING and not s.hold for s in self.scheduler.seqs):
            return {}
        ahead = {}
        for seq, _ in batch.steps:
            proc = self.policy.procs.get(seq.pid)
            if proc is not None and ("kv_blocks" in proc.limits or "tokens_per_minute" in proc.limits):
                continue
            k = min(self.decode_steps, seq.max_tokens - len(seq.output))
            while k > 1 and not self.blocks.can_grow(seq.seq_id, seq.num_computed + k):
                k -= 1
            if k > 1:
                self.blocks.grow(seq.seq_id, seq.num_computed + k)
                ahead[seq.seq_id] = k
        return ahead

    def postprocess(self, step: Step, sampled: list[Sampled]) -> list[dict]:
        """The driver's answer to step.seqs: append each token, stream text, end what has ended."""
        picks = {s["seq_id"]: s for s in sampled}
        events = []
        for seq, n in step.batch.steps:
            if seq.finished:             # cancelled while the step was in flight
                continue
            seq.num_computed += n
            if seq.num_computed == len(seq):
                pick = picks.get(seq.seq_id)
                if pick is None:
                    events.append(self._finish(seq, "error", {"seq_id": seq.seq_id, "text": "", "tokens": []},
                                               error="the driver returned no token for this sequence"))
                    continue
                if pick.get("error"):           # its constraint admits no token here
                    events.append(self._finish(seq, "error", {"seq_id": seq.seq_id, "tokens": [],
                                                              "text": self._decoders[seq.seq_id].flush(),
                                                              "error_code": "EINVAL"},
                                               error=f"constraint: {pick['error']}"))
                    continue
                event = self._append(seq, pick)
                for more in pick.get("next", ()):       # decoded ahead in the same driver step
                    if seq.finished:
                        break                           # what came after a stop is dropped
                    seq.num_computed += 1
                    _merge(event, self._append(seq, more))
                events.append(event)
        return events

    def device_lost(self) -> None:
        """The driver lost its KV cache and samplers (it restarted): recompute whatever was running.
        Output is unchanged by this: greedy is, and a seeded sampler is made again where its
        stream stood (``drawn``)."""
        self.scheduler.evict_all()
        self._release = []          # the new driver knows none of them
        for seq in self._seqs.values():
            seq.known = False

    def fail(self, step: Step, message: str) -> list[dict]:
        """The driver could not run step.seqs: its requests end with an error."""
        return [self._finish(seq, "error", {"seq_id": seq.seq_id, "text": "", "tokens": []}, error=message)
                for seq, _ in step.batch.steps if not seq.finished]

    # ------------------------------------------------------------------------------------------ postprocess

    def _append(self, seq: Sequence, pick: Sampled) -> dict:
        token = int(pick["token"])
        now = time.monotonic()
        if seq.first_token_at is None:
            seq.first_token_at = now
        self.policy.charge(seq.pid, 1, now)
        seq.output.append(token)
        decoder = self._decoders[seq.seq_id]
        event: dict[str, Any] = {"seq_id": seq.seq_id, "text": "", "tokens": [token]}
        if seq.params.get("logprobs"):
            event["logprobs"] = [{"token": token, "logprob": pick["logprob"], "top": pick["top"]}]
        if token in seq.stop_ids:       # the stop token itself is counted but never shown as text
            seq.stop_reason = token
            event["text"] = decoder.flush()
            return self._finish(seq, "stop", event)
        event["text"] = decoder.push(token)
        if decoder.stopped:
            seq.stop_reason = decoder.stopped_on
            return self._finish(seq, "stop", event)
        if len(seq.output) >= seq.max_tokens:
            event["text"] += decoder.flush()
            return self._finish(seq, "length", event)
        return event

    def _finish(self, seq: Sequence, reason: str, event: dict, error: str | None = None) -> dict:
        if seq.ctx is not None:
            self._detach(seq)
        self.scheduler.remove(seq)
        seq.status, seq.finish_reason, seq.error = Status.FINISHED, reason, error
        seq.finished_at = time.monotonic()
        del self._seqs[seq.seq_id]
        del self._decoders[seq.seq_id]
        self._release.append(seq.seq_id)
        event.update(finish=reason, stop_reason=seq.stop_reason, error=error, **seq.stats())
        return event


def _merge(event: dict, later: dict) -> None:
    """One event for the tokens a sequence got in one step."""
    event["text"] += later.pop("text")
    event["tokens"] += later.pop("tokens")
    if "logprobs" in later:
        event.setdefault("logprobs", []).extend(later.pop("logprobs"))
    event.update(later)


# -------------------------------------------------------------------------------------- in this process

def step_in_process(engine: Engine, runner) -> list[dict]:
    """One step as the inference service takes it, with the driver's ModelRunner (drivers/runner.py)
    in this process: schedule, release, the runner's step, postprocess; this step's events."""
    step = engine.schedule()
    if step.release:
        runner.release(step.release)
    if not step.seqs:
        return step.events
    try:
        sampled = runner.step(step.seqs)
    except Exception as e:  # noqa: BLE001 -- a failed step ends this batch's requests, never the engine
        return step.events + engine.fail(step, f"driver step failed: {type(e).__name__}: {e}")
    return step.events + engine.postprocess(step, sampled)


def run_in_process(engine: Engine, runner) -> dict[int, dict]:
    """Step until every request has finished; each one's whole text, tokens and last event."""
    out: dict[int, dict] = {}
    while engine.has_work():
        for ev in step_in_process(engine, runner):
            r = out.setdefault(ev["seq_id"], {"text": "", "tokens": []})
            r["text"] += ev["text"]
            r["tokens"] += ev["tokens"]
            if "finish" in ev:
                r.update({k: v for k, v in ev.items() if k not in ("text", "tokens")})
    return out
