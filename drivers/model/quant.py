"""Weight matrices as held in memory, and the product kernel each runs: built from drivers/model/types.py.

The forward pass never switches on a type by name; it calls a `Matrix`, which is whatever `hold`
built from the type's row: `Int4Pack` (torch's `_weight_int4pack_mm_for_cpu`, whose bf16 path is the
vectorised one: one plane for 4-bit types, two for 5- and 8-bit), `Native` (the file's own Q4_0, Q4_1 or Q8_0 blocks, mapped,
multiplied by llmos's compiled kernel with fp32 activations: drivers/model/native.py, where measured
faster), `Dense` (bf16, fp16 or fp32), or `Stacked` when the parts of a fused product are held differently (a Q4_K_M file's q and k in Q4_K,
v in Q6_K). A matrix may also carry a bf16 dense copy for batched steps (`dense`), which
drivers/model/kernels.py makes only when it measured one faster and it fits the budget.

Never: keep an fp32 copy of a quantised matrix, or read files.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .types import GROUP, TYPES, Q, RawTensor, int4_planes   # noqa: F401 (TYPES: re-exported)


# ---------------------------------------------------------------------------------------------- matrices

class BadTensor(ValueError):
    """A tensor whose blocks cannot be weights (a scale that is NaN or infinite): a corrupt file."""


class Matrix:
    """One weight matrix [out, in] as held; called on x [rows, in] -> [rows, out].

    Each product takes the activations in the dtype its kernel wants (bf16 for int4pack and bf16
    weights, fp32 for native and fp32 ones) and casts what it is given; results come in that dtype.
    `exact` products compute in fp32 from the file's values. `dense`, when set, is a bf16 copy used
    for steps of at least `dense_rows` rows.
    """
    layout = ""
    exact = False
    wants = torch.bfloat16         # the activations' dtype its kernel takes (what a caller may hand it)
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
            return F.linear(x.to(torch.bfloat16), self.dense)
        return self.product(x)


CHUNK_ROWS = 2048          # rows unpacked at a time while packing


class Int4Pack(Matrix):
    """torch's CPU int4 layout, one bf16 scale and zero per 32 weights; 5- and 8-bit types use two
    planes stacked along the output dimension, whose products add up to the weight's."""
    layout = "int4pack"
    __slots__ = ("packed", "scales_zeros", "planes")

    def __init__(self, shape, types, parts: Sequence[RawTensor]):
        """Pack `parts` (stacked along the output dimension) plane-major: every part's high plane,
        then every part's low plane, so each plane's product is one contiguous slice of the output."""
        super().__init__(shape, types)
        rows, inp = shape
        self.planes = parts[0].row.planes
        self.packed = torch.empty((self.planes * rows, inp // 2), dtype=torch.uint8)
        sz = np.empty((inp // GROUP, self.planes * rows, 2), dtype=np.float32)
        # torch packs 64 rows at a time, so packing 64-row-aligned pieces in place gives the bytes of
        # packing the whole at once, while the unpacked values exist for one piece at a time (the
        # peak while loading is the held model plus a few MB); other row counts are packed whole
        aligned = all(t.shape[0] % 64 == 0 for t in parts)
        whole = None if aligned else np.empty((self.planes * rows, inp), dtype=np.uint8)
        at = 0
        for t in parts:
            blocks = t.blocks()
            for r in range(0, t.shape[0], CHUNK_ROWS):
                u, scale, offset = t.row.unpack(blocks[r:r + CHUNK_ROWS])
                _check_finite(t, r, scale, offset)
                for k, (q, s, z) in enumerate(int4_planes(u, t.row.bits, scale, offset)):
                    dest = slice(k * rows + at + r, k * rows + at + r + len(q))
                    sz[:, dest, 0], sz[:, dest, 1] = s.T, z.T
                    if aligned:
                        self.packed[dest] = _pack(q)
                    else:
                        whole[dest] = q
            at += t.shape[0]
        if whole is not None:
            self.packed = _pack(whole)
        self.scales_zeros = torch.from_numpy(sz).to(torch.bfloat16)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def product(self, x):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_zeros)
        if self.planes == 1:
            return y
        hi, lo = y.chunk(2, dim=-1)
        return hi + lo

    def to_dense(self):
        eye = torch.eye(self.shape[1], dtype=torch.bfloat16)
        return torch.cat([self.product(eye[i:i + 512]) for i in range(0, self.shape[1], 512)]).t().contiguous()


class Native(Matrix):
    """The file's own blocks (mapped), multiplied by native.c: fp32 in, fp32 out, exact weights."""
    layout = "native"
    exact = True
    wants = torch.float32
    __slots__ = ("parts", "lib", "args")

    def __init__(self, shape, types, parts: Sequence[RawTensor], lib):
        super().__init__(shape, types)
        for t in parts:
            _check_scales(t)
        self.parts, self.lib = list(parts), lib
        self.args = lib.prepare(self.parts)

    @property
    def nbytes(self):
        return sum(int(t.data.nbytes) for t in self.parts)

    def product(self, x):
        x = x.to(torch.float32).contiguous()
        return self.lib.gemm(self.args, x, torch.empty((x.shape[0], self.shape[0]), dtype=torch.float32))

    def to_dense(self):
        return torch.cat([torch.from_numpy(t.dequantize()).to(torch.bfloat16) for t in self.parts])


class Blocks(Matrix):
    """Off the CPU: each weight's unsigned value u (two to a byte for 4-bit types, one for 5- to 8-bit)
    with a scale and offset per group of the type's (32, or Q6_K's 16), in fp16, on the device; a
    product expands ROWS_AT_ONCE rows at a time to bf16 and multiplies them there (dequantise on the
    fly). The same torch code runs on any device, so the CPU tests it."""
    layout = "blocks"
    __slots__ = ("u", "scale", "offset", "packed", "group")

    ROWS_AT_ONCE = 4096

    def __init__(self, shape, types, parts: Sequence[RawTensor], device: torch.device):
        super().__init__(shape, types)
        row = parts[0].row
        self.group, self.packed = row.group, row.bits <= 4
        us, scales, offsets = [], [], []
        for t in parts:
            blocks = t.blocks()
            for r in range(0, t.shape[0], CHUNK_ROWS):
                u, scale, offset = t.row.unpack(blocks[r:r + CHUNK_ROWS])
                _check_finite(t, r, scale, offset)
                if self.packed:
                    u = u[:, 0::2] | (u[:, 1::2] << 4)
                scale, offset = scale.astype(np.float16), offset.astype(np.float16)
                if not (np.isfinite(scale).all() and np.isfinite(offset).all()):
                    raise BadTensor(f"tensor {t.name} (offset {t.offset}): a scale from row {r} on overflows fp16")
                us.append(torch.from_numpy(np.ascontiguousarray(u)).to(device))
                scales.append(torch.from_numpy(scale).to(device))
                offsets.append(torch.from_numpy(offset).to(device))
        self.u, self.scale, self.offset = torch.cat(us), torch.cat(scales), torch.cat(offsets)

    @property
    def nbytes(self):
        return self.u.nbytes + self.scale.nbytes + self.offset.nbytes

    def _rows(self, a: int, b: int) -> torch.Tensor:
        """Rows a..b as bf16 [b - a, in]."""
        u = self.u[a:b]
        if self.packed:
            u = torch.stack((u & 0x0F, u >> 4), dim=-1).view(b - a, -1)
        # in fp32: u * scale and offset nearly cancel for Q8_0's u = q + 128, which fp16 could not hold
        w = torch.addcmul(self.offset[a:b, :, None].float(), u.view(b - a, -1, self.group).float(),
                          self.scale[a:b, :, None].float())
        return w.view(b - a, -1).to(torch.bfloat16)

    def product(self, x):
        x = x.to(torch.bfloat16)
        if self.shape[0] <= self.ROWS_AT_ONCE:
            return F.linear(x, self._rows(0, self.shape[0]))
        return torch.cat([F.linear(x, self._rows(a, min(a + self.ROWS_AT_ONCE, self.shape[0])))
                          for a in range(0, self.shape[0], self.ROWS_AT_ONCE)], dim=-1)

    def to_dense(self):
        return torch.cat([self._rows(a, min(a + self.ROWS_AT_ONCE, self.shape[0]))
                          for a in range(0, self.shape[0], self.ROWS_AT_ONCE)])


class Dense(Matrix):
    __slots__ = ("w",)

    def __init__(self, shape, types, w: torch.Tensor):
        super().__init__(shape, types)
        self.w = w

    @property
    def exact(self):
        return self.w.dtype == torch.float32

    @property
    def wants(self):
        return torch.float32 if self.w.dtype != torch.bfloat16 else torch.bfloat16

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
    def wants(self):
        return torch.float32 if any(p.wants == torch.float32 for p in self.parts) else torch.bfloat16

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


def layout_for(t: RawTensor, device: torch.device, native=None, blocks: bool | None = None) -> str:
    """The layout this tensor gets on this device: native where `native` (kernels.NativeChoice) says it
    measured faster, else the table's, unless its kernel cannot run it here. Off the CPU (or with
    `blocks`) a quantised type with an unpacker is held as Blocks, in its own width."""
    if native is not None and device.type == "cpu" and native.wants(t) and int(t.ggml_type) in native.lib.types:
        return "native"
    if (device.type != "cpu" if blocks is None else blocks) and t.row.unpack is not None \
            and t.shape[1] % t.row.block == 0:
        return "blocks"
    layout = t.row.layout
    if layout == "int4pack" and (device.type != "cpu" or t.shape[1] % GROUP or t.shape[0] % 16):
        return "bf16"
    return layout


def _pack(q: np.ndarray) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)


def _check_finite(t: RawTensor, first_row: int, scale: np.ndarray, offset: np.ndarray) -> None:
    finite = np.isfinite(scale) & np.isfinite(offset)
    if not finite.all():
        bad = first_row + int(np.argwhere(~finite)[0][0])
        raise BadTensor(f"tensor {t.name} (offset {t.offset}): row {bad} has a scale that is not a finite number")


def _check_scales(t: RawTensor) -> None:
    """A natively run tensor's fp16 block scales (and Q4_1's mins) must be finite numbers."""
    blocks = t.blocks()
    fields = 2 if t.row.name == "Q4_1" else 1
    scales = np.ascontiguousarray(blocks[..., :2 * fields]).view(np.float16)
    finite = np.isfinite(scales).reshape(scales.shape[0], -1).all(-1)
    if not finite.all():
        bad = int(np.argwhere(~finite)[0][0])
        raise BadTensor(f"tensor {t.name} (offset {t.offset}): row {bad} has a scale that is not a finite number")


def hold(parts: Sequence[RawTensor], device: torch.device, native=None, blocks: bool | None = None) -> Matrix:
    """One matrix made of `parts` stacked along the output dimension, each in its best layout here;
    `native` (kernels.NativeChoice or None) says which run on the compiled kernel, `blocks` whether
    quantised types are held as Blocks (default: off the CPU)."""
    layouts = [layout_for(t, device, native, blocks) for t in parts]
    planes = {t.row.planes for t in parts}
    widths = {(t.row.bits <= 4, t.row.group) for t in parts}
    if len(set(layouts)) > 1 or (layouts[0] == "int4pack" and len(planes) > 1) or \
            (layouts[0] == "blocks" and len(widths) > 1):
        return Stacked([hold([t], device, native, blocks) for t in parts])
    layout, inp = layouts[0], parts[0].shape[1]
    shape = (sum(t.shape[0] for t in parts), inp)
    types = tuple(t.row.name for t in parts)
    if layout == "native":
        return Native(shape, types, parts, native.lib)
    if layout == "blocks":
        return Blocks(shape, types, parts, device)
    if layout == "int4pack":
        return Int4Pack(shape, types, parts)
    dense = [_dense_of(t, device) for t in parts]
    if layout == "bf16":
        dense = [w.to(torch.bfloat16) for w in dense]
    return Dense(shape, types, dense[0] if len(dense) == 1 else torch.cat(dense))

