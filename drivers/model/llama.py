"""The Llama forward pass over a paged KV cache.

A driver owns one `Llama` and one `KVPool`. Each scheduler step arrives as a list of `Chunk`s (plain token
ids, a start position, a block table), one per running sequence: a decoding sequence feeds one token, a
prefilling one feeds a slice of its prompt. `Llama.step` runs them all as one flat batch: every matmul sees
all tokens at once; only attention is split, into one batched group for all single-token chunks plus one
group per prompt chunk (prompt chunks are few and long, so a loop over them costs nothing measurable).

Rotary embedding rotates ADJACENT pairs (x[2i], x[2i+1]) because llama.cpp's converter permutes the q/k
weights; this is what GGUF weights need. The reference tests compare with is deliberately separate:
tests/model/reference.py, plain fp32 from weights the gguf package dequantised, its own RoPE, no pool.

Never: allocate KV blocks (the scheduler does), keep per-sequence state between steps (the block tables
are the state), or sample.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from drivers.model import quant
from drivers.model.batch import LOGITS_CHOICES, Chunk, StepAborted, lay_out  # noqa: F401 (re-exported)
from drivers.model.gguf import CorruptModelError, LlamaConfig, ModelFile, Progress, layer_tensors, load_gguf
from drivers.model.quant import Matrix

REFINE_MAX = 64         # logits per row a step recomputes in fp32 at most (Llama._refine)
REFINE_MARGIN = 8.0     # ... those within this many nats of their row's highest
NATIVE_SMALL_OPS_ROWS = 64   # steps of at most this many tokens run norms and the gate on native.c


KV_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class KVPool:
    """Keys and values for every sequence: [layers, 2, num_blocks, block_size, kv_heads, head_dim].

    Position p of a sequence lives in block block_table[p // block_size], row p % block_size.
    """

    def __init__(self, config: LlamaConfig, num_blocks: int, block_size: int = 16,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.data = torch.zeros((config.n_layers, 2, num_blocks, block_size, config.n_kv_heads, config.head_dim),
                                dtype=dtype, device=device)
        # per-layer views: one row per (block, slot) for writing single tokens, one row per block for
        # gathering a sequence's blocks (whole-block copies are ~1.6x faster than row by row)
        rows = (num_blocks * block_size, config.n_kv_heads, config.head_dim)
        self.k = [self.data[i, 0].view(rows) for i in range(config.n_layers)]
        self.v = [self.data[i, 1].view(rows) for i in range(config.n_layers)]
        # one row per block, K and V side by side: a sequence's blocks gathered in one index_select
        self.kv_blocks = [self.data[i].view(2, num_blocks, -1) for i in range(config.n_layers)]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def block_bytes(config: LlamaConfig, block_size: int = 16, dtype: torch.dtype = torch.bfloat16) -> int:
        return config.n_layers * 2 * block_size * config.n_kv_heads * config.head_dim * dtype.itemsize

    @classmethod
    def for_memory(cls, config: LlamaConfig, max_bytes: int, block_size: int = 16,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> "KVPool":
        return cls(config, max(1, max_bytes // cls.block_bytes(config, block_size, dtype)), block_size, device, dtype)


class _Embedding:
    """Token id -> fp32 row. From the output matrix when that is held dense and tied; otherwise from
    the file's own blocks, mapped read-only and dequantised a few rows at a time."""
    __slots__ = ("dense", "raw", "device")

    def __init__(self, dense: torch.Tensor | None, raw, device: torch.device):
        self.dense, self.raw, self.device = dense, raw, device

    def __call__(self, tokens: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
        """tokens on the model's device, ids the same on the host (a file lookup needs no copy back)."""
        if self.dense is not None:
            return F.embedding(tokens, self.dense).float()
        return torch.from_numpy(self.raw.dequantize(np.asarray(ids, dtype=np.int64))).to(self.device)

    @property
    def nbytes(self) -> int:
        return 0 if self.dense is not None else int(self.raw.data.nbytes)


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "wo", "ffn_norm", "w_gate_up", "w_down")

    def __init__(self, attn_norm, wqkv: Matrix, wo: Matrix, ffn_norm, w_gate_up: Matrix, w_down: Matrix):
        self.attn_norm, self.wqkv, self.wo = attn_norm, wqkv, wo
        self.ffn_norm, self.w_gate_up, self.w_down = ffn_norm, w_gate_up, w_down

    def matrices(self) -> dict[str, Matrix]:
        return {"attn_qkv": self.wqkv, "attn_output": self.wo, "ffn_gate_up": self.w_gate_up,
                "ffn_down": self.w_down}


@dataclass
class _Prefill:
    rows: slice                   # this chunk's rows in the flat batch
    start: int                    # position of its first token
    blocks: torch.Tensor | None   # block ids holding positions [0, start + n); None when start == 0 (fresh K/V)
    mask: torch.Tensor            # [1, 1, group * n, keys] bool, True = may attend


@dataclass
class _Plan:
    tokens: torch.Tensor          # [T] in internal order: all decode tokens first, then prompt chunks
    token_ids: list[int]          # the same, on the host
    rope: torch.Tensor            # [T, head_dim / 2] complex
    slots: torch.Tensor           # [T] pool row each token's K/V is written to
    n_decode: int
    decode_blocks: torch.Tensor | None   # [n_decode, nblocks] block tables, padded with block 0
    decode_keys: int                     # longest decoding sequence, in tokens
    decode_mask: torch.Tensor | None     # [n_decode, 1, 1, decode_keys], or None when all are that long
    decode_lengths: torch.Tensor | None  # [n_decode] int32 keys of each decoding sequence
    prefills: list[_Prefill]
    logit_rows: torch.Tensor      # rows (internal order) whose logits are returned, in the caller's order


class Llama:
    """Llama weights, held in their own bits (drivers/model/quant.py), plus the forward pass.

    Matrices take activations in `dtype`: bf16 whenever a matrix is quantised or half precision (the
    vectorised int4 kernel and AMX/AVX512-BF16 want it), fp32 for an all-F32 file. The residual stream,
    norms, rotary embedding and logits stay fp32. K/V live in a pool of `kv_dtype` (default: `dtype`).
    Every tensor a step makes is made on `device`; only token ids and block tables cross from the host.
    """

    def __init__(self, mf: ModelFile, max_positions: int | None = None, device: str | torch.device = "cpu",
                 kv_dtype: str | torch.dtype | None = None, progress: Progress | None = None, native=None,
                 blocks: bool | None = None):
        c = self.config = mf.config
        self.device = torch.device(device)
        self.group = c.n_heads // c.n_kv_heads
        if c.n_heads % c.n_kv_heads:
            raise ValueError(f"{c.n_heads} query heads cannot share {c.n_kv_heads} kv heads evenly")
        total, done = mf.matrix_bytes, 0

        def held(*names: str) -> Matrix:
            nonlocal done
            if progress:
                progress(done, total, f"holding {names[0]} ({mf.tensors[names[0]].type_name})")
            try:
                # a natively run tensor is the file's own blocks, mapped; the others are read and repacked
                m = quant.hold([mf.memmap(n) if native is not None and native.wants(mf.tensors[n]) else mf.read(n)
                                for n in names], self.device, native, blocks)
            except quant.BadTensor as e:
                raise CorruptModelError(f"{mf.path}: {e}") from None
            done += sum(mf.tensors[n].nbytes for n in names)
            return m

        def vector(name: str) -> torch.Tensor:
            nonlocal done
            done += mf.tensors[name].nbytes
            return torch.from_numpy(mf.read(name).dequantize()).reshape(-1).to(self.device)

        out_name = "token_embd.weight" if c.tied_embeddings else "output.weight"
        self.output = held(out_name)
        # the output's own blocks, mapped: the few rows whose logits `_refine` recomputes in fp32
        self.output_rows = mf.memmap(out_name) if self.output.layout != "fp32" else None
        if isinstance(self.output, quant.Native):   # already mapped: one mapping, its pages counted once
            self.output_rows = self.output.parts[0]
        self.refine = 0 if self.output.exact else REFINE_MAX
        # the compiled small ops (RMS norm, rotary + K/V write, decode attention over the pool, the
        # feed-forward gate) when native.c runs here
        self.ops = native.lib if native is not None and self.device.type == "cpu" else None
        dense = self.output.w if c.tied_embeddings and isinstance(self.output, quant.Dense) else None
        embed_rows = None
        if dense is None:                # one mapping when both read the same tensor: pages count once
            embed_rows = self.output_rows if c.tied_embeddings and self.output_rows else mf.memmap("token_embd.weight")
        self.embed = _Embedding(dense, embed_rows, self.device)
        if not c.tied_embeddings:
            done += mf.tensors["token_embd.weight"].nbytes
        self.norm = vector("output_norm.weight")
        self.layers = []
        for i in range(c.n_layers):
            # fused projections: one product instead of three (q, k, v) and two (gate, up) per layer
            attn_norm, qkv, wo, ffn_norm, gate_up, down = layer_tensors(i)
            self.layers.append(_Layer(vector(attn_norm), held(*qkv), held(wo), vector(ffn_norm), held(*gate_up),
                                      held(down)))
        layouts = {part for _, m in self.matrices() for part in m.layout.split("+")}
        # what most products take; each product casts its input to what its kernel wants
        self.dtype = torch.float32 if layouts <= {"fp32", "native"} else torch.bfloat16
        default_kv = torch.float32 if layouts == {"fp32"} else torch.bfloat16
        self.kv_dtype = KV_DTYPES[kv_dtype] if isinstance(kv_dtype, str) else (kv_dtype or default_kv)
        self.max_positions = max_positions or c.context_length
        inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim))
        if c.has_rope_freqs:
            inv_freq = inv_freq / torch.from_numpy(mf.read("rope_freqs.weight").dequantize()).reshape(-1).double()
        angles = torch.outer(torch.arange(self.max_positions, dtype=torch.float64) / c.rope_scale, inv_freq)
        self.rope_table = torch.polar(torch.ones_like(angles), angles).to(torch.complex64).to(self.device)
        if progress:
            progress(total, total, "loaded")

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, progress: Progress | None = None, native=None,
                  cache_dir: str | os.PathLike | None = None, **kwargs) -> "Llama":
        """native: None (torch's kernels only), "auto" | "always" | "never" (kernels.prefer_native, its
        measurements recorded in cache_dir), or a kernels.NativeChoice."""
        mf = load_gguf(path)
        if isinstance(native, str):
            from drivers.model import kernels
            native = kernels.prefer_native(mf, cache_dir, native) if torch.device(kwargs.get("device", "cpu")).type == "cpu" else None
        return cls(mf, progress=progress, native=native, **kwargs)

    def matrices(self) -> list[tuple[str, Matrix]]:
        """Every weight matrix, named as `models` shows them."""
        out = [("output", self.output)]
        for i, layer in enumerate(self.layers):
            out.extend((f"blk.{i}.{name}", m) for name, m in layer.matrices().items())
        return out

    def weight_bytes(self) -> int:
        """Memory the held matrices and their dense copies take (a mapped embedding is the file's)."""
        return sum(m.nbytes + (m.dense.nbytes if m.dense is not None else 0) for _, m in self.matrices())

    def describe(self, plan: dict) -> dict:
        """engine, compute_dtype, kv_dtype, native and weights, as `models` shows them (plan:
        kernels.choose's)."""
        from drivers.model import kernels
        engine = "torch" + (f" (not lean: {plan['lean']})" if plan.get("lean") else "")
        return {"engine": engine, "compute_dtype": str(self.dtype).removeprefix("torch."),
                "kv_dtype": str(self.kv_dtype).removeprefix("torch."), "native": kernels.native_status(self),
                "weights": kernels.table(self, plan)}

    @property
    def threads(self) -> int:
        return torch.get_num_threads()

    def new_kv_pool(self, num_blocks: int, block_size: int = 16) -> KVPool:
        return KVPool(self.config, num_blocks, block_size, self.device, self.kv_dtype)

    # ------------------------------------------------------------------------------------------ paged step

    @torch.inference_mode()
    def step(self, pool: KVPool, chunks: Sequence[Chunk], should_stop=None) -> torch.Tensor:
        """Run one step; write every fed token's K/V into the pool; return fp32 logits [rows, vocab].

        Rows follow the chunks' order: one per chunk with logits="last", len(tokens) for "all", none for
        "none". The K/V of positions before each chunk's start must already be in its blocks.
        should_stop, if given, is asked between layers; when it says yes the step ends with
        StepAborted, having written K/V only at the chunks' own positions (recomputed next time).
        """
        c = self.config
        plan = self._plan(pool, chunks)
        T = plan.tokens.numel()
        H, KVH, D, G = c.n_heads, c.n_kv_heads, c.head_dim, self.group
        q_dim, kv_dim = H * D, KVH * D
        kvt = pool.dtype
        rope = plan.rope.unsqueeze(1)
        ops, eps, scale = self.ops, c.rms_eps, D ** -0.5
        # the compiled small ops run on one thread: for a long prompt torch's threaded ones are faster
        small = ops if T <= NATIVE_SMALL_OPS_ROWS else None
        def norm(v: torch.Tensor, w: torch.Tensor, add: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
            """v += add (the residual step, in place), then v's RMS norm in the dtype its product takes."""
            if small is not None:
                return small.rms_norm(v, w, eps, add, dtype if dtype == torch.bfloat16 else torch.float32)
            if add is not None:
                v.add_(add)
            return F.rms_norm(v, (c.hidden,), w, eps)
        x = self.embed(plan.tokens, plan.token_ids)               # the residual stream: fp32
        only_decode = not plan.prefills            # then attention's output is the whole batch's, as is
        attn = None if only_decode else torch.empty((T, q_dim), dtype=kvt, device=x.device)
        delta = None                               # the last product, not yet added to the residual
        for i, layer in enumerate(self.layers):
            if should_stop is not None and should_stop():
                raise StepAborted(f"step aborted before layer {i}")
            h = norm(x, layer.attn_norm, delta, layer.wqkv.wants)
            qkv = layer.wqkv(h)
            if ops is not None and only_decode:      # rotate q and k, write k and v to the pool: one call
                q = ops.rope_store(qkv.contiguous(), H, KVH, plan.rope, pool.k[i], pool.v[i], plan.slots)
            else:
                qk = _rotate(qkv[:, :q_dim + kv_dim].float().view(T, H + KVH, D), rope)   # q and k heads, fp32
                k = qk[:, H:].to(kvt)
                q = qk[:, :H].to(kvt)
                v = qkv[:, q_dim + kv_dim:].reshape(T, KVH, D).to(kvt)
                pool.k[i].index_copy_(0, plan.slots, k)
                pool.v[i].index_copy_(0, plan.slots, v)
            if plan.n_decode and ops is not None:        # straight from the pool's blocks, in fp32
                out = ops.attend(q[:plan.n_decode].float().contiguous(), pool.data[i, 0], pool.data[i, 1],
                                 plan.decode_blocks, plan.decode_lengths, scale)
                if only_decode:
                    attn = out.view(plan.n_decode, q_dim)
                else:
                    attn[:plan.n_decode] = out.view(plan.n_decode, q_dim)
            elif plan.n_decode:
                nd, blocks = plan.n_decode, plan.decode_blocks.view(-1)
                keys = plan.decode_keys
                kv = pool.kv_blocks[i].index_select(1, blocks).view(2, nd, -1, KVH, D)[:, :, :keys].transpose(2, 3)
                ks, vs = kv[0], kv[1]
                # query heads h = kv * G + g share kv head `kv`: fold the G heads into the query-length axis
                out = F.scaled_dot_product_attention(q[:nd].reshape(nd, KVH, G, D), ks, vs,
                                                     attn_mask=plan.decode_mask)
                if only_decode:
                    attn = out.reshape(nd, q_dim)
                else:
                    attn[:nd] = out.reshape(nd, q_dim)
            for p in plan.prefills:
                n = p.rows.stop - p.rows.start
                if p.blocks is None:
                    ks, vs = k[p.rows], v[p.rows]
                else:
                    kv = pool.kv_blocks[i].index_select(1, p.blocks).view(2, -1, KVH, D)
                    ks, vs = kv[0], kv[1]
                qs = q[p.rows].reshape(n, KVH, G, D).permute(1, 2, 0, 3).reshape(1, KVH, G * n, D)
                out = F.scaled_dot_product_attention(qs, ks.transpose(0, 1).unsqueeze(0),
                                                     vs.transpose(0, 1).unsqueeze(0), attn_mask=p.mask)
                attn[p.rows] = out.view(KVH, G, n, D).permute(2, 0, 1, 3).reshape(n, q_dim)
            h = norm(x, layer.ffn_norm, layer.wo(attn), layer.w_gate_up.wants)
            if small is not None:
                delta = layer.w_down(small.silu_mul(layer.w_gate_up(h), layer.w_down.wants))
            else:
                gate, up = layer.w_gate_up(h).chunk(2, dim=-1)
                delta = layer.w_down(F.silu(gate) * up)
        x.add_(delta)
        if plan.logit_rows.numel() == 0:
            return torch.empty((0, c.vocab_size), device=self.device)
        h = norm(x[plan.logit_rows].contiguous(), self.norm, None, torch.float32)
        return self._refine(self.output(h).float(), h)

    def _refine(self, logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Recompute in fp32, from the file's own blocks, each row's logits within REFINE_MARGIN of its
        highest, or a row's REFINE_MAX highest where more are that close.

        A bf16 product rounds logits of ~20 to steps of 0.125: that was most of the KL divergence from
        fp32 and flipped greedy picks. The probability mass sits within a few nats of the top (e^-8 is
        3e-4), so exact values there buy fp32's choices for a few dozen row dots. A threshold rather
        than topk: topk over a 49k vocabulary costs 0.2 ms a row here, a max and a compare 0.02.
        """
        if self.output_rows is None or self.refine == 0:
            return logits
        near = logits >= logits.amax(-1, keepdim=True) - REFINE_MARGIN
        wide = (near.sum(-1) > self.refine).nonzero().squeeze(1)
        if wide.numel():                      # a flat row: its REFINE_MAX highest, found the slow way
            near[wide] = False
            near[wide.unsqueeze(1), logits[wide].topk(self.refine, dim=-1).indices] = True
        rows, cols = near.nonzero(as_tuple=True)
        ids, where = torch.unique(cols, return_inverse=True)
        w = torch.from_numpy(self.output_rows.dequantize(ids.cpu().numpy())).to(h.device)   # [u, hidden]
        logits[rows, cols] = (h[rows] * w[where]).sum(-1)
        return logits

    def _plan(self, pool: KVPool, chunks: Sequence[Chunk]) -> _Plan:
        """Check a step's chunks and turn them into the index tensors every layer reuses."""
        if pool.config != self.config:
            raise ValueError("this KV pool was made for a different model")
        if pool.data.device != self.device:
            raise ValueError(f"this KV pool is on {pool.data.device}, the model on {self.device}")
        bs, dev = pool.block_size, self.device
        lay = lay_out(chunks, self.config.vocab_size, self.max_positions, pool.num_blocks, bs)
        decode_blocks = decode_mask = decode_lengths = None
        decode_keys = 0
        if lay.n_decode:
            lengths = lay.decode_lengths
            decode_keys = max(lengths)
            nblocks = (decode_keys + bs - 1) // bs
            decode_blocks = torch.tensor([t + [0] * (nblocks - len(t)) for t in lay.decode_tables], device=dev)
            decode_lengths = torch.tensor(lengths, dtype=torch.int32, device=dev)
            if min(lengths) != decode_keys:     # a mask costs SDPA time; equal lengths need none
                keys = torch.arange(decode_keys, device=dev)
                decode_mask = (keys < torch.tensor(lengths, device=dev).unsqueeze(1)).view(len(lengths), 1, 1, -1)

        prefills = []
        for p in lay.prompts:
            blocks, keys = None, p.start + p.n
            if p.start > 0:
                blocks = torch.tensor(p.blocks, device=dev)
                keys = blocks.numel() * bs       # slots past the chunk's end are masked by causality
            causal = (torch.arange(keys, device=dev).unsqueeze(0)
                      <= (p.start + torch.arange(p.n, device=dev)).unsqueeze(1))
            prefills.append(_Prefill(slice(p.first, p.first + p.n), p.start, blocks,
                                     causal.repeat(self.group, 1).view(1, 1, self.group * p.n, keys)))
        return _Plan(tokens=torch.tensor(lay.tokens, device=dev), token_ids=lay.tokens,
                     rope=self.rope_table[torch.tensor(lay.positions, device=dev)],
                     slots=torch.tensor(lay.slots, device=dev), n_decode=lay.n_decode, decode_blocks=decode_blocks,
                     decode_keys=decode_keys, decode_mask=decode_mask, decode_lengths=decode_lengths,
                     prefills=prefills,
                     logit_rows=torch.tensor(lay.logit_rows, dtype=torch.long, device=dev))


def _rotate(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [T, heads, D] by rope [T, 1, D/2] (unit complex numbers)."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * rope).flatten(-2)
