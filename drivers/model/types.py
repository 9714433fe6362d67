"""The GGUF tensor types llmos runs: one table, and how each type's blocks unpack. numpy only.

Like ggml's type_traits, `TYPES` has one row per GGUF tensor type: its block geometry, the layout a
matrix of that type is held in (drivers/model/quant.py builds it), and an unpacker for the types
held as int4 planes. torch is not imported here, so the tokenizer service can say how a model's
weights would be held (`describe`) without loading it.

Layouts:
- "int4pack": Q4_0, Q4_1 and Q4_K repacked, bit for bit, into torch's CPU int4 layout with one bf16
  scale and zero per 32 weights. The GGUF block maps exactly: w = (q - 8) * scale + zero, so Q4_0 has
  zero 0, Q4_1 zero m + 8d, and each 32-weight sub-block of Q4_K scale d*sc and zero 8*d*sc - dmin*m.
  The 5- and 8-bit types (Q5_0, Q5_1, Q5_K, Q8_0) are two such planes whose products add up.
- "bf16" / "fp16" / "fp32": dense. F32, F16 and BF16 matrices keep their own bits; a quantised type
  with no kernel here (Q6_K's 16-weight scales do not fit int4pack's groups of 32) is held in bf16,
  never in fp32.

Never: import torch, or read files (the loader hands in raw block bytes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

import gguf as gguflib

Q = gguflib.GGMLQuantizationType
GROUP = 32                      # int4pack's group size: one scale and zero per 32 weights


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


def unpack_q6_k(b):            # 210 bytes per 256: 128 low-nibble bytes, 64 bytes of high 2 bits, 16 int8 scales, d
    rows, nb = b.shape[:2]
    ql = b[..., :128].reshape(rows, nb, 2, 64)                       # two halves of 128 weights
    qh = b[..., 128:192].reshape(rows, nb, 2, 32)
    lo_a, lo_b = ql[..., :32], ql[..., 32:]
    u = np.stack([(lo_a & 0x0F) | ((qh & 3) << 4), (lo_b & 0x0F) | (((qh >> 2) & 3) << 4),
                  (lo_a >> 4) | (((qh >> 4) & 3) << 4), (lo_b >> 4) | (((qh >> 6) & 3) << 4)], axis=3)
    scale = (_f16(b, 208)[..., None] * b[..., 192:208].view(np.int8).astype(np.float32)).reshape(rows, -1)
    return u.reshape(rows, -1), scale, -32 * scale                   # per 16 weights: weight d*sc*(u - 32)


# ---------------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class TensorType:
    """One GGUF tensor type: elements and bytes per block, the layout it is held in, its unpacker."""
    name: str
    block: int
    nbytes: int
    layout: str                                   # "int4pack", "bf16", "fp16" or "fp32"
    unpack: Callable | None = None                # -> (u, scale, offset) per `group` weights
    bits: int = 0                                 # width of u: 4 is one int4 plane, 5 or 8 two
    group: int = GROUP                            # weights per scale and offset

    @property
    def planes(self) -> int:
        return 1 if self.bits <= 4 else 2


def _row(t: Q, layout: str, unpack=None, bits: int = 0, group: int = GROUP) -> TensorType:
    block, nbytes = gguflib.GGML_QUANT_SIZES[t]
    return TensorType(t.name, block, nbytes, layout, unpack, bits, group)


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
    Q.Q6_K: _row(Q.Q6_K, "bf16", unpack_q6_k, 6, 16),    # 16-weight scales: int4pack's groups are 32
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
            return (u.reshape(data.shape[0], -1, self.row.group) * scale[..., None] + offset[..., None]).reshape(
                data.shape[0], -1).astype(np.float32)
        values = gguflib.quants.dequantize(data, Q(self.ggml_type))
        return np.asarray(values, dtype=np.float32).reshape(data.shape[0], self.shape[-1])
