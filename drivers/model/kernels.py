"""Which product runs each weight matrix on this machine: measured at first load, recorded, shown.

The layout a matrix is held in comes from the type table (drivers/model/types.py). What differs
between machines is the batched step: on an AMX Xeon a bf16 dense product of 32 rows is ~4x faster
than the int4 kernel, on an AVX2 EPYC the order may differ. So for each kind of int4 matrix (layout,
types, shape) `choose` times the held product against a bf16 dense copy at 1..32 rows and keeps a
copy, for steps of at least the crossover rows, only where it measured faster and the copies fit
the budget (`[driver] dense_copy = "auto"`). "never" keeps none (the lean setting for a large model);
"always" keeps one for every matrix that fits, used from the measured crossover (2 rows if the copy
never won). The measurements are recorded in the model cache directory under this machine's key
(CPU model and flags, torch version, threads), so later loads skip them; `table` is what `models`
shows.

Before the model is held, `prefer_native` decides the same way which tensors run on llmos's compiled
kernel (drivers/model/native.py) instead of the table's layout: for each kind of tensor it can run
(type and shape) it times both on the tensor's first rows at one row of activations, the single
stream's case, and keeps native only where it took at most FASTER of the other's time.

Never: change a matrix's held layout after loading, or keep a copy that does not fit the budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from . import native as native_lib
from .quant import Matrix, hold

ROWS = (1, 2, 4, 8, 16, 32)
RECORD = "kernels.json"
DENSE_CHOICES = ("auto", "never", "always")
NATIVE_CHOICES = ("auto", "never", "always")
FASTER = 0.9                 # a dense copy must take at most 90% of the held product's time to be kept


def machine_key(device: torch.device | str = "cpu") -> str:
    """CPU model and flags, torch version and threads (and the device, when not the CPU): what a
    measurement is valid for."""
    cpu = platform.processor() or ""
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), cpu)
        flags = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("flags")), "")
    except OSError:
        model, flags = cpu, ""
    raw = f"{model}|{hashlib.sha256(flags.encode()).hexdigest()[:12]}|{torch.__version__}|{torch.get_num_threads()}"
    device = torch.device(device)
    if device.type != "cpu":
        raw += f"|{device.type}:{torch.cuda.get_device_name(device) if device.type == 'cuda' else device}"
    return raw


def _time(fn, repeat: int = 7, device: torch.device | None = None) -> float:
    sync = torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    fn()
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matrix_key(m: Matrix) -> str:
    return f"{m.layout}:{'+'.join(m.types)}:{m.shape[0]}x{m.shape[1]}"


@torch.inference_mode()
def measure(m: Matrix, dtype: torch.dtype, device: torch.device | None = None) -> dict[str, Any]:
    """Microseconds of the held product and of a bf16 dense copy, at each row count in ROWS."""
    dense = m.to_dense()
    held, copy = {}, {}
    for rows in ROWS:
        x = torch.randn(rows, m.shape[1], device=dense.device).to(dtype)
        held[str(rows)] = _time(lambda: m.product(x), device=device) * 1e6     # str keys: the record is JSON
        xb = x.to(torch.bfloat16)
        copy[str(rows)] = _time(lambda: torch.nn.functional.linear(xb, dense), device=device) * 1e6
    wins = [r for r in ROWS if copy[str(r)] <= FASTER * held[str(r)]]
    # the crossover is where the copy wins from there on up, not one lucky row count
    crossover = next((r for r in ROWS if all(w in wins for w in ROWS if w >= r)), None)
    return {"held_us": held, "dense_us": copy, "crossover": crossover}


MEASURE_ROWS = 4096          # a big matrix is timed on its first rows: the products are linear in rows


class NativeChoice:
    """Which tensor kinds (type:rows x cols) run on the compiled kernel; what quant.hold asks."""

    def __init__(self, lib, kinds: set[str]):
        self.lib, self.kinds = lib, kinds

    def wants(self, t) -> bool:
        return tensor_key(t) in self.kinds


def tensor_key(t) -> str:
    """type:rows x cols of a RawTensor or a TensorInfo."""
    return f"{native_lib.Q(int(t.ggml_type)).name}:{t.shape[0]}x{t.shape[1]}"


@torch.inference_mode()
def measure_native(t, lib) -> dict[str, float]:
    """Microseconds of one row through native.c and through the table's layout, on t's first rows."""
    part = type(t)(t.name, t.ggml_type, (min(t.shape[0], MEASURE_ROWS), t.shape[1]),
                   t.data[:min(t.shape[0], MEASURE_ROWS) * t.row.nbytes * (t.shape[1] // t.row.block)], t.offset)
    x = torch.randn(1, t.shape[1])
    mine = hold([part], torch.device("cpu"), NativeChoice(lib, {tensor_key(part)}))
    theirs = hold([part], torch.device("cpu"))
    return {"native_us": _time(lambda: mine(x)) * 1e6, "held_us": _time(lambda: theirs(x)) * 1e6,
            "held_layout": theirs.layout, "rows": part.shape[0]}


def prefer_native(mf, cache_dir: str | os.PathLike | None, mode: str = "auto") -> NativeChoice | None:
    """Measure (or recall) native.c against the table's layout for every kind of matrix it can run."""
    if mode not in NATIVE_CHOICES:
        raise ValueError(f"native must be one of {', '.join(NATIVE_CHOICES)}, not {mode!r}")
    if mode == "never":
        return None
    lib = native_lib.library()
    if lib is None:
        return None
    kinds: dict[str, str] = {}                  # kind -> the first tensor of that kind
    for name, info in mf.tensors.items():
        held = len(info.shape) == 2 and (name != "token_embd.weight" or mf.config.tied_embeddings)
        if held and int(info.ggml_type) in native_lib.TYPES:
            kinds.setdefault(tensor_key(info), name)
    if mode == "always":
        return NativeChoice(lib, set(kinds))
    cache = Path(cache_dir) if cache_dir is not None else None
    record = _load_record(cache)
    mine = record.setdefault(machine_key(), {}).setdefault("native", {})
    missing = [k for k in kinds if k not in mine]
    for key in missing:
        mine[key] = measure_native(mf.memmap(kinds[key]), lib)
    if missing:
        _save_record(cache, record)
    return NativeChoice(lib, {k for k in kinds if mine[k]["native_us"] <= FASTER * mine[k]["held_us"]})


