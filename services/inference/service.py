"""The inference service process: the Engine, fed by generate and chat, stepping the model's driver.

One loop runs the engine while it has work: schedule, send the step to the driver service (through
the kernel: ``Runtime.call(self.driver, "step", ...)``, the driver being ``cpu`` or ``cuda0`` as the
kernel placed it), postprocess, and hand each request's events to the call that made it, which
streams them to its program. A call that is cancelled (the program gave
up, or died) cancels its request, whose blocks are freed at the next step.

The driver holds the KV cache. If it dies, the kernel restarts it and the step that was in
flight fails; the engine then recomputes every running request from its tokens so far, on the new
driver (the next step waits in the kernel until the driver is back). A request is failed only if
the driver keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Callable

from services.inference.policy import Policy
from syscalls import errors, wire
from syscalls.runtime.config import Config
from syscalls.runtime.devices import model_driver
from syscalls.runtime.service import Reply, Service

DRIVER_RETRIES = 3          # consecutive failed steps before the batch's requests are failed
REPORT_S = 0.2             # the kernel hears of changes in model work at most this often while busy
HELD_RECHECK_S = 0.5        # how often held work (a throttled process) is looked at again
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "logprobs")


class Inference(Service):
    name = "inference"
    internal = ("sched_update", "process_exit")

    async def start(self) -> None:
        from drivers.model import Tokenizer, read_metadata
        from services.inference.engine import Engine
        self.driver = model_driver()        # the driver service that runs the model: cpu, cuda0, ...
        info = await self._driver_info()
        metadata = await asyncio.to_thread(read_metadata, info["model"])
        self.tokenizer = Tokenizer(metadata)
        self.model_path = info["model"]
        cfg = Config.load(self.paths.home / "config.toml").scheduler
        self.engine = Engine(info, self.tokenizer, max_running=cfg.max_running,
                             token_budget=cfg.token_budget, max_queue=cfg.max_queue,
                             decode_steps=cfg.decode_steps,
                             policy=Policy(cfg.band, cfg.aging_s, cfg.quantum))
        self.step_id, self.in_flight = 0, None     # the driver's step now running: (id, batch)
        self.reported: dict = {}
        self.reported_at = 0.0
        self.queues: dict[int, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.background: set[asyncio.Task] = set()
        self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _driver_info(self) -> dict:
        """The driver's info, waiting while it loads its model (saying so, so that the supervisor's
        start deadline is pushed back as long as the wait is real)."""
        call = asyncio.ensure_future(self.runtime.call(self.driver, "info", {}))
        waited = 0
        while True:
            done, _ = await asyncio.wait({call}, timeout=2.0)
            if done:
                return call.result()
            waited += 2
            self.progress(what=f"waiting for the {self.driver} driver", seconds=waited)

    async def stop(self) -> None:
        if hasattr(self, "loop_task"):
            self.loop_task.cancel()

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # -- the step loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        engine, failures = self.engine, 0
        while True:
            # Held work (a throttled process) becomes runnable with time alone: look again soon.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), HELD_RECHECK_S if engine.has_work() else None)
            self.wake.clear()
            while engine.has_work():
                step = engine.schedule()
                self._deliver(step.events)
                if step.release:
                    self.spawn(self.runtime.call(self.driver, "release", {"seq_ids": step.release}))
                if not step.seqs:
                    break           # nothing may run now; a request, a cancel, a CONT or time wakes us
                self.step_id += 1
                self.in_flight = (self.step_id, step.batch, any(m.get("steps", 1) > 1 for m in step.seqs))
                try:
                    sampled = await self.runtime.call(self.driver, "step",
                                                      {"batch": step.seqs, "id": self.step_id})
                except errors.ECANCELED:
                    continue                # aborted for an urgent request: nothing of it counts
                except errors.LLMOSError as e:
                    failures += 1
                    self.log.warning("driver_step_failed", error=str(e), failures=failures)
                    if failures > DRIVER_RETRIES:
                        self._deliver(engine.fail(step, f"the {self.driver} driver failed: {e.message}"))
                        failures = 0
                    else:
                        engine.device_lost()     # most likely it restarted: recompute on the new one
                    continue
                finally:
                    self.in_flight = None
                failures = 0
                self._deliver(engine.postprocess(step, sampled))
                self._report()
            self._report(force=True)

    def _report(self, force: bool = False) -> None:
        """Tell the kernel each process's model work (state, KV blocks, requests) when it changes:
        at most every REPORT_S while steps run, at once when the loop goes quiet."""
        now = time.monotonic()
        if not force and now - self.reported_at < REPORT_S:
            return
        self.reported_at = now              # looked at now, sent or not: not again for REPORT_S
        current = self.engine.by_process()
        if current != self.reported:
            self.reported = current
            self.runtime.send(wire.event("sched", {"procs": [{"pid": pid, **work}
                                                             for pid, work in current.items()]}))

    def _abort_for(self, pid: int) -> None:
        """A new request of pid would keep everyone in the running step out of the batch (the
        policy's band): rather than have it wait for the whole step, the driver gives the step up
        between two layers and the next one starts with the urgent request. Any other new request
        only makes a step that decodes ahead hand back after the token in progress."""
        if self.in_flight is None:
            return
        step_id, batch, ahead = self.in_flight
        policy, now = self.engine.policy, time.monotonic()
        if policy.hold(pid, now):
            return
        urgent = policy.effective(pid, now, now)
        if batch.steps and all(urgent + policy.band < policy.effective(s.pid, s.last_served, now)
                               for s, _ in batch.steps):
            self.log.info("step_aborted", step=step_id, for_pid=pid)
            self.spawn(self.runtime.call(self.driver, "abort", {"id": step_id, "mode": "abort"}))
        elif ahead:             # decoding ahead: hand back after the token in progress
            self.spawn(self.runtime.call(self.driver, "abort", {"id": step_id, "mode": "yield"}))

    def _deliver(self, events: list[dict]) -> None:
        for ev in events:
            q = self.queues.get(ev["seq_id"])
            if q is not None:
                q.put_nowait(ev)

    # -- the ops -------------------------------------------------------------------------------
    async def op_generate(self, args: dict, caller: dict, emit: Callable[..., None]) -> Reply:
        return await self._stream(args["prompt"], args, emit, "generate", caller)

    async def op_chat(self, args: dict, caller: dict, emit: Callable[..., None]) -> Reply:
        ctx = None if args.get("ctx") is None else self._context(args["ctx"], caller, "chat")
        messages = (ctx.messages if ctx else []) + args["messages"]
        prompt = self._render(messages, "chat", "messages")
        return await self._stream(prompt, args, emit, "chat", caller, ctx, messages)

    def _render(self, messages: list, call: str, arg: str) -> str:
        from drivers.model import ChatTemplateError
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except (ChatTemplateError, TypeError, KeyError, ValueError) as e:
            raise errors.EINVAL(f"{call}: argument '{arg}': {e}") from None

    def _check_model(self, model: str | None, call: str) -> None:
        """A request may name the loaded model by its registered name or its path; nothing else."""
        if model is None or model == str(self.model_path):
            return
        from syscalls.runtime.models import Registry
        try:
            path = Registry(self.paths).resolve(model)
        except errors.ENOENT:
            path = None
        if path is None or os.path.realpath(path) != os.path.realpath(self.model_path):
            raise errors.ENOENT(f"{call}: model {model!r} is not loaded (the {self.driver} driver runs "
                                f"{self.model_path})")

    # -- contexts ------------------------------------------------------------------------------
    def _context(self, handle: int, caller: dict, call: str):
        ctx = self.engine.contexts.get(handle)
        if ctx is None or ctx.pid != caller.get("pid"):
            raise errors.EBADF(f"{call}: context {handle} is not open in pid {caller.get('pid')}")
        return ctx

    def op_open_context(self, args: dict, caller: dict) -> int:
        self._check_model(args.get("model"), "open_context")
        messages = [{"role": "system", "content": args["system"]}] if args.get("system") else []
        return self._open(messages, caller, "open_context", "system")

    def _open(self, messages: list[dict], caller: dict, call: str, arg: str) -> int:
        from services.inference.engine import QuotaExceeded
        self._render(messages, call, arg)
        try:
            ctx = self.engine.open_context(int(caller["pid"]), str(self.model_path), messages)
        except QuotaExceeded as e:
            raise errors.EDQUOT(f"{call}: {e}") from None
        self._report(force=True)
        return ctx.ctx

    def op_close_context(self, args: dict, caller: dict) -> None:
        self.engine.close_context(self._context(args["ctx"], caller, "close_context"))
        self.wake.set()
        self._report(force=True)

    async def op_save_context(self, args: dict, caller: dict) -> dict:
        ctx = self._context(args["ctx"], caller, "save_context")
        done = await self.runtime.call("storage", "put", {"key": args["key"], "value": ctx.saved(),
                                                          "if_version": None, "ns": args.get("ns")},
                                      as_pid=caller["pid"])
        return {"version": done["version"], "size": done["size"]}

    async def op_load_context(self, args: dict, caller: dict) -> int:
        from services.inference.contexts import SAVE_FORMAT
        got = await self.runtime.call("storage", "get", {"key": args["key"], "ns": args.get("ns")},
                                      as_pid=caller["pid"])
        value = got["value"]
        messages = value.get("messages") if isinstance(value, dict) else None
        if not isinstance(value, dict) or value.get("format") != SAVE_FORMAT or not isinstance(messages, list) \
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages):
            raise errors.EINVAL(f"load_context: key {args['key']!r} does not hold a saved context "
                                f"(save_context writes one)")
        return self._open(messages, caller, "load_context", "key")

    def op_contexts(self, args: dict, caller: dict) -> list[dict]:
        pid = caller.get("pid") if args.get("pid") is None else args["pid"]
        if pid != caller.get("pid") and not caller.get("privileged"):
            raise errors.EPERM(f"contexts: those of pid {pid} are its own; listing them needs privilege")
        now, blocks = time.monotonic(), self.engine.blocks
        return [{"ctx": c.ctx, "pid": c.pid, "model": c.model, "messages": len(c.messages),
                 "tokens": len(c.tokens), "kv_blocks": len(blocks.table(c.owner)),
                 "last_used": round(now - c.last_used, 3)}
                for c in self.engine.contexts.values() if c.pid == pid]

    def op_process_exit(self, args: dict, caller: dict) -> None:
        """From the kernel: a process has ended; its contexts close with it."""
        pid = args.get("pid")
        for ctx in [c for c in self.engine.contexts.values() if c.pid == pid]:
            self.engine.close_context(ctx)
        self.wake.set()
        self._report(force=True)

    def op_runqueue(self, args: dict, caller: dict) -> dict:
        engine, pid = self.engine, args.get("pid")
        usage = engine.usage()
        requests = engine.scheduler.describe()
        counts = {state: sum(1 for r in requests if r["state"] == state) for state in
                  ("running", "ready", "suspended", "stopped", "throttled")}
        return {"max_running": engine.scheduler.max_running, "max_queue": engine.max_queue, **counts,
                "blocks_total": usage["blocks_total"], "blocks_used": usage["blocks_used"],
                "blocks_cached": engine.blocks.distinct(c.owner for c in engine.scheduler.idle_contexts()),
                "requests": [r for r in requests if pid is None or r["pid"] == pid]}

    def op_sched_update(self, args: dict, caller: dict) -> None:
        """From the kernel: a process's priority, limits or stopped state changed."""
        pid = int(args["pid"])
        if pid in self.engine.policy.procs:
            self.engine.policy.update(pid, priority=args.get("priority"), stopped=args.get("stopped"),
                                      limits=args.get("limits"))
            self.wake.set()
            if self.in_flight is not None and self.in_flight[2]:     # decoding ahead: decide again now
                self.spawn(self.runtime.call(self.driver, "abort", {"id": self.in_flight[0], "mode": "yield"}))

    def _spelled(self, logprobs: list[dict]) -> list[dict]:
        """Each token's bytes beside its id, so that a program (the HTTP gateway) can show a
        token's logprob without a detokenize call per token, and a token that is part of a UTF-8
        character is still told apart from its neighbours."""
        spell = self.tokenizer.token_bytes
        return [{"token": lp["token"], "logprob": lp["logprob"], "bytes": spell(lp["token"]),
                 "top": [[t, p, spell(t)] for t, p in lp["top"]]} for lp in logprobs]

    async def _stream(self, prompt: str, args: dict, emit: Callable[..., None], call: str,
                      caller: dict, ctx=None, conversation: list | None = None) -> Reply:
        from services.inference.engine import ContextBusy, QueueFull, QuotaExceeded, RequestError
        self._check_model(args.get("model"), call)
        sampling = {k: args[k] for k in SAMPLING if args.get(k) is not None}
        pid = int(caller.get("pid") or 0)
        self.engine.policy.update(pid, priority=caller.get("priority", 0),
                                  stopped=caller.get("stopped", False), limits=caller.get("limits") or {})
        try:
            seq_id = self.engine.add(prompt, sampling, max_tokens=args["max_tokens"],
                                     stop=args.get("stop") or (), stop_ids=args.get("stop_ids") or (),
                                     ignore_eos=bool(args.get("ignore_eos")), pid=pid, ctx=ctx)
        except (QueueFull, ContextBusy) as e:
            raise errors.EAGAIN(f"{call}: {e}") from None
        except QuotaExceeded as e:
            raise errors.EDQUOT(f"{call}: {e}") from None
        except RequestError as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        finally:
            self.engine.scheduler.forget_if_idle(pid)     # refused: keep no state for it
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[seq_id] = queue
        self.wake.set()
        self._abort_for(pid)
        reply, streamed = [], 0
        try:
            while True:
                ev = await queue.get()
                reply.append(ev["text"])
                piece = {"text": ev["text"], "tokens": ev["tokens"]}
                if "logprobs" in ev:
                    piece["logprobs"] = self._spelled(ev["logprobs"])
                if ev["text"] or ev["tokens"]:
                    # counted as they come, so ps and top see a long generation grow
                    emit(piece, {"tokens_out": len(ev["tokens"])} if ev["tokens"] else None)
                    streamed += len(ev["tokens"])
                if "finish" in ev:
                    if ev["finish"] == "error":
                        raise errors.from_wire(ev.get("error_code", "EIO"), f"{call}: {ev['error']}")
                    if ctx is not None and ev["finish"] in ("stop", "length"):
                        ctx.messages = conversation + [{"role": "assistant", "content": "".join(reply)}]
                    counts = {k: v for k, v in ev.items() if k not in ("seq_id", "text", "tokens",
                                                                       "logprobs", "error_code")}
                    return Reply(counts, {
                        "tokens_in": int(counts.get("prompt_tokens") or 0),
                        "tokens_out": max(0, int(counts.get("generated_tokens") or 0) - streamed)})
        except asyncio.CancelledError:
            self.engine.cancel(seq_id)
            self.wake.set()
            raise
        finally:
            self.queues.pop(seq_id, None)

