"""The inference service process: the Engine, fed by generate and chat, stepping the CPU driver.

One loop runs the engine while it has work: schedule, send the step to the driver (through the
kernel: ``Runtime.call("cpu", "step", ...)``), postprocess, and hand each request's events to the
call that made it, which streams them to its program. A call that is cancelled (the program gave
up, or died) cancels its request, whose blocks are freed at the next step.

The driver holds the KV cache. If it dies, the kernel restarts it and the step that was in
flight fails; the engine then recomputes every running request from its tokens so far, on the new
driver (the next step waits in the kernel until the driver is back). A request is failed only if
the driver keeps failing.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from drivers.devices import model_driver
from services.runtime import Service
from syscalls import errors

DRIVER = model_driver()     # "cpu", or "cuda0" when [driver] device put the model on a GPU
DRIVER_RETRIES = 3          # consecutive failed steps before the batch's requests are failed
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "logprobs")


class _DriverProxy:
    """What the Engine sees of the driver: its info; releases go out as messages. Steps are sent by
    the service's loop itself (Engine.schedule / postprocess), since they must be awaited."""

    def __init__(self, service: "Inference", info: dict):
        self.service, self._info = service, info

    def info(self) -> dict:
        return self._info

    def step(self, batch: list) -> list:
        raise RuntimeError("the inference service steps the driver itself")

    def release(self, seq_ids: list[int]) -> None:
        self.service.spawn(self.service.runtime.call(DRIVER, "release", {"seq_ids": list(seq_ids)}))


class Inference(Service):
    name = "inference"

    async def start(self) -> None:
        from drivers.model import Tokenizer, read_metadata
        from services.inference.engine import Engine
        from services.models import Registry
        info = await self._driver_info()
        cache = Registry(self.paths).cache_dir
        metadata = await asyncio.to_thread(read_metadata, info["model"], cache)
        self.tokenizer = Tokenizer(metadata)
        self.model_path = info["model"]
        self.engine = Engine(_DriverProxy(self, info), self.tokenizer)
        self.queues: dict[int, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.background: set[asyncio.Task] = set()
        self.loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _driver_info(self) -> dict:
        """The driver's info, waiting while it loads its model (saying so, so that the supervisor's
        start deadline is pushed back as long as the wait is real)."""
        call = asyncio.ensure_future(self.runtime.call(DRIVER, "info", {}))
        waited = 0
        while True:
            done, _ = await asyncio.wait({call}, timeout=2.0)
            if done:
                return call.result()
            waited += 2
            self.progress(what=f"waiting for the {DRIVER} driver", seconds=waited)

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
            await self.wake.wait()
            self.wake.clear()
            while engine.has_work():
                batch, msgs, events = engine.schedule()
                self._deliver(events)
                if not msgs:
                    break                   # nothing can run now; a new request or a cancel wakes us
                try:
                    sampled = await self.runtime.call(DRIVER, "step", {"batch": msgs})
                except errors.LLMOSError as e:
                    failures += 1
                    self.log.warning("driver_step_failed", error=str(e), failures=failures)
                    if failures > DRIVER_RETRIES:
                        self._deliver(engine.fail(batch, f"the {DRIVER} driver failed: {e.message}"))
                        failures = 0
                    else:
                        engine.device_lost()     # most likely it restarted: recompute on the new one
                    continue
                failures = 0
                self._deliver(engine.postprocess(batch, sampled))

    def _deliver(self, events: list[dict]) -> None:
        for ev in events:
            q = self.queues.get(ev["seq_id"])
            if q is not None:
                q.put_nowait(ev)

    # -- the ops -------------------------------------------------------------------------------
    async def op_generate(self, args: dict, caller: dict, emit: Callable[[Any], None]) -> dict:
        return await self._stream(args["prompt"], args, emit, "generate")

    async def op_chat(self, args: dict, caller: dict, emit: Callable[[Any], None]) -> dict:
        from drivers.model import ChatTemplateError
        try:
            prompt = self.tokenizer.apply_chat_template(args["messages"], add_generation_prompt=True)
        except (ChatTemplateError, TypeError, KeyError, ValueError) as e:
            raise errors.EINVAL(f"chat: argument 'messages': {e}") from None
        return await self._stream(prompt, args, emit, "chat")

    async def _stream(self, prompt: str, args: dict, emit: Callable[[Any], None], call: str) -> dict:
        from services.inference.engine import RequestError
        model = args.get("model")
        if model is not None and model not in (self.model_path, "smollm2-135m-instruct") \
                and not str(self.model_path).endswith(f"/{model}"):
            raise errors.ENOENT(f"{call}: model {model!r} is not loaded (the {DRIVER} driver runs "
                                f"{self.model_path})")
        sampling = {k: args[k] for k in SAMPLING if args.get(k) is not None}
        try:
            seq_id = self.engine.add(prompt, sampling, max_tokens=args["max_tokens"],
                                     stop=args.get("stop") or (), stop_ids=args.get("stop_ids") or (),
                                     ignore_eos=bool(args.get("ignore_eos")))
        except RequestError as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[seq_id] = queue
        self.wake.set()
        try:
            while True:
                ev = await queue.get()
                piece = {"text": ev["text"], "tokens": ev["tokens"]}
                if "logprobs" in ev:
                    piece["logprobs"] = ev["logprobs"]
                if ev["text"] or ev["tokens"]:
                    emit(piece)
                if "finish" in ev:
                    if ev["finish"] == "error":
                        raise errors.EIO(f"{call}: {ev['error']}")
                    return {k: v for k, v in ev.items() if k not in ("seq_id", "text", "tokens",
                                                                     "logprobs")}
        except asyncio.CancelledError:
            self.engine.cancel(seq_id)
            self.wake.set()
            raise
        finally:
            self.queues.pop(seq_id, None)