def native_status(model) -> str:
    """What `models` says of the compiled kernels: in use (where), or why not."""
    if model.ops is None:
        return f"off ({native_lib.why_not()})" if native_lib.why_not() else "off"
    used = sum(1 for _, m in model.matrices() if "native" in m.layout)
    return (f"on ({model.ops.simd}-bit, {model.ops.threads} threads): {used} matrices, RMS norm, rotary and"
            f" K/V writes, decode attention, feed-forward gate")


def _load_record(cache_dir: Path | None) -> dict:
    if cache_dir is None:
        return {}
    try:
        return json.loads((cache_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _save_record(cache_dir: Path | None, record: dict) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", dir=cache_dir)
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
    os.replace(tmp, cache_dir / RECORD)


def choose(model, cache_dir: str | os.PathLike | None, dense_copy: str = "auto",
           budget: int = 0) -> dict[str, Any]:
    """Measure (or recall) each kind of matrix and give matrices their dense copies; returns the plan."""
    if dense_copy not in DENSE_CHOICES:
        raise ValueError(f"dense_copy must be one of {', '.join(DENSE_CHOICES)}, not {dense_copy!r}")
    matrices = model.matrices()
    plan = {"machine": machine_key(model.device), "dense_copy": dense_copy, "budget": budget, "dense_bytes": 0, "kinds": {}}
    if dense_copy == "never":
        return plan
    cache = Path(cache_dir) if cache_dir is not None else None
    record = _load_record(cache)
    mine = record.setdefault(plan["machine"], {})
    kinds: dict[str, list[Matrix]] = {}
    for _, m in matrices:
        # only int4 matrices get copies: a dense one is its own, and an fp32 file's products stay fp32
        if any(kind in m.layout for kind in ("int4pack", "native", "blocks")):
            kinds.setdefault(matrix_key(m), []).append(m)
    changed = False
    for key, group in kinds.items():
        if key not in mine:
            mine[key] = measure(group[0], model.dtype, model.device)
            changed = True
    if changed:
        _save_record(cache, record)
    # the biggest saving of a 32-row step per byte of copy first
    order = sorted(kinds, key=lambda k: -(mine[k]["held_us"]["32"] - mine[k]["dense_us"]["32"])
                   * len(kinds[k]) / group_bytes(kinds[k]))
    used = 0
    for key in order:
        m = mine[key]
        crossover = m["crossover"]
        if crossover is None and dense_copy == "auto":
            plan["kinds"][key] = {"dense_from": None, **_brief(m)}
            continue
        cost = group_bytes(kinds[key])
        if used + cost > budget:
            plan["kinds"][key] = {"dense_from": None, "over_budget": True, **_brief(m)}
            continue
        rows = crossover or 2
        for matrix in kinds[key]:
            matrix.dense = matrix.to_dense()
            matrix.dense_rows = rows
        used += cost
        plan["kinds"][key] = {"dense_from": rows, **_brief(m)}
    plan["dense_bytes"] = used
    return plan


def group_bytes(group: list[Matrix]) -> int:
    return sum(m.shape[0] * m.shape[1] * 2 for m in group)


def _brief(m: dict) -> dict:
    return {"held_us_1": round(m["held_us"]["1"], 1), "held_us_32": round(m["held_us"]["32"], 1),
            "dense_us_32": round(m["dense_us"]["32"], 1)}


def table(model, plan: dict) -> list[dict[str, Any]]:
    """One row per kind of matrix: names, types, layout, bytes, and what runs batched steps."""
    rows: dict[str, dict] = {}
    for name, m in model.matrices():
        key = matrix_key(m)
        part = name.split(".")[-1] if name.startswith("blk.") else name
        row = rows.setdefault(key, {"matrix": part, "count": 0, "types": "+".join(m.types), "layout": m.layout,
                                    "shape": list(m.shape), "bytes": 0, "dense_bytes": 0, "batched": m.layout})
        row["count"] += 1
        row["bytes"] += m.nbytes
        if m.dense is not None:
            row["dense_bytes"] += m.dense.nbytes
            row["batched"] = f"bf16 copy from {m.dense_rows} rows"
        choice = plan.get("kinds", {}).get(key)
        if choice:
            row.update({k: v for k, v in choice.items() if k != "dense_from"})
    if model.embed.nbytes:
        rows["embedding"] = {"matrix": "token_embd", "count": 1, "types": model.embed.raw.row.name,
                             "layout": "file blocks (mapped)", "shape": list(model.embed.raw.shape),
                             "bytes": model.embed.nbytes, "dense_bytes": 0, "batched": "row lookup"}
    return list(rows.values())
