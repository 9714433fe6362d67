"""Which models are resident: the memory budget, keep_alive, and the loads that wait for room.

Models are to llmos what pages are to an OS: a driver instance is a frame, and the Pager decides
which model holds one. What it counts is what a model holds while loaded, its weights and its KV
pool (and the bf16 copies of quantised matrices the driver may keep for batched steps): an
estimate from the file's header, an upper bound, until its driver has loaded it, then the
driver's own figures (``weight_bytes + kv_bytes``). The driver processes' own runtime is not
counted.

- A load must fit ``[models] memory_budget``: if it does not, the least recently used idle model
  is unloaded first, then the next, until it fits. Loads wait in one queue, first come first
  served (their position is shown); one that still does not fit after ``load_timeout`` is EAGAIN
  saying what holds the memory, and who (the requests, the pids whose contexts keep a model). A
  model that alone needs more than the budget is refused at once.
- An idle model (no request on it, none waiting for it) is unloaded ``keep_alive`` seconds after
  its last use: the config's, or the last request's own (-1: never; 0: as soon as it is idle).
  An older version of a model (its name now stands for another file, or its file changed) is
  unloaded as soon as it is idle, open contexts or not: they go on on the current version at
  their next turn, recomputed.
- Never unloaded: the default model (the boot driver holds it, so a call naming no model never
  waits), a model with requests running or waiting, and a model with open contexts
  (``Resident.holders``): neither keep_alive nor the budget unloads a model under a conversation.
  Except a context opened as a cache (open_context with ``cache``, as the HTTP gateway's held
  conversations are): it keeps nothing, and its next turn after an unload loads the model again
  and recomputes its history (cached_tokens 0).

Never: talk to a driver (the Resident does), or decide anything about a request's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from pathlib import Path

from syscalls import errors
from syscalls.runtime.config import DriverConfig, ModelsConfig

KV_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def file_version(path: str | os.PathLike) -> str:
    """Which version of a model file this is: its size and mtime ("SIZE-MTIME_NS"); OSError if gone."""
    st = os.stat(path)
    return f"{st.st_size}-{st.st_mtime_ns}"


def estimate(path: Path, driver: DriverConfig, device_memory: int) -> dict:
    """What a model will hold once loaded, from its file's header: {weights, copies, kv, total}
    bytes. copies is the most the driver's bf16 copies of quantised matrices may take (it keeps
    them only where they measured faster, within [driver] dense_copy_budget): an upper bound, so
    that a load never takes the budget by surprise."""
    import gguf
    from drivers.model import describe, read_metadata
    info, meta = describe(path), read_metadata(path)
    arch = info["architecture"]
    layers = int(meta.get(f"{arch}.block_count") or 0)
    heads = int(meta.get(f"{arch}.attention.head_count") or 1)
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv") or heads)
    head_dim = int(meta.get(f"{arch}.attention.key_length")
                   or int(meta.get(f"{arch}.embedding_length") or 0) // heads)
    all_f32 = all(row["type"] == "F32" for row in info["held"])
    width = KV_BYTES.get(driver.kv_dtype, 4 if all_f32 else 2)
    kv = driver.kv_blocks * driver.block_size * layers * 2 * kv_heads * head_dim * width
    weights = sum(row["bytes"] for row in info["held"])
    copies = 0
    if driver.dense_copy != "never":
        for row in info["held"]:
            if row["type"] not in ("F32", "F16", "BF16"):
                block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[row["type"]]]
                copies += 2 * row["bytes"] // size * block
        copies = min(copies, driver.budget_bytes(device_memory))
    return {"weights": weights, "copies": copies, "kv": kv, "total": weights + copies + kv}


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Pager:
    """The budget and the queue of loads; ``run()`` unloads models whose keep_alive is over."""

    def __init__(self, service, cfg: ModelsConfig, driver: DriverConfig, device_memory: int):
        self.service = service          # the Inference service: its models, registry and log
        self.cfg, self.driver = cfg, driver
        if not device_memory:           # a driver that does not say: the machine's RAM
            device_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        self.budget, self.device_memory = cfg.budget_bytes(device_memory), device_memory
        self.keep_alive = cfg.keep_alive
        self.queue: list = []           # Residents waiting for room, first first
        self._changed = asyncio.Event()
        self._estimates: dict[tuple, dict] = {}

    # -- what is held --------------------------------------------------------------------------
    def footprint(self, path: Path) -> dict:
        """The estimate for a model file, read once per version of it; EINVAL (ENOENT when it
        is gone) for a file the driver could not load, as its header and tensor table say (an
        architecture llmos does not run, a tensor missing or cut short), before any driver starts."""
        from drivers.model import ModelError, load_gguf
        try:
            key = (os.path.realpath(path), file_version(path))
            if key not in self._estimates:
                load_gguf(path)         # the header and tensor table only: ~0.1 s, no weights read
                self._estimates[key] = estimate(Path(path), self.driver, self.device_memory)
        except FileNotFoundError:
            raise errors.ENOENT(f"{path}: no such model file") from None
        except ModelError as e:
            raise errors.EINVAL(str(e)) from None            # it names the file and what is wrong
        except (OSError, ValueError, KeyError, IndexError, struct.error) as e:
            raise errors.EINVAL(f"{path}: not a GGUF file llmos can read ({e})") from None
        return self._estimates[key]

    def held(self) -> int:
        return sum(m.memory for m in self.service.models.values()
                   if m.state in ("loading", "resident", "unloading"))

    def position(self, model) -> int | None:
        return self.queue.index(model) + 1 if model in self.queue else None

    def check_boot(self) -> None:
        """EINVAL, with the numbers, when the budget cannot hold the smallest registered model."""
        sizes = [(self.service.default.memory, self.service.default.name)]
        for m in self.service.registry.list():
            with contextlib.suppress(Exception):       # an unreadable file is its request's error
                sizes.append((self.footprint(Path(m["path"]))["total"], m["name"]))
        if sizes and min(sizes)[0] > self.budget:
            need, name = min(sizes)
            raise errors.EINVAL(f"[models] memory_budget {self.cfg.memory_budget!r} is {self.budget} "
                                f"bytes ({human(self.budget)}), less than the smallest model needs: "
                                f"{name!r}, {need} bytes ({human(need)}: weights and KV pool)")

    def changed(self) -> None:
        """Something was freed or became idle: the loads waiting and the keep_alive clock look again."""
        self._changed.set()
        self._changed = asyncio.Event()

    # -- loading -------------------------------------------------------------------------------
    async def admit(self, model) -> None:
        """Wait until model's estimate fits the budget, unloading idle models least recently used
        first; EAGAIN after load_timeout, EIO if it could never fit."""
        need = model.memory = (await asyncio.to_thread(self.footprint, model.path))["total"]
        if need > self.budget:
            raise errors.EIO(f"it needs {human(need)} (weights and KV pool), more than the whole "
                             f"memory budget, {human(self.budget)} ([models] memory_budget "
                             f"{self.cfg.memory_budget!r})")
        model.state = "queued"
        self.queue.append(model)
        deadline = time.monotonic() + self.cfg.load_timeout
        try:
            while True:
                changed = self._changed
                if self.queue[0] is model:
                    while self.held() + need > self.budget and (victim := self.victim()) is not None:
                        await self.unload(victim, f"evicted for {model.name} (memory_budget)")
                    if self.held() + need <= self.budget:
                        model.state = "loading"
                        return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.EAGAIN(self._no_room(model, need))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), left)
        finally:
            self.queue.remove(model)
            self.changed()

    def _no_room(self, model, need: int) -> str:
        users = [f"{m.name} ({m.describe_use()})" for m in self.service.models.values()
                 if m.state in ("loading", "resident", "unloading") and m.memory]
        return (f"no room for it within the memory budget after {self.cfg.load_timeout:g}s: it needs "
                f"{human(need)}, the budget is {human(self.budget)} and {human(self.held())} is held "
                f"by models in use: {', '.join(users) or 'none'}; try again later")

    def victim(self):
        """The least recently used model that may be unloaded now, or None."""
        idle = [m for m in self.service.models.values() if m.unloadable()]
        return min(idle, key=lambda m: m.last_used, default=None)

    def unload(self, model, why: str) -> asyncio.Task:
        """Start unloading model (it is "unloading" from now); the task ends when its memory is back."""
        model.state = "unloading"
        task = asyncio.get_running_loop().create_task(model.unload(why))
        self.service.background.add(task)
        task.add_done_callback(self.service.background.discard)
        return task

    # -- keep_alive ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Unload each idle model when its keep_alive is over, and an old version once idle."""
        while True:
            changed, now, soonest = self._changed, time.monotonic(), None
            try:
                soonest = self._expire_idle(now)
            except Exception:               # a bug of ours: loud, and the clock goes on
                self.service.log.exception("pager_bug")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), None if soonest is None else soonest - now)

    def _expire_idle(self, now: float) -> float | None:
        """Start unloading what is due; when the next keep_alive runs out (None: none will)."""
        soonest = None
        for model in list(self.service.models.values()):
            if not model.unloadable():
                continue
            if self.service.superseded(model):
                self.unload(model, "a newer version serves its name")
                continue
            expires = model.expires_at()
            if expires is None:
                continue
            if expires <= now:
                self.unload(model, f"idle for its keep_alive ({model.keep_alive:g}s)")
            else:
                soonest = expires if soonest is None else min(soonest, expires)
        return soonest
