"""The inference service process: an Engine per model, fed by generate and chat, each stepping its driver.

Each model the service serves is a Resident (services/inference/resident.py): its driver service,
its Engine and tokenizer, and a loop that schedules, sends the step to the driver (through the
kernel: ``Runtime.call(driver, "step", ...)``), postprocesses, and hands each request's events to
the call that made it, which streams them to its program. A call that is cancelled (the program
gave up, or died) cancels its request, whose blocks are freed at the next step.

The default model runs on the boot driver (``cpu`` or ``cuda0``, as the kernel placed it), loaded
before the service is READY. A request naming another registered model (``model``: its name, or
its file's path) has the kernel start a driver instance for it and waits, queued here, while it
loads; an unknown name is ENOENT naming the models there are. Which models stay loaded is the
Pager's (services/inference/pager.py: the memory budget, keep_alive). Context handles are the
service's, one numbering across models; a context outlives its model's unloading and an update of
its file, and its next turn runs on the model's current version, recomputed.

A context also outlives this service: each one's messages are left with the kernel as they change
(``EVENT keep``, kernel/keep.py), and a restarted service opens them again under their handles
(``_restore``), their K/V recomputed at their next turn. A generation or chat the kernel resubmits
after a death carries ``resume``: the tokens its program has had, taken as output already made
(``Engine.add``), so the stream goes on where it broke. open, close and load of contexts are safe
for the kernel to retry: one whose effect outlived the death is answered from the kept records.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections import deque
from pathlib import Path
from typing import Callable

from services.inference.contexts import Context
from services.inference.pager import Pager, file_version
from services.inference.resident import Resident
from services.inference.turns import Turns
from syscalls import errors, wire
from syscalls.runtime.config import Config
from syscalls.runtime.devices import model_driver
from syscalls.runtime.models import Registry
from syscalls.runtime.service import Reply, Service

REPORT_S = 0.2             # the kernel hears of changes in model work at most this often while busy
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "logprobs")
HANDLES_PER_START = 1 << 32   # context handles of one start: a restart's start past the last's
CLOSES_KEPT = 8            # a process's last closes remembered across a restart (a retried close)
RANK = {"running": 0, "ready": 1, "suspended": 2, "throttled": 2, "stopped": 3, None: 4}  # by_process


class Inference(Service):
    name = "inference"
    internal = ("sched_update", "process_exit", "model_users", "model_evict", "model_states",
                "models_changed")

    async def start(self) -> None:
        self.registry = Registry(self.paths)
        cfg = Config.load(self.paths.home / "config.toml")
        self.scheduler_cfg = cfg.scheduler
        self.models: dict[tuple[str, str], Resident] = {}   # by (real path, file_version) of its file
        self.contexts: dict[int, tuple[Resident, object]] = {}     # handle -> (model, Context)
        self._handles = itertools.count(1 + HANDLES_PER_START * int(os.environ.get(
            "LLMOS_SERVICE_RESTARTS", "0")))
        self.reported: dict = {}
        self.reported_at = 0.0
        self.background: set[asyncio.Task] = set()
        self.turns = Turns(cfg.scheduler.band)      # whose step runs next on the device
        self.pending: dict[int, dict] = {}          # requests waiting for their model: id -> {pid, ...}
        self._pending_ids = itertools.count(1)
        self.made_by: dict[int, str] = {}           # context handle -> the txid of the call that opened it
        self.opened_by: dict[str, int] = {}         # the reverse, for contexts a previous run opened
        self.closed: dict[int, deque] = {}          # pid -> its last (handle, txid) closes
        # At boot the service is READY once its default model is (a model that cannot load fails
        # the boot, loudly). Restarted, it is READY at once and the calls wait in it while its
        # driver answers (the driver may be restarting too): its own restart is not its driver's.
        if os.environ.get("LLMOS_SERVICE_RESTARTS", "0") == "0":
            await self._boot(cfg)
        else:
            self.gate = asyncio.ensure_future(self._boot(cfg))

    async def _boot(self, cfg: Config) -> None:
        # Driver instances a previous run of this service started hold K/V of engines that are
        # gone: stop them, so that what is resident is what the Pager counts.
        for d in await self.runtime.call("kernel", "drivers", {}):
            if d.get("path") and d["state"] != "STOPPING":
                await self.runtime.call("kernel", "driver_stop", {"service": d["service"]})
        # the default model: the boot driver's, whatever file it was told to load
        boot = Resident(self, "", None, model_driver())
        await boot.load(self.scheduler_cfg, self.progress)
        await boot.ready                    # a failure here fails the start: the supervisor retries
        try:
            await self.runtime.call(boot.driver, "reset", {})   # what it holds is a dead engine's
        except errors.ESRVDOWN:
            pass                            # it died meanwhile: its next self holds nothing
        boot.name = self._name_of(boot.path)
        real = os.path.realpath(boot.path)
        boot.version = file_version(real)
        self.default = self.models[(real, boot.version)] = boot
        self.pager = Pager(self, cfg.models, cfg.driver, int(boot.info.get("memory_total") or 0))
        self.pager.check_boot()
        await self._restore()
        self.spawn(self.pager.run())

    async def _restore(self) -> None:
        """Open again the contexts a previous run of this service left with the kernel, under
        their handles: on the default model, or waiting for theirs to load at their next turn."""
        away: dict[str, Resident] = {}
        for record in await self.runtime.call("kernel", "kept", {}):
            pid, value = record["pid"], record["value"]
            if record["key"].startswith("closed:"):
                self.closed[pid] = deque((tuple(c) for c in value), maxlen=CLOSES_KEPT)
                continue
            ctx = Context(0, pid, value["model"], value["messages"])
            ctx.cache = bool(value.get("cache"))       # a gateway's held conversation stays one
            if value["path"] == os.path.realpath(self.default.path):
                model = self.default
                model.engine.adopt_context(ctx)
            else:
                model = away.get(value["path"])
                if model is None:
                    model = away[value["path"]] = Resident(self, value["model"], Path(value["path"]), None)
                    model.state = "absent"              # loaded by the context's next turn
            handle = value["handle"]
            self.contexts[handle] = (model, ctx)
            if value.get("txid"):
                self.made_by[handle] = value["txid"]
                self.opened_by[value["txid"]] = handle
        if self.contexts:
            self.log.info("contexts_restored", contexts=len(self.contexts))
            self.report(force=True)

    def _keep(self, handle: int) -> None:
        """Leave a context's state with the kernel, to be opened again by a restarted service."""
        model, ctx = self.contexts[handle]
        self._record(f"ctx:{handle}", ctx.pid, {
            "handle": handle, "model": model.name, "path": os.path.realpath(model.path),
            "messages": ctx.messages, "cache": ctx.cache, "txid": self.made_by.get(handle)})

    def _record(self, key: str, pid: int, value) -> None:
        """One record of the kernel's store for this service (kernel/keep.py); None deletes it."""
        self.runtime.send(wire.event("keep", {"key": key, "pid": pid, "value": value}))

    @staticmethod
    def _leave(model: Resident, ctx) -> None:
        """A context leaves a model: that model's engine (if it ever had one) keeps nothing of it."""
        if model.engine is not None:
            model.engine.blocks.free(ctx.owner)
            model.engine.contexts.pop(ctx.ctx, None)

    async def stop(self) -> None:
        for model in self.models.values():
            await model.stop()

    def spawn(self, coro) -> None:
        """Run coro in the background (a driver's release or abort, the Pager): an LLMOSError it
        ends with (the driver died meanwhile) is of no use to anyone and goes to the log only."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._spawned)

    def _spawned(self, task: asyncio.Task) -> None:
        self.background.discard(task)
        if task.cancelled():
            return
        e = task.exception()
        if isinstance(e, errors.LLMOSError):
            self.log.info("background_call_failed", error=e.message)
        elif e is not None:
            self.log.error("background_task_failed", error=repr(e), exc_info=e)

    def forget(self, model: Resident) -> None:
        """An unloaded model leaves the table (a newer Resident may hold its key already)."""
        key = (os.path.realpath(model.path), model.version)
        if self.models.get(key) is model:
            del self.models[key]

    def superseded(self, model: Resident) -> bool:
        """Whether model is an older version: its name stands for another file now, or its file changed."""
        try:
            current = os.path.realpath(self.registry.resolve(model.name))
            return (current, file_version(current)) != (os.path.realpath(model.path), model.version)
        except (errors.LLMOSError, OSError, ValueError):
            return False        # removed, its file gone (or the registry unreadable): keep_alive decides

    def _name_of(self, path: Path) -> str:
        """The registered name of a model's file (its path when none is registered for it)."""
        real = os.path.realpath(path)
        return next((m["name"] for m in self.registry.list() if os.path.realpath(m["path"]) == real),
                    str(path))

    # -- which model ---------------------------------------------------------------------------
    async def _model(self, model: str | None, call: str, keep_alive: float | None = None,
                     pid: int = 0) -> Resident:
        """The model a request names, loaded (started on demand; the request waits meanwhile).
        keep_alive (seconds; -1: for ever) becomes the model's, as Ollama does."""
        if model is None:
            self.default.last_used = time.monotonic()
            return self.default
        real, name = self._resolve(model, call)
        while True:
            try:
                key = (real, file_version(real))
            except OSError as e:        # deleted while resident: serve on what is loaded, if anything
                resident = next((m for (p, _), m in self.models.items()
                                 if p == real and m.state == "resident"), None)
                if resident is None:
                    raise errors.EIO(f"{call}: model {name!r} could not be loaded: its file {real} is "
                                     f"gone ({e.strerror}); put it back, or model_remove it") from None
                break
            resident = self.models.get(key)
            if resident is not None and resident.state == "unloading":
                await asyncio.shield(resident.gone)     # then load it again
                continue
            if resident is None or resident.state in ("failed", "absent"):
                resident = self.models[key] = Resident(self, name, Path(real), None, key[1])
                self.spawn(resident.load(self.scheduler_cfg))
            break
        self._use(resident, keep_alive)
        if resident.ready.done() and resident.ready.exception() is None:
            return resident
        resident.waiters += 1
        ticket = next(self._pending_ids)
        self.pending[ticket] = {"pid": pid, "model": resident, "since": time.monotonic()}
        try:
            await asyncio.shield(resident.ready)
        except errors.EAGAIN as e:              # no room in the memory budget in time
            raise errors.EAGAIN(f"{call}: model {name!r} could not be loaded: {e.message}") from None
        except errors.LLMOSError as e:          # the reason (a missing or unreadable file) in words
            raise errors.EIO(f"{call}: model {name!r} could not be loaded: {e.message}") from None
        finally:
            resident.waiters -= 1
            del self.pending[ticket]
        return resident

    def _use(self, model: Resident, keep_alive: float | None) -> None:
        """The calling request uses model: its last use is now, keep_alive (if given) becomes the
        model's, and it is pinned (not idle) until the call ends, its stream included."""
        model.last_used = time.monotonic()
        if not model.boot:
            model.keep_alive = self.pager.keep_alive if keep_alive is None else keep_alive
        model.pins += 1
        asyncio.current_task().add_done_callback(lambda _: self._unpin(model))

    def _resolve(self, model: str, call: str) -> tuple[str, str]:
        """(real path, name) of a registered model named by its name or its file's path."""
        if os.path.isabs(model):
            real = os.path.realpath(model)
            if not any(os.path.realpath(m["path"]) == real for m in self.registry.list()):
                raise errors.ENOENT(f"{call}: {model} is no registered model's file "
                                    f"(models: {', '.join(m['name'] for m in self.registry.list())})")
            return real, self._name_of(Path(model))
        try:
            return os.path.realpath(self.registry.resolve(model)), model
        except errors.ENOENT as e:
            raise errors.ENOENT(f"{call}: {e.message}") from None

    async def op_model_load(self, args: dict, caller: dict) -> dict:
        """Load a model ahead of its requests (keep_alive from now on), or, with keep_alive 0,
        have it unloaded as soon as it is idle (Ollama's load and unload)."""
        if args.get("keep_alive") == 0:
            real, name = self._resolve(args["model"], "model_load")
            for model in self._versions(real):
                if not model.boot:
                    model.keep_alive = 0.0
            self.pager.changed()
            here = next((m for m in self._versions(real) if m.state != "absent"), None)
            return {"model": name, "state": here.state if here else "absent",
                    "driver": here.driver if here else None}
        model = await self._model(args["model"], "model_load", args.get("keep_alive"),
                                  int(caller.get("pid") or 0))
        return {"model": model.name, "state": model.state, "driver": model.driver}

    def _unpin(self, model: Resident) -> None:
        model.pins -= 1
        model.last_used = time.monotonic()          # keep_alive counts from the last use's end
        if not model.boot:
            self.pager.changed()

    async def _current(self, handle: int, caller: dict, call: str, keep_alive: float | None):
        """_context, but on its model's current version: a context its model left (unloaded, or
        updated to a new file) moves to the model as it is now, where its next turn recomputes
        its history (cached_tokens 0). A context with a turn in flight stays where it is."""
        model, ctx = self._context(handle, caller, call)
        if ctx.busy is not None or (model.state == "resident" and not self.superseded(model)):
            if model.state == "resident":
                self._use(model, keep_alive)    # as a request naming the model: pinned, keep_alive
            return model, ctx
        new = await self._model(model.name, call, keep_alive, int(caller.get("pid") or 0))
        if new is not model and self.contexts.get(handle, (None, None))[1] is ctx:
            self._leave(model, ctx)                   # the old version keeps nothing of it
            new.engine.adopt_context(ctx)
            self.contexts[handle] = (new, ctx)
            self._keep(handle)
            self.log.info("context_moved", ctx=handle, model=new.name, driver=new.driver)
        return new, ctx

    def report(self, force: bool = False) -> None:
        """Tell the kernel each process's model work (state, KV blocks, requests) over every model,
        when it changes: at most every REPORT_S while steps run, at once when a loop goes quiet."""
        now = time.monotonic()
        if not force and now - self.reported_at < REPORT_S:
            return
        self.reported_at = now              # looked at now, sent or not: not again for REPORT_S
        current: dict[int, dict] = {}
        for model in self._resident():
            for pid, work in model.engine.by_process().items():
                have = current.get(pid)
                if have is None:
                    current[pid] = dict(work)
                    continue
                for k in ("kv_blocks", "sequences", "contexts"):
                    have[k] += work[k]
                if RANK[work["state"]] < RANK[have["state"]]:
                    have["state"] = work["state"]
        if current != self.reported:
            self.reported = current
            self.runtime.send(wire.event("sched", {"procs": [{"pid": pid, **work}
                                                             for pid, work in current.items()]}))

    def _resident(self) -> list[Resident]:
        return [m for m in self.models.values() if m.state == "resident"]

    # -- the ops -------------------------------------------------------------------------------
    async def op_generate(self, args: dict, caller: dict, emit: Callable[..., None]) -> Reply:
        model = await self._model(args.get("model"), "generate", args.get("keep_alive"),
                                  int(caller.get("pid") or 0))
        constraint = await self._constraint(model, args, None, "generate")
        return await self._stream(model, args["prompt"], args, emit, "generate", caller, constraint=constraint)

    async def op_chat(self, args: dict, caller: dict, emit: Callable[..., None]) -> Reply:
        pid = int(caller.get("pid") or 0)
        if args.get("ctx") is None:
            model, ctx = await self._model(args.get("model"), "chat", args.get("keep_alive"), pid), None
        else:
            model, ctx = await self._current(args["ctx"], caller, "chat", args.get("keep_alive"))
            if args.get("model") is not None and \
                    await self._model(args["model"], "chat", args.get("keep_alive"), pid) is not model:
                raise errors.EINVAL(f"chat: context {args['ctx']} is on model {model.name!r}, "
                                    f"not {args['model']!r}")
        from services.inference.tools import ToolError, Tools
        try:
            tools = Tools.parse(args.get("tools"), args.get("tool_choice"))
        except ToolError as e:
            raise errors.EINVAL(f"chat: {e}") from None
        messages = (ctx.messages if ctx else []) + args["messages"]
        prompt = self._render(model, messages, "chat", "messages", tools)
        constraint = await self._constraint(model, args, tools, "chat")
        reply = await self._stream(model, prompt, args, emit, "chat", caller, ctx, messages,
                                   constraint=constraint, tools=tools)
        if ctx is not None and self.contexts.get(args["ctx"], (None, None))[1] is ctx:
            self._keep(args["ctx"])         # before the END: a kernel that has the END has this
        return reply

    @staticmethod
    def _render(model: Resident, messages: list, call: str, arg: str, tools=None) -> str:
        """The prompt: the model's chat template, with the tools (services/inference/tools.py)."""
        from drivers.model import ChatTemplateError
        from services.inference.tools import ToolError, render
        try:
            return render(model.tokenizer, messages, tools)
        except ToolError as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        except (ChatTemplateError, TypeError, KeyError, ValueError) as e:
            raise errors.EINVAL(f"{call}: argument '{arg}': {e}") from None

    # -- constraints ---------------------------------------------------------------------------
    async def _constraint(self, model: Resident, args: dict, tools, call: str) -> str | None:
        """The grammar a request's output keeps to (response_format, regex, grammar, or a required
        tool call), checked against the model's vocabulary: EINVAL naming what is wrong with it."""
        from drivers.model.constraints import ConstraintError, grammar_for
        from services.inference.tools import ToolError
        try:
            grammar = grammar_for(args.get("response_format"), args.get("regex"), args.get("grammar"))
            call_grammar = tools.grammar() if tools is not None else None
        except (ConstraintError, ToolError) as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        if grammar is not None and call_grammar is not None:
            raise errors.EINVAL(f"{call}: tool_choice {tools.choice!r} makes the reply a tool call; give "
                                f"no response_format, regex or grammar with it")
        if grammar is None and call_grammar is None:
            return None
        where = "tools" if call_grammar else next(k for k in ("response_format", "regex", "grammar")
                                                  if args.get(k) is not None)
        try:
            await asyncio.to_thread(self._check_constraint, model, grammar or call_grammar, where)
        except ConstraintError as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        return grammar or call_grammar

    @staticmethod
    def _check_constraint(model: Resident, grammar: str, where: str) -> None:
        from drivers.model import constraints
        constraints.check(constraints.vocabulary(model.tokenizer), grammar, where)

    # -- contexts ------------------------------------------------------------------------------
    def _context(self, handle: int, caller: dict, call: str):
        """(model, Context) of an open context of the caller's; EBADF for any other handle."""
        found = self.contexts.get(handle)
        if found is None or found[1].pid != caller.get("pid"):
            raise errors.EBADF(f"{call}: context {handle} is not open in pid {caller.get('pid')}")
        return found

    async def op_open_context(self, args: dict, caller: dict) -> int:
        model = await self._model(args.get("model"), "open_context", pid=int(caller.get("pid") or 0))
        messages = [{"role": "system", "content": args["system"]}] if args.get("system") else []
        handle = self._open(model, messages, caller, "open_context", "system")
        self.contexts[handle][1].cache = bool(args.get("cache"))    # a cache does not pin its model
        self._keep(handle)
        return handle

    def _open(self, model: Resident, messages: list[dict], caller: dict, call: str, arg: str) -> int:
        from services.inference.engine import QuotaExceeded
        again = self.opened_by.get(caller.get("txid") or "")
        if again in self.contexts:          # the kernel retries a call whose open outlived a death
            return again
        self._render(model, messages, call, arg)
        try:
            ctx = model.engine.open_context(int(caller["pid"]), model.name, messages)
        except QuotaExceeded as e:
            raise errors.EDQUOT(f"{call}: {e}") from None
        handle = next(self._handles)
        self.contexts[handle] = (model, ctx)
        if caller.get("txid"):
            self.made_by[handle] = caller["txid"]
        self._keep(handle)
        self.report(force=True)
        return handle

    def _close(self, handle: int) -> None:
        model, ctx = self.contexts.pop(handle)
        if model.engine is not None:
            model.engine.close_context(ctx)
        model.wake.set()
        txid = self.made_by.pop(handle, None)
        if txid is not None and self.opened_by.get(txid) == handle:
            del self.opened_by[txid]
        self._record(f"ctx:{handle}", ctx.pid, None)

    def op_close_context(self, args: dict, caller: dict) -> None:
        pid, handle, txid = caller.get("pid"), args["ctx"], caller.get("txid") or ""
        if handle not in self.contexts and (handle, txid) in self.closed.get(pid, ()):
            return None                     # closed already, by this very call before a death
        self._context(handle, caller, "close_context")
        self._close(handle)
        done = self.closed.setdefault(pid, deque(maxlen=CLOSES_KEPT))
        done.append((handle, txid))
        self._record(f"closed:{pid}", pid, list(done))
        self.report(force=True)

    async def op_save_context(self, args: dict, caller: dict) -> dict:
        _, ctx = self._context(args["ctx"], caller, "save_context")
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
        return self._open(self.default, messages, caller, "load_context", "key")

    def op_contexts(self, args: dict, caller: dict) -> list[dict]:
        pid = caller.get("pid") if args.get("pid") is None else args["pid"]
        if pid != caller.get("pid") and not caller.get("privileged"):
            raise errors.EPERM(f"contexts: those of pid {pid} are its own; listing them needs privilege")
        now = time.monotonic()
        return [{"ctx": handle, "pid": c.pid, "model": c.model, "messages": len(c.messages),
                 "tokens": len(c.tokens), "kv_blocks": len(model.engine.blocks.table(c.owner))
                 if model.engine is not None else 0,
                 "last_used": round(now - c.last_used, 3)}
                for handle, (model, c) in self.contexts.items() if c.pid == pid]

    def op_process_exit(self, args: dict, caller: dict) -> None:
        """From the kernel: a process has ended; its contexts close with it."""
        pid = args.get("pid")
        for handle in [h for h, (_, c) in self.contexts.items() if c.pid == pid]:
            self._close(handle)
        self.closed.pop(pid, None)
        self.report(force=True)

    def op_model_users(self, args: dict, caller: dict) -> list[dict]:
        """From the tokenizer service (model_remove): who has requests or contexts on a model
        (any version of its file; a context whose model was unloaded counts too)."""
        real = os.path.realpath(str(args.get("path")))
        users: dict[int, dict] = {}
        for model in self._versions(real):
            if model.state == "resident":
                for pid, w in model.engine.by_process().items():
                    users.setdefault(pid, {"pid": pid, "requests": 0, "contexts": 0})["requests"] += w["sequences"]
        for model, ctx in self.contexts.values():
            if os.path.realpath(model.path) == real:
                users.setdefault(ctx.pid, {"pid": ctx.pid, "requests": 0, "contexts": 0})["contexts"] += 1
        return [u for _, u in sorted(users.items()) if u["requests"] or u["contexts"]]

    def _versions(self, real: str) -> list[Resident]:
        return [m for (p, _), m in self.models.items() if p == real]

    def op_model_evict(self, args: dict, caller: dict) -> None:
        """From the tokenizer service (model_remove with force): the model's requests end with
        ENOENT naming the removal, its contexts close and their blocks are freed, and its driver
        is stopped; the next request naming it finds no such model."""
        real = os.path.realpath(str(args.get("path")))
        why = f"model {args.get('name')!r} was removed (model_remove with force)"
        for handle in [h for h, (m, _) in self.contexts.items() if os.path.realpath(m.path) == real]:
            self._close(handle)
        for model in self._versions(real):
            if model is self.default:
                continue
            if model.state == "resident":
                for seq_id, queue in list(model.queues.items()):
                    model.engine.cancel(seq_id)
                    queue.put_nowait({"seq_id": seq_id, "text": "", "tokens": [], "finish": "error",
                                      "error": why, "error_code": "ENOENT"})
                self.pager.unload(model, why)
            model.wake.set()
        self.log.info("model_evicted", model=args.get("name"), path=real)
        self.report(force=True)

    def op_models_changed(self, args: dict, caller: dict) -> None:
        """From the tokenizer service: a model was added, updated or removed: the default model
        may have a name now, and an older version unloads once idle."""
        self.default.name = self._name_of(self.default.path)
        self.pager.changed()

    def op_model_states(self, args: dict, caller: dict) -> dict:
        """From the tokenizer service (models): every model this service holds or is loading, by
        file, with its state, memory, last use and when keep_alive unloads it (wall-clock times)."""
        now, wall = time.monotonic(), time.time()
        rows = []
        for (real, version), m in self.models.items():
            expires = m.expires_at()
            rows.append({
                "name": m.name, "path": real, "version": version, "state": m.state,
                "driver": m.driver, "error": m.error, "memory_bytes": m.memory,
                "default": m is self.default, "requests": len(m.queues) + m.waiters, "waiting": m.waiters,
                "position": self.pager.position(m), "keep_alive": m.keep_alive,
                "last_used": round(wall - (now - m.last_used), 3),
                "expires_at": None if expires is None else round(wall + expires - now, 3),
                "loaded_at": m.loaded_at, "superseded": m.state == "resident" and self.superseded(m)})
        return {"budget": self.pager.budget, "held": self.pager.held(), "models": rows}

    def op_runqueue(self, args: dict, caller: dict) -> dict:
        """Every model's requests; the counts and blocks are the sums over the models."""
        pid, out = args.get("pid"), {"max_queue": 0, "max_running": 0, "blocks_total": 0,
                                     "blocks_used": 0, "blocks_cached": 0, "requests": []}
        states = ("running", "ready", "suspended", "stopped", "throttled")
        out.update(dict.fromkeys(states, 0))
        for model in self._resident():
            engine = model.engine
            usage, requests = engine.usage(), engine.scheduler.describe()
            for state in states:
                out[state] += sum(1 for r in requests if r["state"] == state)
            out["max_running"] += engine.scheduler.max_running
            out["max_queue"] += engine.max_queue
            out["blocks_total"] += usage["blocks_total"]
            out["blocks_used"] += usage["blocks_used"]
            out["blocks_cached"] += engine.blocks.distinct(c.owner for c in engine.scheduler.idle_contexts())
            out["requests"] += [dict(r, model=model.name) for r in requests if pid is None or r["pid"] == pid]
        now = time.monotonic()
        for p in self.pending.values():          # waiting for their model to load
            m = p["model"]
            if pid is None or p["pid"] == pid:
                out["requests"].append({
                    "pid": p["pid"], "request": None, "state": "queued" if m.state == "queued" else "loading",
                    "priority": 0, "position": self.pager.position(m), "kv_blocks": 0,
                    "prompt_tokens": 0, "generated": 0, "waited_s": round(now - p["since"], 3),
                    "model": m.name})
        held = self.op_model_states({}, caller)
        out["memory_budget"], out["memory_held"] = held["budget"], held["held"]
        out["models"] = [{k: m[k] for k in ("name", "state", "driver", "memory_bytes", "requests",
                                             "position", "last_used", "expires_at", "keep_alive")}
                         for m in held["models"]]
        return out

    def op_sched_update(self, args: dict, caller: dict) -> None:
        """From the kernel: a process's priority, limits or stopped state changed."""
        pid = int(args["pid"])
        for model in self._resident():
            if pid in model.engine.policy.procs:
                model.engine.policy.update(pid, priority=args.get("priority"), stopped=args.get("stopped"),
                                           limits=args.get("limits"))
                model.wake.set()
                model.yield_now()     # decoding ahead: decide again now

    @staticmethod
    def _spelled(model: Resident, logprobs: list[dict]) -> list[dict]:
        """Each token's bytes beside its id, so that a program (the HTTP gateway) can show a
        token's logprob without a detokenize call per token, and a token that is part of a UTF-8
        character is still told apart from its neighbours."""
        spell = model.tokenizer.token_bytes
        return [{"token": lp["token"], "logprob": lp["logprob"], "bytes": spell(lp["token"]),
                 "top": [[t, p, spell(t)] for t, p in lp["top"]]} for lp in logprobs]

    async def _stream(self, model: Resident, prompt: str, args: dict, emit: Callable[..., None],
                      call: str, caller: dict, ctx=None, conversation: list | None = None,
                      constraint: str | None = None, tools=None) -> Reply:
        from services.inference.engine import ContextBusy, QueueFull, QuotaExceeded, RequestError
        engine = model.engine
        sampling = {k: args[k] for k in SAMPLING if args.get(k) is not None}
        pid = int(caller.get("pid") or 0)
        resume = (args.get("resume") or {}).get("tokens") or []   # the kernel's, after a death
        engine.policy.update(pid, priority=caller.get("priority", 0),
                             stopped=caller.get("stopped", False), limits=caller.get("limits") or {})
        try:
            seq_id = engine.add(prompt, sampling, max_tokens=args["max_tokens"],
                                stop=args.get("stop") or (), stop_ids=args.get("stop_ids") or (),
                                ignore_eos=bool(args.get("ignore_eos")), pid=pid, ctx=ctx,
                                constraint=constraint, resume=resume)
        except (QueueFull, ContextBusy) as e:
            raise errors.EAGAIN(f"{call}: {e}") from None
        except QuotaExceeded as e:
            raise errors.EDQUOT(f"{call}: {e}") from None
        except RequestError as e:
            raise errors.EINVAL(f"{call}: {e}") from None
        finally:
            engine.scheduler.forget_if_idle(pid)     # refused: keep no state for it
        queue: asyncio.Queue = asyncio.Queue()
        model.queues[seq_id] = queue
        model.wake.set()
        model.abort_for(pid)
        # what the program has had already: part of the reply, never sent again or counted twice
        reply, streamed = [engine.replayed(seq_id)], len(resume)
        if resume:
            self.log.info("resumed", call=call, pid=pid, seq_id=seq_id, tokens=len(resume))
        try:
            while True:
                ev = await queue.get()
                reply.append(ev["text"])
                piece = {"text": ev["text"], "tokens": ev["tokens"]}
                if "logprobs" in ev:
                    piece["logprobs"] = self._spelled(model, ev["logprobs"])
                if ev["text"] or ev["tokens"]:
                    # counted as they come, so ps and top see a long generation grow
                    emit(piece, {"tokens_out": len(ev["tokens"])} if ev["tokens"] else None)
                    streamed += len(ev["tokens"])
                if "finish" in ev:
                    if ev["finish"] == "error":
                        raise errors.from_wire(ev.get("error_code", "EIO"), f"{call}: {ev['error']}")
                    answer = {"role": "assistant", "content": "".join(reply)}
                    counts = {k: v for k, v in ev.items() if k not in ("seq_id", "text", "tokens",
                                                                       "logprobs", "error_code")}
                    if tools is not None:
                        content, calls = tools.calls(answer["content"])
                        counts["tool_calls"] = calls
                        if calls:
                            counts["content"] = content
                            answer = {"role": "assistant", "content": content or "", "tool_calls": calls}
                    if ctx is not None and ev["finish"] in ("stop", "length"):
                        ctx.messages = conversation + [answer]
                    return Reply(counts, {
                        "tokens_in": int(counts.get("prompt_tokens") or 0),
                        "tokens_out": max(0, int(counts.get("generated_tokens") or 0) - streamed)})
        except asyncio.CancelledError:
            engine.cancel(seq_id)
            model.wake.set()
            raise
        finally:
            model.queues.pop(seq_id, None)
