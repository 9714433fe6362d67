"""How each GGUF tensor type is held in memory, and which product kernel runs on it: one table.

Like ggml's type_traits, `TYPES` has one row per GGUF tensor type: its block geometry, the layout a
matrix of that type is held in, and how its blocks unpack. The forward pass never switches on a type
by name; it calls a `Matrix`, which is whatever `hold` built from the row.

Layouts (what a matrix is held as, and the product that runs on it):
- "int4pack": Q4_0, Q4_1 and Q4_K repacked, bit for bit, into torch's CPU int4 layout with one bf16
  scale and zero per 32 weights (`_weight_int4pack_mm_for_cpu`; its bf16 path is the vectorised one).
  The GGUF block maps exactly: w = (q - 8) * scale + zero, so Q4_0 has zero 0, Q4_1 zero m + 8d, and
  each 32-weight sub-block of Q4_K scale d*sc and zero 8*d*sc - dmin*m.
- "ggml": the file's own blocks, multiplied by the compiled kernel in drivers/model/kernels
  (Q8_0 and the 5- and 6-bit types), where a C compiler built it on this machine.
- "bf16" / "fp16" / "fp32": dense. F32, F16 and BF16 matrices keep their own bits; a quantised type
  with no kernel on this machine is held in bf16, never in fp32.
A matrix may also carry a bf16 dense copy for batched steps (`dense`), which the driver makes only
when it measured one faster and it fits `[driver] dense_copy_budget`.

Never: read files (the loader hands in raw block bytes), or keep an fp32 copy of a quantised matrix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import gguf as gguflib

Q = gguflib.GGMLQuantizationType
GROUP = 32                      # int4pack's group size: one scale and zero per 32 weights
COMPUTE = torch.bfloat16        # activations fed to the products on the CPU


# ---------------------------------------------------------------------------------------------- unpacking
# Each unpacker turns blocks [rows, blocks per row, bytes] into (u, scale, offset): unsigned integer
# values u [rows, in] and, per 32 weights, scale and offset [rows, in / 32], with weight = u*scale + offset.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 field at byte `at` of every block [..., bytes] as float32 [...]."""
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """16 bytes per block -> 32 values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """4 bytes per block -> 32 bits, element j is bit j of the little-endian word."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes -> eight 6-bit scales and eight 6-bit mins, each [..., 8]."""
    lo_sc, lo_m, hi = s[..., 0:4] & 63, s[..., 4:8] & 63, s[..., 8:12]
    hi_sc = (hi & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    hi_m = (hi >> 4) | ((s[..., 4:8] >> 6) << 4)
    return (np.concatenate([lo_sc, hi_sc], axis=-1).astype(np.float32),
            np.concatenate([lo_m, hi_m], axis=-1).astype(np.float32))


def unpack_q4_0(b):            # 18 bytes: d, 16 nibble bytes; weight d * (q - 8)
    d = _f16(b, 0)
    return _nibbles32(b[..., 2:]).reshape(b.shape[0], -1), d, -8 * d


def unpack_q4_1(b):            # 20 bytes: d, m, 16 nibble bytes; weight d*q + m
    return _nibbles32(b[..., 4:]).reshape(b.shape[0], -1), _f16(b, 0), _f16(b, 2)


def unpack_q5_0(b):            # 22 bytes: d, 4 bytes of fifth bits, 16 nibble bytes; weight d * (q - 16)
    d = _f16(b, 0)
    u = _nibbles32(b[..., 6:]) | (_bits32(b[..., 2:6]) << 4)
    return u.reshape(b.shape[0], -1), d, -16 * d


def unpack_q5_1(b):            # 24 bytes: d, m, fifth bits, nibbles; weight d*q + m
    u = _nibbles32(b[..., 8:]) | (_bits32(b[..., 4:8]) << 4)
    return u.reshape(b.shape[0], -1), _f16(b, 0), _f16(b, 2)


def unpack_q8_0(b):            # 34 bytes: d, 32 int8; weight d*q, stored here as u = q + 128
    d = _f16(b, 0)
    u = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return u.reshape(b.shape[0], -1), d, -128 * d


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per 32 weights of a Q4_K/Q5_K super-block: scale d*sc and offset -dmin*m, [rows, nb * 8]."""
    rows = b.shape[0]
    sc, mn = _k4_scales(b[..., 4:16])
    return ((_f16(b, 0)[..., None] * sc).reshape(rows, -1),
            (-_f16(b, 2)[..., None] * mn).reshape(rows, -1))


def unpack_q4_k(b):            # 144 bytes per 256: d, dmin, 12 scale bytes, 4 chunks of 32 bytes (lo, hi nibbles)
    rows, nb = b.shape[:2]
    qs = b[..., 16:].reshape(rows, nb, 4, 32)
    return (np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1), *_k_scales(b))


def unpack_q5_k(b):            # 176 bytes per 256: d, dmin, 12 scale bytes, 32 bytes of fifth bits, 128 nibble bytes
    rows, nb = b.shape[:2]
    qs = b[..., 48:].reshape(rows, nb, 4, 32)
    lo = np.stack([qs & 0x0F, qs >> 4], axis=3)                     # [rows, nb, 4, 2, 32]
    bits = np.unpackbits(b[..., 16:48, None], axis=-1, bitorder="little")   # [rows, nb, 32 l, 8 bit]
    hi = bits.transpose(0, 1, 3, 2).reshape(rows, nb, 4, 2, 32)     # bit 2c + h of byte l: sub-block (c, h)
    return ((lo | (hi << 4)).reshape(rows, -1), *_k_scales(b))


# ---------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class TensorType:
    """One GGUF tensor type: elements and bytes per block, the layout it is held in, its unpacker."""
    name: str
    block: int
    nbytes: int
    layout: str                                   # "int4pack", "bf16", "fp16" or "fp32"
    unpack: Callable | None = None                # -> (u, scale, offset) per 32 weights
    bits: int = 0                                 # width of u: 4 is one int4 plane, 5 or 8 two

    @property
    def planes(self) -> int:
        return 1 if self.bits <= 4 else 2


def _row(t: Q, layout: str, unpack=None, bits: int = 0) -> TensorType:
    block, nbytes = gguflib.GGML_QUANT_SIZES[t]
    return TensorType(t.name, block, nbytes, layout, unpack, bits)


TYPES: dict[int, TensorType] = {int(t): row for t, row in {
    Q.F32: _row(Q.F32, "fp32"),
    Q.F16: _row(Q.F16, "fp16"),
    Q.BF16: _row(Q.BF16, "bf16"),
    Q.Q4_0: _row(Q.Q4_0, "int4pack", unpack_q4_0, 4),
    Q.Q4_1: _row(Q.Q4_1, "int4pack", unpack_q4_1, 4),
    Q.Q4_K: _row(Q.Q4_K, "int4pack", unpack_q4_k, 4),
    Q.Q5_0: _row(Q.Q5_0, "int4pack", unpack_q5_0, 5),
    Q.Q5_1: _row(Q.Q5_1, "int4pack", unpack_q5_1, 5),
    Q.Q5_K: _row(Q.Q5_K, "int4pack", unpack_q5_k, 5),
    Q.Q8_0: _row(Q.Q8_0, "int4pack", unpack_q8_0, 8),
    Q.Q6_K: _row(Q.Q6_K, "bf16"),        # 16-weight scales: int4pack's groups are 32
    Q.Q2_K: _row(Q.Q2_K, "bf16"),
    Q.Q3_K: _row(Q.Q3_K, "bf16"),
}.items()}


def int4_planes(u: np.ndarray, bits: int, scale: np.ndarray, offset: np.ndarray) -> list[tuple]:
    """weight = u*scale + offset as int4pack planes [(q 0..15, scale, zero)], summing to the weight.

    One plane when u has 4 bits: (u - 8)*scale + (8*scale + offset). Two when it has 5 or 8: the high
    part (u >> 4, centred on 8 for 8 bits) with scale 16*scale and zero 0, and the low nibble with the
    rest, so both zeros are exact multiples of the block's scale.
    """
    if bits <= 4:
        return [(u, scale, 8 * scale + offset)]
    centre = 8 if bits == 8 else 0
    hi = (u >> 4) + np.uint8(8 - centre)
    return [(hi, 16 * scale, np.zeros_like(scale)), (u & 0x0F, scale, 8 * scale + offset + 16 * centre * scale)]


@dataclass
class RawTensor:
    """A tensor as the file stores it: its name, GGUF type, torch-order shape and its block bytes."""
    name: str
    ggml_type: int
    shape: tuple[int, ...]          # torch order: [out, in] for a matrix
    data: np.ndarray                # uint8, the tensor's bytes in the file
    offset: int = 0                 # where they start in the file, for error messages

    @property
    def row(self) -> TensorType:
        return TYPES[int(self.ggml_type)]

    def blocks(self) -> np.ndarray:
        """[rows, blocks per row, bytes per block]."""
        r = self.row
        return self.data.reshape(self.shape[0], self.shape[-1] // r.block, r.nbytes)

    def dequantize(self, rows: np.ndarray | None = None) -> np.ndarray:
        """float32 values [rows, in] (of `rows` only, when given; a vector is one row)."""
        n = self.shape[0] if len(self.shape) > 1 else 1
        data = self.data.reshape(n, -1)
        if rows is not None:
            data = data[rows]
        if self.row.unpack is not None and len(self.shape) > 1:     # ours: exact, and faster on few rows
            u, scale, offset = self.row.unpack(data.reshape(data.shape[0], -1, self.row.nbytes))
            return (u.reshape(data.shape[0], -1, GROUP) * scale[..., None] + offset[..., None]).reshape(
                data.shape[0], -1).astype(np.float32)
        values = gguflib.quants.dequantize(data, Q(self.ggml_type))
        return np.asarray(values, dtype=np.float32).reshape(data.shape[0], self.shape[-1])


# ---------------------------------------------------------------------------------------------- matrices

class BadTensor(ValueError):
    """A tensor whose blocks cannot be weights (a scale that is NaN or infinite): a corrupt file."""


class Matrix:
    """One weight matrix [out, in] as held; called on x [rows, in] (COMPUTE dtype) -> [rows, out].

    `dense`, when set, is a bf16 copy used for steps of at least `dense_rows` rows.
    """
    layout = ""
    __slots__ = ("shape", "types", "dense", "dense_rows")

    def __init__(self, shape: tuple[int, int], types: tuple[str, ...]):
        self.shape = shape
        self.types = types
        self.dense: torch.Tensor | None = None
        self.dense_rows = 0

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        """The matrix as bf16 [out, in] (for a dense copy, or a reference)."""
        raise NotImplementedError

    def product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] >= self.dense_rows:
            return F.linear(x, self.dense)
        return self.product(x)


class Int4Pack(Matrix):
    """torch's CPU int4 layout, one bf16 scale and zero per 32 weights; 5- and 8-bit types use two
    planes stacked along the output dimension, whose products add up to the weight's."""
    layout = "int4pack"
    __slots__ = ("packed", "scales_zeros", "planes")

    def __init__(self, shape, types, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, planes: int):
        """q uint8 [planes * out, in], scale and zero [planes * out, in / 32], plane-major."""
        super().__init__(shape, types)
        self.planes = planes
        # torch packs 64 rows at a time, so packing 2048-row pieces gives the same bytes as packing all
        # at once, while the int32 copy the kernel wants exists for one piece at a time
        self.packed = torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            torch.from_numpy(q[i:i + 2048].astype(np.int32)), 1) for i in range(0, q.shape[0], 2048)])
        sz = np.stack([scale.T, zero.T], axis=-1)                 # [in / 32, planes * out, 2]
        self.scales_zeros = torch.from_numpy(np.ascontiguousarray(sz, dtype=np.float32)).to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def product(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)
        if self.planes == 1:
            return y
        hi, lo = y.chunk(2, dim=-1)
        return hi + lo

    def to_dense(self):
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
        return torch.cat([self.product(eye[i:i + 512]) for i in range(0, self.shape[1], 512)]).t().contiguous()


