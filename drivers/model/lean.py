"""The torch-free engine: the whole Llama forward pass on native.c, with numpy buffers.

torch's import alone is ~250 MB of resident memory (measured: 254 MiB RSS for `import torch` against
30 for numpy), more than SmolLM2-135M's weights and KV pool together. A driver that runs lean
(`[driver] dense_copy = "never"`, `engine = "auto"`) on a file whose matrices native.c multiplies
(Q4_0, Q4_1, Q8_0, F16, F32) never imports torch: every matrix is the file's own blocks, mapped read-only,
multiplied with fp32 activations (exact weights, so no refinement pass); the embedding is a row
lookup in the same mapping; norms, rotary + K/V writes, attention and the gate are native.c's; the
KV pool is a numpy array (bf16 as its bits by default). Attention reads the paged pool in place for
every token, a prompt's too: each prompt token is one row whose keys are the positions up to its own
(causal), through its sequence's block table. Resident memory is then the file's touched pages, the
pool, and the interpreter.

The trade: batched steps run native.c's products, not a dense bf16 copy on oneDNN, so 32 programs
decode more slowly than with `dense_copy = "auto"`; and a long prompt's attention is a plain loop over
its keys. It is what a user with a big model on a small machine wants; the torch engine
(drivers/model/llama.py) is the fast one. Sampling is the same for both (drivers/model/sampling.py).

Never: import torch, allocate KV blocks (the scheduler does), keep per-sequence state between steps,
or sample.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from drivers.model import native as native_lib
from drivers.model.batch import Chunk, StepAborted, lay_out
from drivers.model.gguf import CorruptModelError, LlamaConfig, ModelFile, Progress, layer_tensors

ENGINE_CHOICES = ("auto", "torch", "lean")
KV_DTYPES = {"bf16": np.uint16, "fp16": np.float16, "fp32": np.float32}    # bf16 held as its bits
KV_NAMES = {np.dtype(np.uint16): "bfloat16", np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}


def matrix_names(c: LlamaConfig) -> list[str]:
    """Every tensor the forward pass multiplies by."""
    names = ["token_embd.weight" if c.tied_embeddings else "output.weight"]
    for i in range(c.n_layers):
        _, qkv, wo, _, gate_up, down = layer_tensors(i)
        names += [*qkv, wo, *gate_up, down]
    return names


def why_not(mf: ModelFile, device: str = "cpu", dense_copy: str = "never", native: str = "auto",
            engine: str = "auto") -> str:
    """Why this model would not run lean here ("" when it would)."""
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {engine!r}")
    if engine == "torch":
        return "engine = \"torch\""
    if engine == "auto" and dense_copy != "never":
        return f"dense_copy = \"{dense_copy}\" (the lean engine runs with dense_copy = \"never\")"
    if not str(device).startswith("cpu"):
        return f"the lean engine runs on the CPU, not {device}"
    if native == "never":
        return "native = \"never\" (the lean engine is native.c's)"
    other = sorted({mf.tensors[n].type_name for n in matrix_names(mf.config)
                    if int(mf.tensors[n].ggml_type) not in native_lib.PRODUCT_TYPES})
    if other:
        return f"native.c does not multiply {', '.join(other)}"
    if native_lib.library(torch_free=True) is None:
        return f"native.c cannot run here ({native_lib.why_not()})"
    return ""


class LeanPool:
    """Keys and values for every sequence: [layers, 2, num_blocks, block_size, kv_heads, head_dim],
    as llama.KVPool, in numpy. Position p of a sequence lives in block block_table[p // block_size],
    row p % block_size."""

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16, dtype=np.uint16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.config, self.num_blocks, self.block_size = config, num_blocks, block_size
        # np.zeros maps zero pages: memory becomes resident only where a sequence writes
        self.data = np.zeros((config.n_layers, 2, num_blocks, block_size, config.n_kv_heads, config.head_dim),
                             dtype=dtype)

    @property
    def dtype(self) -> str:
        return KV_NAMES[self.data.dtype]

    @property
    def kind(self) -> int:
        """native.c's element kind of the pool: 0 fp32, 1 bf16, 2 fp16."""
        return native_lib.KINDS[str(self.data.dtype)]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


class LeanLlama:
    """A Llama held as the file's mapped blocks, run on native.c: what llama.Llama offers a runner."""

    engine = "lean"

    def __init__(self, mf: ModelFile, lib: native_lib.Library | None = None, kv_dtype: str | None = None,
                 max_positions: int | None = None, progress: Progress | None = None):
        c = self.config = mf.config
        self.lib = lib or native_lib.library(torch_free=True)
        if self.lib is None:
            raise RuntimeError(f"the lean engine needs native.c: {native_lib.why_not()}")
        if c.n_heads % c.n_kv_heads:
            raise ValueError(f"{c.n_heads} query heads cannot share {c.n_kv_heads} kv heads evenly")
        self.path = mf.path
        total, done = mf.matrix_bytes, 0
        self.mapped: dict[str, Any] = {}         # name -> RawTensor over the file's mapping

        def mapped(name: str):
            nonlocal done
            t = mf.tensors[name]
            if int(t.ggml_type) not in native_lib.PRODUCT_TYPES:
                raise ValueError(f"{mf.path}: {name} is {t.type_name}; the lean engine multiplies only"
                                 f" {', '.join(native_lib.Q(q).name for q in sorted(native_lib.PRODUCT_TYPES))}")
            if progress:
                progress(done, total, f"mapping {name} ({t.type_name})")
            raw = self.mapped[name] = mf.memmap(name)
            if raw.data.nbytes != t.nbytes:
                raise CorruptModelError(f"{mf.path}: tensor {name} at offset {t.offset}: the file ended early")
            done += t.nbytes
            return raw

        def product(*names: str) -> tuple:
            return self.lib.prepare([mapped(n) for n in names])

        def vector(name: str) -> tuple[np.ndarray, int]:
            """A norm's weights, fp32, and their address (for the step's direct calls)."""
            nonlocal done
            done += mf.tensors[name].nbytes
            w = np.ascontiguousarray(mf.read(name).dequantize().reshape(-1), dtype=np.float32)
            return w, w.ctypes.data

        self.norm = vector("output_norm.weight")
        out_name = "token_embd.weight" if c.tied_embeddings else "output.weight"
        self.output = product(out_name)
        if c.tied_embeddings:                   # the row lookups read the output's own mapping
            self.embed = self.mapped[out_name]
        else:
            self.embed = mf.memmap("token_embd.weight")
            done += mf.tensors["token_embd.weight"].nbytes
        self.layers = [(vector(attn_norm), product(*qkv), product(wo), vector(ffn_norm), product(*gate_up),
                        product(down))
                       for attn_norm, qkv, wo, ffn_norm, gate_up, down in map(layer_tensors, range(c.n_layers))]
        self.max_positions = max_positions or c.context_length
        kv_dtype = "bf16" if kv_dtype in (None, "auto") else kv_dtype     # half the bytes of fp32, as lean is for
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of auto, {', '.join(KV_DTYPES)}, not {kv_dtype!r}")
        self.kv_dtype = KV_DTYPES[kv_dtype]
        inv_freq = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
        if c.has_rope_freqs:
            inv_freq = inv_freq / mf.read("rope_freqs.weight").dequantize().reshape(-1).astype(np.float64)
        self.inv_freq = inv_freq
        if progress:
            progress(total, total, "loaded")

    # ---------------------------------------------------------------------------------- what a runner asks

    def new_kv_pool(self, num_blocks: int, block_size: int = 16) -> LeanPool:
        return LeanPool(self.config, num_blocks, block_size, self.kv_dtype)

    def weight_bytes(self) -> int:
        """The mapped matrices' bytes: the file's own, paged in as they are read."""
        return sum(int(t.data.nbytes) for t in self.mapped.values()) + (
            0 if self.config.tied_embeddings else int(self.embed.data.nbytes))

    def describe(self, plan: dict | None = None) -> dict[str, Any]:
        """compute_dtype, kv_dtype, native and weights, as `models` shows them."""
        kinds: dict[str, dict] = {}
        for name, t in self.mapped.items():
            part = name.split(".")[-2] if name.startswith("blk.") else name.removesuffix(".weight")
            row = kinds.setdefault(f"{part}:{t.row.name}", {
                "matrix": part, "count": 0, "types": t.row.name, "layout": "native (file blocks, mapped)",
                "shape": list(t.shape), "bytes": 0, "dense_bytes": 0, "batched": "native"})
            row["count"] += 1
            row["bytes"] += int(t.data.nbytes)
        if not self.config.tied_embeddings:
            kinds["embedding"] = {"matrix": "token_embd", "count": 1, "types": self.embed.row.name,
                                  "layout": "file blocks (mapped)", "shape": list(self.embed.shape),
                                  "bytes": int(self.embed.data.nbytes), "dense_bytes": 0, "batched": "row lookup"}
        return {"engine": "lean (native.c, no torch)", "compute_dtype": "float32",
                "kv_dtype": KV_NAMES[np.dtype(self.kv_dtype)],
                "native": (f"on ({self.lib.simd}-bit, {self.lib.threads} threads): every matrix, RMS norm,"
                           f" rotary and K/V writes, attention, feed-forward gate"),
                "weights": list(kinds.values())}

    @property
    def threads(self) -> int:
        return self.lib.threads

    # ------------------------------------------------------------------------------------------ paged step

    def step(self, pool: LeanPool, chunks: Sequence[Chunk], should_stop=None) -> np.ndarray:
        """As llama.Llama.step: write every fed token's K/V into the pool; return fp32 logits
        [rows, vocab], rows in the chunks' order (one per "last" chunk, len(tokens) per "all")."""
        c, lib = self.config, self.lib
        if pool.config != c:
            raise ValueError("this KV pool was made for a different model")
        lay = lay_out(chunks, c.vocab_size, self.max_positions, pool.num_blocks, pool.block_size)
        T = len(lay.tokens)
        H, KVH, D = c.n_heads, c.n_kv_heads, c.head_dim
        # every token attends as its own row: a decoding one over its sequence, a prompt's up to
        # itself (decoding rows come first in the layout, then each prompt's rows)
        width = max([len(t) for t in lay.decode_tables] + [len(p.blocks) for p in lay.prompts])
        table = np.zeros((T, width), dtype=np.int64)
        length = np.empty(T, dtype=np.int32)
        for row, t in enumerate(lay.decode_tables):
            table[row, :len(t)] = t
        length[:lay.n_decode] = lay.decode_lengths
        for p in lay.prompts:
            table[p.first:p.first + p.n, :len(p.blocks)] = p.blocks
            length[p.first:p.first + p.n] = np.arange(p.start + 1, p.start + p.n + 1)
        slots = np.asarray(lay.slots, dtype=np.int64)
        angles = np.outer(np.asarray(lay.positions, dtype=np.float64) / c.rope_scale, self.inv_freq)
        rope = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)       # [T, D/2, 2]

        x = np.ascontiguousarray(self.embed.dequantize(np.asarray(lay.tokens, dtype=np.int64)), dtype=np.float32)
        h = np.empty((T, c.hidden), np.float32)
        qkv = np.empty((T, (H + 2 * KVH) * D), np.float32)
        q = np.empty((T, H, D), np.float32)
        attn = np.empty((T, H, D), np.float32)
        o = np.empty((T, c.hidden), np.float32)
        gate_up = np.empty((T, 2 * c.ffn), np.float32)
        down = np.empty((T, c.hidden), np.float32)
        act = np.empty((T, c.ffn), np.float32)
        # straight to the C functions with addresses taken once a step: numpy's .ctypes costs 3-5 us an
        # array, and a layer passes ~25 of them
        L, eps, scale, kind = lib.lib, c.rms_eps, D ** -0.5, pool.kind
        X, Hp, QKV, Qp, A, O, GU, ACT, DOWN = (a.ctypes.data for a in (x, h, qkv, q, attn, o, gate_up, act, down))
        ROPE, SLOTS, TABLE, LENGTH = (a.ctypes.data for a in (rope, slots, table, length))
        base, per_layer, per_half = pool.data.ctypes.data, pool.data.strides[0], pool.data.strides[1]
        gemm = L.llmos_gemm
        qkv_width, width2 = qkv.shape[1], gate_up.shape[1]
        delta = None                                # the last product, not yet added to the residual
        for i, (attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down) in enumerate(self.layers):
            if should_stop is not None and should_stop():
                raise StepAborted(f"step aborted before layer {i}")
            K = base + i * per_layer
            V = K + per_half
            if (L.llmos_rms_norm(X, delta, 0, attn_norm[1], T, c.hidden, eps, Hp, 0)
                    or gemm(*wqkv, Hp, T, QKV, qkv_width)
                    or L.llmos_rope_store(QKV, 0, T, H, KVH, D, qkv_width, ROPE, K, V, kind, SLOTS, Qp)
                    or L.llmos_attend(Qp, T, H, KVH, D, K, V, kind, pool.block_size, TABLE, width, LENGTH, scale, A)
                    or gemm(*wo, A, T, O, c.hidden)
                    or L.llmos_rms_norm(X, O, 0, ffn_norm[1], T, c.hidden, eps, Hp, 0)
                    or gemm(*w_gate_up, Hp, T, GU, width2)
                    or L.llmos_silu_mul(GU, 0, T, c.ffn, ACT, 0)
                    or gemm(*w_down, ACT, T, DOWN, c.hidden)):
                raise ValueError(f"native.c refused layer {i}'s arguments (step of {T} tokens)")
            delta = DOWN
        x += down
        if not lay.logit_rows:
            return np.empty((0, c.vocab_size), np.float32)
        last = x[lay.logit_rows]
        h = lib.rms_norm_into(last, self.norm[0], eps, None, np.empty_like(last))
        return lib.gemm(self.output, h, np.empty((len(lay.logit_rows), c.vocab_size), np.float32))
