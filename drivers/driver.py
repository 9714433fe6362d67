"""What every driver service does, whatever its device: own one copy of a model and its KV cache.

At start a driver loads one model (``[driver] model``: a registered name or an absolute path; the
default model otherwise; a driver instance the kernel started for a model, LLMOS_MODEL's file) onto its device, allocates the KV pool there, and then executes batched
forward-and-sample steps for the inference service. Requests carry token ids, positions, block
tables and sampling parameters; answers carry sampled token ids and logprobs: tensors and logits
never leave this process (syscalls/runtime/steps.py has the messages). The model itself is a
ModelRunner (drivers/runner.py).

A step runs in a worker thread (torch releases the GIL), so the event loop keeps answering the
kernel's pings during a long prefill; steps are serialised, as the KV pool is one.

A driver whose model does not load (a file it cannot read, out of memory) says why before it
exits (``_failed``), so that ``models`` and the requests waiting for the model show the reason,
not only the exit status.

A subclass names its torch device (``torch_device``) and says what it knows of it
(``device_info``: device_name, memory_total, memory_used); drivers/cpu.py and drivers/cuda.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from pathlib import Path
from typing import Any

from syscalls import errors
from syscalls.runtime.config import Config
from syscalls.runtime.devices import MODEL_ENV
from syscalls.runtime.models import Registry
from syscalls.runtime.service import Service

from drivers.runner import ModelRunner

LAST_WORD_S = 5.0           # how long a driver whose model failed to load waits to be heard


class Driver(Service):
    """Base class of the driver services: subclasses name their device."""

    def torch_device(self) -> str:
        """The torch device this driver owns: "cpu", "cuda:0", ..."""
        raise NotImplementedError

    def device_info(self) -> dict[str, Any]:
        """device_name, memory_total and memory_used (bytes, the whole device's), and any more."""
        raise NotImplementedError

    @classmethod
    def preload(cls, paths) -> None:
        """Import the torch engine (torch's own import is ~2 s of a driver's start) unless the
        config asks for the lean one; a spare driver has it done before it is needed."""
        try:
            cfg = Config.load(paths.home / "config.toml").driver
        except Exception:           # noqa: BLE001 - start() loads it again and says what is wrong
            return
        if cfg.engine == "torch" or (cfg.engine == "auto" and cfg.dense_copy != "never"):
            import drivers.model.llama  # noqa: F401

    async def start(self) -> None:
        cfg = Config.load(self.paths.home / "config.toml").driver
        registry = Registry(self.paths)
        # a driver instance (kernel/instances.py) is told its model; the boot driver reads config
        spec = os.environ.get(MODEL_ENV) or cfg.model or None
        path = Path(spec) if spec and os.path.isabs(spec) else registry.resolve(spec)

        def progress(done: int, total: int, what: str) -> None:
            # called from the loading thread: hand the event to the loop's thread
            self.runtime.loop.call_soon_threadsafe(
                lambda: self.progress(what="loading model", done=done, total=total, detail=what))

        budget = cfg.budget_bytes(int(self.device_info().get("memory_total") or 0))
        try:
            self.runner = await asyncio.to_thread(
                ModelRunner.from_gguf, path, registry.cache_dir, num_blocks=cfg.kv_blocks,
                block_size=cfg.block_size, progress=progress, kv_dtype=cfg.kv_dtype,
                dense_copy=cfg.dense_copy, dense_copy_budget=budget, native=cfg.native, engine=cfg.engine,
                threads=cfg.threads, device=self.torch_device())
        except Exception as e:      # it exits with it; first it says why
            await self._failed(path, e)
            raise
        self.lock = asyncio.Lock()
        self.current = self.abort_id = self.yield_id = None   # the step running; those asked to stop
        self.steps = 0
        info = self.runner.info()
        self.log.info("model_loaded", path=str(path), device=self.torch_device(), weights=info.pop("weights"), **info)

    async def _failed(self, path: Path, e: Exception) -> None:
        """Say why the model did not load, before the process exits: a progress event {what:
        "failed", error}, which the kernel keeps with the service (``kernel.drivers`` lists it,
        and the inference service gives it to the requests that waited for this driver), then
        a round trip through the kernel, whose answer means the event has been read."""
        from drivers.model import ModelError
        if isinstance(e, ModelError):           # it names the file and what is wrong with it
            why = str(e)
        elif isinstance(e, MemoryError):
            why = f"{path}: out of memory loading it on {self.torch_device()}"
        else:
            why = f"{path}: {type(e).__name__}: {e}"
        self.log.error("model_load_failed", path=str(path), error=why)
        self.progress(what="failed", error=why)
        with contextlib.suppress(errors.LLMOSError, asyncio.TimeoutError):
            await asyncio.wait_for(self.runtime.call("kernel", "drivers", {}), LAST_WORD_S)

    def op_info(self, args: dict, caller: dict) -> dict:
        info = self.runner.info()
        info.update(device=self.torch_device(), threads=self.runner.threads,
                    rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    kv_bytes=self.runner.kv_bytes, steps=self.steps,
                    **self.device_info())
        return info

    async def op_step(self, args: dict, caller: dict) -> list[dict[str, Any]]:
        batch = args.get("batch")
        if not isinstance(batch, list):
            raise errors.EINVAL("step: 'batch' must be a list of sequence steps")
        from drivers.model.batch import StepAborted
        step_id = args.get("id")
        async with self.lock:
            self.current = step_id
            try:
                out = await asyncio.to_thread(self.runner.step, batch, self._should_stop,
                                              self._should_yield)
            except StepAborted as e:
                raise errors.ECANCELED(f"step {step_id}: {e}") from None
            except (ValueError, KeyError, TypeError) as e:
                raise errors.EINVAL(f"step: {e}") from None
            finally:
                self.current = None
            self.steps += 1
            return out

    # read from the step's thread: plain attribute reads are atomic
    def _should_stop(self) -> bool:
        return self.current is not None and self.current == self.abort_id

    def _should_yield(self) -> bool:
        return self.current is not None and self.current in (self.abort_id, self.yield_id)

    def op_abort(self, args: dict, caller: dict) -> None:
        """Step `id`, if still running: "abort" gives it up between two layers (a more urgent
        request arrived and would otherwise wait for the whole step); "yield" makes a step that
        decodes several tokens ahead hand back the ones it has (a request arrived)."""
        if args.get("mode", "abort") == "yield":
            self.yield_id = args.get("id")
        else:
            self.abort_id = args.get("id")

    def op_release(self, args: dict, caller: dict) -> None:
        self.runner.release([int(i) for i in args.get("seq_ids", [])])

    async def op_reset(self, args: dict, caller: dict) -> None:
        """Forget every sequence (a restarted inference service knows none of them), once the step
        its predecessor left running here is over."""
        async with self.lock:
            self.runner.reset()
            self.abort_id = self.yield_id = None      # its step ids start again at 1


def named(cls: type[Driver]) -> type[Driver]:
    """cls as the service the kernel named in LLMOS_SERVICE: the boot driver (cpu, cuda0) or an
    instance of it for another model (cpu@tiny), which says that name in its HELLO and logs."""
    return type(cls.__name__, (cls,), {"name": os.environ.get("LLMOS_SERVICE", cls.name)})