class Dense(Matrix):
    __slots__ = ("w",)

    def __init__(self, shape, types, w: torch.Tensor):
        super().__init__(shape, types)
        self.w = w

    @property
    def layout(self):
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.w.dtype]

    @property
    def nbytes(self):
        return self.w.nbytes

    def product(self, x):
        if x.dtype == self.w.dtype:
            return F.linear(x, self.w)
        return F.linear(x.to(self.w.dtype), self.w).to(x.dtype)

    def to_dense(self):
        return self.w.to(torch.bfloat16)


class Stacked(Matrix):
    """Parts held in different layouts (a Q4_K_M file's q, k in Q4_K and v in Q6_K) run one by one."""
    __slots__ = ("parts",)

    def __init__(self, parts: Sequence[Matrix]):
        super().__init__((sum(p.shape[0] for p in parts), parts[0].shape[1]),
                         tuple(t for p in parts for t in p.types))
        self.parts = list(parts)

    @property
    def layout(self):
        return "+".join(p.layout for p in self.parts)

    @property
    def nbytes(self):
        return sum(p.nbytes for p in self.parts)

    def product(self, x):
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def to_dense(self):
        return torch.cat([p.to_dense() for p in self.parts])


def _dense_of(t: RawTensor, device: torch.device) -> torch.Tensor:
    layout = t.row.layout
    if layout == "fp32":
        w = torch.from_numpy(t.data.view(np.float32).reshape(t.shape).copy())
    elif layout == "fp16":
        w = torch.from_numpy(t.data.view(np.float16).reshape(t.shape).copy())
    elif layout == "bf16" and t.ggml_type == Q.BF16:
        w = torch.from_numpy(t.data.view(np.int16).reshape(t.shape).copy()).view(torch.bfloat16)
    else:                                   # a quantised type held dense: bf16, never fp32
        w = torch.empty(t.shape, dtype=torch.bfloat16)
        step = max(1, (1 << 22) // t.shape[1])      # a few MB of float32 at a time
        for i in range(0, t.shape[0], step):
            w[i:i + step] = torch.from_numpy(t.dequantize(np.arange(i, min(i + step, t.shape[0]))))
    if not bool(torch.isfinite(w).all()):
        raise BadTensor(f"tensor {t.name} (offset {t.offset}) holds values that are not finite numbers")
    return w.to(device)


def layout_for(t: RawTensor, device: torch.device) -> str:
    """The layout this tensor gets on this device: the table's, unless its kernel cannot run it here."""
    layout = t.row.layout
    if layout == "int4pack" and (device.type != "cpu" or t.shape[1] % GROUP or t.shape[0] % 16):
        return "bf16"
    return layout


def hold(parts: Sequence[RawTensor], device: torch.device) -> Matrix:
    """One matrix made of `parts` stacked along the output dimension, each in its best layout here."""
    layouts = [layout_for(t, device) for t in parts]
    planes = {t.row.planes for t in parts}
    if len(set(layouts)) > 1 or (layouts[0] == "int4pack" and len(planes) > 1):
        return Stacked([hold([t], device) for t in parts])
    layout, inp = layouts[0], parts[0].shape[1]
    shape = (sum(t.shape[0] for t in parts), inp)
    types = tuple(t.row.name for t in parts)
    if layout == "int4pack":
        per_part = []
        for t in parts:
            u, scale, offset = t.row.unpack(t.blocks())
            finite = np.isfinite(scale) & np.isfinite(offset)
            if not finite.all():
                bad = int(np.argwhere(~finite)[0][0])
                raise BadTensor(f"tensor {t.name} (offset {t.offset}): row {bad} has a scale that is not a"
                                " finite number")
            per_part.append(int4_planes(u, t.row.bits, scale, offset))
        n_planes = len(per_part[0])
        # plane-major: every part's high plane, then every part's low plane
        q, scale, zero = (np.concatenate([pp[k][i] for k in range(n_planes) for pp in per_part]) for i in range(3))
        return Int4Pack(shape, types, q, scale, zero, n_planes)
    dense = [_dense_of(t, device) for t in parts]
    if layout == "bf16":
        dense = [w.to(torch.bfloat16) for w in dense]
    return Dense(shape, types, dense[0] if len(dense) == 1 else torch.cat(dense))

