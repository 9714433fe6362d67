"""The model in this process: a Llama, its KV pool, and each sequence's sampler and history.

A driver service runs one (drivers/driver.py); tests and benchmarks run one in their own process
beside an Engine, stepping it the way the service does (services.inference.run_in_process). The
messages it takes and gives are syscalls/runtime/steps.py's.

Never: allocate blocks, schedule, or look at text.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from drivers.model.batch import Chunk, StepAborted
from drivers.model.constraints import Constrained
from drivers.model.sampling import SamplingParams, SequenceSampler, host_logits, sample
from syscalls.runtime.steps import Sampled, SeqStep


M_MMAP_THRESHOLD = -3     # glibc's mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:           # not glibc: its defaults stand
        return None


def _steady_heap() -> None:
    """Give every allocation of 1 MiB or more its own mapping, returned to the OS when freed.

    glibc raises that threshold each time such a block is freed, so the loader's unpacked pieces
    (a few MB each, freed one after another) would come from a heap that only grows: measured on a
    1.1B-parameter file, 160 MB more peak RSS than the model holds."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def _give_back_heap() -> None:
    """Return what the heap freed while loading to the OS (malloc_trim)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class ModelRunner:
    """A model (llama.Llama or lean.LeanLlama) + its KV pool + one SequenceSampler and history per
    sequence: info, step, release."""

    def __init__(self, model, num_blocks: int, block_size: int = 16, name: str = "", kernels: dict | None = None):
        self.model = model
        self.pool = model.new_kv_pool(num_blocks, block_size)
        self.name = name
        self.kernels = kernels or {}          # drivers.model.kernels.choose's plan
        self._samplers: dict[int, Any] = {}
        self._history: dict[int, list[int]] = {}   # every token fed, by position: the repetition penalty's view
        self._constrained = Constrained(name, getattr(model, "threads", 0))   # constrained sequences' grammars

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  num_blocks: int = 1024, block_size: int = 16, dense_copy: str = "auto",
                  dense_copy_budget: int = 1 << 30, kv_dtype: str | None = None, native: str = "auto",
                  engine: str = "auto", threads: int = 0, **model_args) -> ModelRunner:
        """Load the model in its own bits on one of two engines.

        The lean one (drivers/model/lean.py: native.c throughout, never imports torch) where `engine`
        is "lean", or "auto" with dense_copy "never" and a model native.c multiplies entirely; else the
        torch one: each matrix where it measured fastest at one row (llmos's compiled kernel or torch's,
        `native`), then measure (or recall, from cache_dir) which product runs batched steps here and
        make the dense copies that won and fit dense_copy_budget bytes. `threads` (0: the engine's
        own choice) is what the products use."""
        from drivers.model import lean
        from drivers.model.gguf import load_gguf
        _steady_heap()
        mf = load_gguf(path)
        device = str(model_args.get("device", "cpu"))
        if threads and engine != "torch":
            os.environ["OMP_NUM_THREADS"] = str(threads)    # read once, when native.c's OpenMP starts
        why = lean.why_not(mf, device, dense_copy, native, engine)
        if not why:
            model = lean.LeanLlama(mf, kv_dtype=kv_dtype, max_positions=model_args.get("max_positions"),
                                   progress=model_args.get("progress"))
            _give_back_heap()
            return cls(model, num_blocks, block_size, name=str(path), kernels={"dense_copy": "never"})
        if engine == "lean":
            raise ValueError(f"engine = \"lean\" cannot run {path}: {why}")
        import torch
        from drivers.model import kernels
        from drivers.model.llama import Llama
        if threads:
            torch.set_num_threads(threads)
        choice = kernels.prefer_native(mf, cache_dir, native) if device.startswith("cpu") else None
        model = Llama(mf, kv_dtype=None if kv_dtype in (None, "auto") else kv_dtype, native=choice, **model_args)
        plan = kernels.choose(model, cache_dir, dense_copy, dense_copy_budget)
        if dense_copy == "never":            # lean was asked for: `models` says why it does not run
            plan["lean"] = why
        _give_back_heap()
        return cls(model, num_blocks, block_size, name=str(path), kernels=plan)

    def info(self) -> dict[str, Any]:
        held = self.model.describe(self.kernels)
        return {"num_blocks": self.pool.num_blocks, "block_size": self.pool.block_size,
                "vocab_size": self.model.config.vocab_size, "context_length": self.model.max_positions,
                "model": self.name, "engine": held["engine"], "compute_dtype": held["compute_dtype"],
                "kv_dtype": held["kv_dtype"], "weight_bytes": self.model.weight_bytes(),
                "dense_copy": self.kernels.get("dense_copy", "never"), "native": held["native"],
                "weights": held["weights"]}

    @property
    def threads(self) -> int:
        return self.model.threads

    @property
    def kv_bytes(self) -> int:
        return self.pool.nbytes

    def step(self, batch: list[SeqStep], should_stop=None, should_yield=None) -> list[Sampled]:
        """Raises StepAborted (drivers.model.llama) if should_stop() says so before sampling.

        A decoding sequence with "steps": k > 1 goes on decoding by itself after its first token,
        feeding each sampled token back, until it has k tokens, samples one of its "stop_ids", or
        should_yield() (or should_stop()) says to hand back what there is; its later tokens come
        in the Sampled's "next"."""
        out = self._feed(batch, should_stop)
        more = {s["seq_id"]: s for s in batch if s.get("steps", 1) > 1}
        if not more:
            return out
        by_id = {o["seq_id"]: o for o in out}
        active = [sid for sid in more if "error" not in by_id[sid]
                  and by_id[sid]["token"] not in more[sid].get("stop_ids", ())]
        done, stuck = 1, set()
        while active and not (should_yield and should_yield()):
            steps = []
            for sid in active:
                o, s = by_id[sid], more[sid]
                last = o["next"][-1]["token"] if o.get("next") else o["token"]
                steps.append({"seq_id": sid, "tokens": [last], "start": s["start"] + done,
                              "block_table": s["block_table"], "sample": True, "params": None})
            try:
                picks = self._feed(steps, should_stop)
            except StepAborted:
                break                       # what was decoded so far stands; this sub-step never happened
            done += 1
            for p in picks:
                if p.get("error"):              # its constraint is stuck: the next step says so
                    stuck.add(p["seq_id"])
                    continue
                by_id[p["seq_id"]].setdefault("next", []).append(
                    {"token": p["token"], "logprob": p["logprob"], "top": p["top"]})
            active = [sid for sid in active if sid not in stuck and done < more[sid]["steps"]
                      and by_id[sid]["next"][-1]["token"] not in more[sid].get("stop_ids", ())]
        return out

    def _feed(self, batch: list[SeqStep], should_stop=None) -> list[Sampled]:
        """One forward pass over the batch, and a token for each sequence that samples."""
        chunks, samplers, histories, ids = [], [], [], []
        for s in batch:
            sid = s["seq_id"]
            if s.get("params") is not None or sid not in self._samplers:
                if s.get("params") is None and s["start"] != 0:
                    raise ValueError(f"sequence {sid}: first step must start at 0 or carry params")
                self._samplers[sid] = SequenceSampler(SamplingParams.from_dict(s.get("params")),
                                                      drawn=int(s.get("drawn") or 0))
            # recompute after preemption re-feeds earlier positions: overwrite, never append twice
            hist = self._history.setdefault(sid, [])
            if s.get("history") is not None:
                hist[:] = s["history"]
            del hist[s["start"]:]
            hist.extend(s["tokens"])
            self._constrained.admit(s)
            chunks.append(Chunk(s["tokens"], s["start"], s["block_table"], "last" if s["sample"] else "none"))
            if s["sample"]:
                samplers.append(self._samplers[sid])
                histories.append(hist)
                ids.append(sid)
        masks = self._constrained.masks([(i, sid, h) for i, (sid, h) in enumerate(zip(ids, histories))])
        logits = self.model.step(self.pool, chunks, should_stop)   # masks built beside it, if a core is spare
        if not ids:
            return []
        blocked = {}
        if masks is not None:
            logits = host_logits(logits)
            blocked = masks.apply(logits)
        picks = sample(logits, samplers, histories)
        out = [{"seq_id": sid, "token": p.token, "logprob": p.logprob, "top": [list(t) for t in p.top]}
               for sid, p in zip(ids, picks)]
        for row, why in blocked.items():
            out[row]["error"] = why
        return out

    def reset(self) -> None:
        """Forget every sequence: their engine is gone (the inference service restarted)."""
        self.release(list(self._samplers) + list(self._history))

    def release(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self._samplers.pop(sid, None)
            self._history.pop(sid, None)
        self._constrained.release(seq_ids)
