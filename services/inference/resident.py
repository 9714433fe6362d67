"""One model the inference service serves: its driver service, its Engine, tokenizer and step loop.

The service holds one Resident per model file. The default model's driver is the boot driver
(``cpu``, ``cuda0``: kernel/devices.py); any other registered model's is a driver instance that
the kernel starts when a request first names the model (``kernel.driver_start``, kernel/
instances.py), supervised like every service. A Resident is "loading" until its driver has
answered ``info`` (the driver loads the weights before it is READY, and calls to it wait in the
kernel meanwhile), then "resident"; requests for it wait on ``ready`` rather than fail.

The step loop is the engine's algorithm: schedule, the driver's ``step`` (a service-to-service
call through the kernel), postprocess, and each event to the queue of the call that made it. A
driver that dies takes the KV cache with it: the step in flight fails, and the engine recomputes
every running request on the restarted driver; only a driver that keeps failing (a step that
fails, or a crash: a kill, from outside or the supervisor's, never counts) fails requests.

Never: share sequences, blocks or queues between models: each engine's ids are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from services.inference.policy import Policy
from syscalls import errors

DRIVER_RETRIES = 3          # consecutive failed steps before the batch's requests are failed
HELD_RECHECK_S = 0.5        # how often held work (a throttled process) is looked at again
INFO_WAIT_S = 2.0           # how often a wait for a loading driver says it is still waiting


class Resident:
    """A model file served by one driver service; ``load()`` makes it ready."""

    def __init__(self, service, name: str, path: Path | None, driver: str | None, version: str = ""):
        """path None: whatever file the (boot) driver runs, as its info says."""
        self.service = service              # the Inference service: its runtime, log and report
        self.runtime, self.log = service.runtime, service.log
        self.name, self.path, self.version = name, path, version
        self.driver = driver                # None until the kernel has started an instance
        self.boot = driver is not None      # the boot driver's model: never unloaded
        self.state = "loading"
        self.error: str | None = None       # why it failed
        self.info: dict = {}                # the driver's, once loaded
        self.memory = 0                     # bytes it holds (weights + KV): estimated, then measured
        self.keep_alive = -1.0 if self.boot else service.pager.keep_alive   # seconds; -1: for ever
        self.waiters = 0                    # requests waiting for it to be ready
        self.pins = 0                       # calls using it now (Inference._model): not idle while any
        self.engine = None                  # once loaded
        self.loaded_at: float | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future = loop.create_future()
        self.gone: asyncio.Future = loop.create_future()    # unloaded: its memory is back
        self.step_id, self.in_flight = 0, None     # the driver's step now running: (id, batch, ahead)
        self.queues: dict[int, asyncio.Queue] = {}
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task | None = None
        self.last_used = time.monotonic()

    # -- loading -------------------------------------------------------------------------------
    async def load(self, scheduler_cfg, progress=None) -> None:
        """Start the driver (unless it runs already), wait for its info, build the engine. Any
        failure fails ``ready`` with the error, so that the requests waiting on it get it."""
        from drivers.model import Tokenizer, read_metadata
        from services.inference.engine import Engine
        try:
            if self.driver is None:
                await self.service.pager.admit(self)
                started = await self.runtime.call("kernel", "driver_start", {
                    "model": self.name, "path": str(self.path), "version": self.version})
                self.driver = started["service"]
            try:
                info = await self._driver_info(progress)
            except errors.LLMOSError as e:          # its driver exited: with what reason?
                raise await self._driver_failure(e) from None
            if self.path is not None and os.path.realpath(info["model"]) != os.path.realpath(self.path):
                raise errors.EIO(f"the {self.driver} driver runs {info['model']}, not {self.path}")
            self.path = Path(info["model"])
            try:
                metadata = await asyncio.to_thread(read_metadata, info["model"])
                self.tokenizer = Tokenizer(metadata)
            except (OSError, KeyError, ValueError) as e:
                raise errors.EINVAL(f"{self.path}: no tokenizer llmos can build ({e})") from None
            c = scheduler_cfg
            self.engine = Engine(info, self.tokenizer, max_running=c.max_running,
                                 token_budget=c.token_budget, max_queue=c.max_queue,
                                 decode_steps=c.decode_steps, policy=Policy(c.band, c.aging_s, c.quantum))
            # a process's kv_blocks limit counts its blocks on every model
            self.engine.scheduler.elsewhere = self._held_elsewhere
            self.engine.scheduler.reclaim_elsewhere = self._reclaim_elsewhere
        except Exception as e:          # a bug of ours is loud, and still fails only this model
            if not isinstance(e, errors.LLMOSError):
                self.log.exception("model_load_bug", model=self.name)
                e = errors.EIO(f"{type(e).__name__}: {e}")
            self.state, self.error = "failed", e.message
            self.ready.set_exception(e)
            self.ready.exception()          # retrieved: nobody may be waiting yet
            self.log.warning("model_load_failed", model=self.name, path=str(self.path), error=e.message)
            if not self.boot:
                self.service.pager.changed()          # what it was counted for is free again
            return
        self.info = info
        self.memory = int(info.get("weight_bytes") or 0) + int(info.get("kv_bytes") or 0)
        self.state, self.loaded_at, self.last_used = "resident", time.time(), time.monotonic()
        self.loop_task = asyncio.get_running_loop().create_task(self._run())
        self.ready.set_result(None)
        self.log.info("model_resident", model=self.name, driver=self.driver, path=str(self.path))

    async def _driver_info(self, progress) -> dict:
        """The driver's info, once it has loaded its model. The kernel holds the call while the
        driver starts, and ends it with ETIMEDOUT after its call deadline: a load that takes
        longer than that is asked again. progress (the boot load's) hears of each wait."""
        waited = 0
        while True:
            call = asyncio.ensure_future(self.runtime.call(self.driver, "info", {}))
            try:
                while True:
                    done, _ = await asyncio.wait({call}, timeout=INFO_WAIT_S)
                    if done:
                        return call.result()
                    waited += INFO_WAIT_S
                    if progress is not None:
                        progress(what=f"waiting for the {self.driver} driver", seconds=waited)
            except errors.ETIMEDOUT:
                continue
            except errors.ESRVDOWN:         # it died under the call: ask its restarted self, unless
                if (await self._driver())["state"] in ("FAILED", "STOPPED"):   # it is given up on
                    raise
                continue
            finally:
                call.cancel()

    async def _driver(self) -> dict:
        """The kernel's entry for this model's driver service (kernel/instances.py, drivers)."""
        drivers = await self.runtime.call("kernel", "drivers", {})
        return next((d for d in drivers if d["service"] == self.driver), {"state": "STOPPED", "crashed": True})

    async def _driver_crashed(self) -> bool:
        """Whether the driver's last death was its own (a crash, an exit), or it is given up on."""
        d = await self._driver()
        return bool(d.get("crashed")) or d["state"] in ("FAILED", "STOPPED")

    async def _driver_failure(self, e: errors.LLMOSError) -> errors.LLMOSError:
        """Why the driver did not load the model, as it said before it exited (drivers/driver.py:
        the error of its last progress event, which the kernel keeps), rather than the kernel's
        "FAILED (exited with status 1)"; e when it said nothing."""
        with contextlib.suppress(errors.LLMOSError):
            for d in await self.runtime.call("kernel", "drivers", {}):
                said = d.get("progress") or {}
                if d["service"] == self.driver and said.get("what") == "failed" and said.get("error"):
                    return errors.EIO(f"its driver {self.driver} could not load it: {said['error']}")
        return e

    async def stop(self) -> None:
        if self.loop_task is not None:
            self.loop_task.cancel()

    # -- unloading -----------------------------------------------------------------------------
    def idle(self) -> bool:
        """Resident, with no request on it and none waiting for it."""
        return self.state == "resident" and not self.pins and not self.queues \
            and not self.engine.has_work()

    def holders(self) -> dict[int, int]:
        """The processes whose open contexts keep it resident: {pid: contexts}. A cache context
        (open_context with cache) keeps nothing."""
        held: dict[int, int] = {}
        for ctx in self.engine.contexts.values() if self.engine is not None else ():
            if not ctx.cache:
                held[ctx.pid] = held.get(ctx.pid, 0) + 1
        return held

    def unloadable(self) -> bool:
        """Idle, not the default model, and no open context keeps it; an older version goes even
        so: its contexts move to the current one at their next turn and keep nothing here."""
        return not self.boot and self.idle() and (not self.holders() or self.service.superseded(self))

    def expires_at(self) -> float | None:
        """When (monotonic) keep_alive unloads it: None while in use or kept by a context, for
        ever, or the default model."""
        if self.boot or self.keep_alive < 0 or not self.idle() or self.holders():
            return None
        return self.last_used + self.keep_alive

    def describe_use(self) -> str:
        """What keeps it: "2 requests", "0 requests; contexts open in pid 12: 1, pid 14: 3"."""
        if self.state != "resident":
            return self.state
        held = self.holders()
        kept = "; contexts open in " + ", ".join(f"pid {pid}: {n}" for pid, n in sorted(held.items()))
        return f"{self.pins} requests" + (kept if held else "")

    async def unload(self, why: str) -> None:
        """Stop the step loop, leave the contexts without K/V (their next turn loads the model
        again), have the kernel stop the driver, and be gone. The Pager set "unloading"."""
        self.log.info("model_unloading", model=self.name, driver=self.driver, why=why)
        if self.loop_task is not None:
            self.loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.loop_task
        try:
            await self.runtime.call("kernel", "driver_stop", {"service": self.driver})
        except errors.LLMOSError as e:          # gone already (its instance was removed): fine
            self.log.warning("driver_stop_failed", driver=self.driver, error=e.message)
        self.state = "absent"
        self.service.forget(self)
        self.gone.set_result(None)
        self.log.info("model_unloaded", model=self.name, driver=self.driver, why=why)
        self.service.pager.changed()
        self.service.report(force=True)

    # -- KV blocks on the other models ---------------------------------------------------------
    def _others(self) -> list["Resident"]:
        return [m for m in self.service.models.values() if m is not self and m.state == "resident"]

    def _held_elsewhere(self, pid: int) -> dict[str, tuple[int, int]]:
        """The KV blocks pid holds on the other models: {name: (blocks, of which its requests')}."""
        held: dict[str, tuple[int, int]] = {}
        for m in self._others():
            scheduler = m.engine.scheduler
            if blocks := scheduler.held_blocks(pid):
                before = held.get(m.name, (0, 0))
                held[m.name] = (before[0] + blocks, before[1] + scheduler.request_blocks(pid))
        return held

    def _reclaim_elsewhere(self, pid: int) -> bool:
        """Take back pid's least recently used idle context on another model (its next turn
        there recomputes); False when it has none."""
        idle = [(ctx, m) for m in self._others() for ctx in m.engine.scheduler.idle_contexts(pid)]
        if not idle:
            return False
        ctx, model = min(idle, key=lambda pair: pair[0].last_used)
        model.engine.scheduler.evict(ctx)
        self.log.info("context_evicted", pid=pid, model=model.name, for_model=self.name)
        return True

    # -- the step loop -------------------------------------------------------------------------
    async def _run(self) -> None:
        engine, failures = self.engine, 0
        while True:
            # Held work (a throttled process) becomes runnable with time alone: look again soon.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), HELD_RECHECK_S if engine.has_work() else None)
            self.wake.clear()
            if not engine.has_work() and not self.boot:
                # woken with nothing to run: a context closed (Inference._close), a request was
                # cancelled: what kept the model may be gone, so the Pager looks again
                self.service.pager.changed()
            while engine.has_work():
                step = engine.schedule()
                self.deliver(step.events)
                if step.release:
                    self.service.spawn(self.runtime.call(self.driver, "release", {"seq_ids": step.release}))
                if not step.seqs:
                    break           # nothing may run now; a request, a cancel, a CONT or time wakes us
                turns = self.service.turns          # one step at a time on the device, by priority
                await turns.take(self, self.urgency(step.batch))
                self.step_id += 1
                self.in_flight = (self.step_id, step.batch, any(m.get("steps", 1) > 1 for m in step.seqs))
                try:
                    sampled = await self.runtime.call(self.driver, "step",
                                                      {"batch": step.seqs, "id": self.step_id})
                except errors.ECANCELED:
                    turns.give(self)
                    continue                # aborted for an urgent request: nothing of it counts
                except errors.LLMOSError as e:
                    turns.give(self)
                    if isinstance(e, errors.ESRVDOWN) and not await self._driver_crashed():
                        # killed (from outside, or hung): its restart recomputes; nothing counts
                        self.log.warning("driver_step_lost", driver=self.driver, error=str(e))
                        engine.device_lost()
                        continue
                    failures += 1
                    self.log.warning("driver_step_failed", driver=self.driver, error=str(e),
                                     failures=failures)
                    if failures > DRIVER_RETRIES:
                        self.deliver(engine.fail(step, f"the {self.driver} driver failed: {e.message}"))
                        failures = 0
                    else:
                        engine.device_lost()     # most likely it restarted: recompute on the new one
                    continue
                except BaseException:
                    turns.give(self)             # cancelled (unloading): the device goes on
                    raise
                finally:
                    self.in_flight = None
                failures = 0
                try:
                    self.deliver(engine.postprocess(step, sampled))
                finally:        # kept for our next step if we are far more urgent than the waiters
                    turns.give(self, self.urgency(step.batch) if engine.has_work() else None)
                self.service.report()
            self.service.report(force=True)

    def deliver(self, events: list[dict]) -> None:
        for ev in events:
            q = self.queues.get(ev["seq_id"])
            if q is not None:
                q.put_nowait(ev)

    def abort_for(self, pid: int) -> None:
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
            self.log.info("step_aborted", step=step_id, for_pid=pid, driver=self.driver)
            self.service.spawn(self.runtime.call(self.driver, "abort", {"id": step_id, "mode": "abort"}))
        elif ahead:             # decoding ahead: hand back after the token in progress
            self.yield_now()

    def urgency(self, batch) -> int:
        """The effective priority of a batch's most urgent request (lower is more urgent)."""
        policy, now = self.engine.policy, time.monotonic()
        return min((policy.effective(s.pid, s.last_served, now) for s, _ in batch.steps), default=0)

    def give_up_step(self) -> None:
        """A much more urgent step of another model waits for the device: the step running now
        is given up between two layers and runs again after it."""
        if self.in_flight is not None:
            self.log.info("step_aborted", step=self.in_flight[0], for_model="another", driver=self.driver)
            self.service.spawn(self.runtime.call(self.driver, "abort",
                                                 {"id": self.in_flight[0], "mode": "abort"}))

    def yield_now(self) -> None:
        """A step decoding ahead hands back after the token in progress, so the next is decided anew."""
        if self.in_flight is not None and self.in_flight[2]:
            self.service.spawn(self.runtime.call(self.driver, "abort",
                                                 {"id": self.in_flight[0], "mode": "yield"}))
