"""llmos's compiled products (native.c): built once per machine, loaded with ctypes, checked, or not used.

`library()` compiles native.c with the machine's C compiler (`$CC`, else `cc`, `gcc`) at
`-O3 -march=native` into a per-machine cache (`$LLMOS_NATIVE_DIR`, else `$XDG_CACHE_HOME/llmos/native`,
else `~/.cache/llmos/native`), named by a hash of the source, the compiler and this CPU, so a second
load costs a `dlopen`. Before the library is used its products are compared with numpy's on random
blocks of every type it runs; a build that fails, a missing compiler, or a wrong answer leave
`library()` returning None with the reason in `why_not()`, and llmos runs torch's kernels instead.
Whether a matrix then runs here or on torch's int4 kernel is measured, not assumed
(drivers/model/kernels.py `prefer_native`).

Never: run a product on unchecked code, or fail a model load because the compiler did.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch          # first: native.c's libgomp.so.1 must resolve to the one torch loaded

from .types import RawTensor, Q

SOURCE = Path(__file__).with_name("native.c")
ABI = 2
TYPES = frozenset({int(Q.Q4_0), int(Q.Q4_1), int(Q.Q8_0)})   # the block types native.c multiplies
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
OPENMP = "-fopenmp"          # tried first; without it the products run on one thread
MAX_PARTS = 8

_lock = threading.Lock()
_state: dict = {}


class Library:
    """The loaded, checked library: `prepare` a matrix's parts once, then `gemm` per product."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.lib, self.path = lib, path
        self.threads = lib.llmos_threads()
        self.simd = lib.llmos_simd()
        self.types = TYPES

    def prepare(self, parts: list[RawTensor]) -> tuple:
        """The ctypes argument arrays for a product over `parts` stacked along the output dimension."""
        if not 1 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"a native product takes 1..{MAX_PARTS} parts, not {len(parts)}")
        n = len(parts)
        types = (ctypes.c_int * n)(*(int(t.ggml_type) for t in parts))
        ptrs = (ctypes.c_void_p * n)(*(t.data.ctypes.data for t in parts))
        rows = (ctypes.c_int * n)(*(t.shape[0] for t in parts))
        return n, types, ptrs, rows, parts[0].shape[1]

    def gemm(self, prepared: tuple, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out [R, N] fp32 = x [R, K] fp32 (contiguous, on the CPU) times the prepared matrix, transposed."""
        n, types, ptrs, rows, k = prepared
        if self.lib.llmos_gemm(n, types, ptrs, rows, k, x.data_ptr(), x.shape[0], out.data_ptr(), out.shape[1]):
            raise ValueError(f"native product refused its arguments (K {k}, rows {x.shape[0]})")
        return out


    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float, add: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """torch's rms_norm over the last dimension of fp32 x [R, K] with fp32 weights w [K], in one call,
        out in dtype (fp32 or bf16). With `add` (fp32 or bf16, x's shape), x += add first, in place:
        a residual step and the norm after it."""
        out = torch.empty(x.shape, dtype=dtype)
        rc = self.lib.llmos_rms_norm(x.data_ptr(), add.data_ptr() if add is not None else None,
                                     KV_KINDS[add.dtype] if add is not None else 0, w.data_ptr(), x.shape[0],
                                     x.shape[1], eps, out.data_ptr(), KV_KINDS[dtype])
        if rc:
            raise ValueError("native rms_norm refused its arguments")
        return out

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: torch.Tensor,
               lengths: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode attention: q [nd, H, D] fp32 over one layer's paged k, v [blocks, block_size, KVH, D]
        (fp32, bf16 or fp16), tables [nd, max_blocks] int64, lengths [nd] int32 -> [nd, H, D] fp32."""
        nd, heads, dim = q.shape
        out = torch.empty_like(q)
        rc = self.lib.llmos_attend(q.data_ptr(), nd, heads, k.shape[2], dim, k.data_ptr(), v.data_ptr(),
                                   KV_KINDS[k.dtype], k.shape[1], tables.data_ptr(), tables.shape[1],
                                   lengths.data_ptr(), scale, out.data_ptr())
        if rc:
            raise ValueError(f"native attention refused its arguments ({'out of memory' if rc == -2 else 'shapes'})")
        return out


    def rope_store(self, qkv: torch.Tensor, heads: int, kv_heads: int, rope: torch.Tensor, k: torch.Tensor,
                   v: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rotate q and k of qkv [T, (heads + 2 kv_heads) * D] (fp32 or bf16, rows contiguous) by rope
        [T, D/2] (complex), write k and v to the pool rows `slots` of k, v [rows, kv_heads, D];
        returns q [T, heads, D] fp32."""
        t, dim = qkv.shape[0], k.shape[-1]
        q = torch.empty((t, heads, dim), dtype=torch.float32)
        cs = torch.view_as_real(rope)
        if self.lib.llmos_rope_store(qkv.data_ptr(), KV_KINDS[qkv.dtype], t, heads, kv_heads, dim, qkv.stride(0),
                                     cs.data_ptr(), k.data_ptr(), v.data_ptr(), KV_KINDS[k.dtype],
                                     slots.data_ptr(), q.data_ptr()):
            raise ValueError("native rope_store refused its arguments")
        return q

    def silu_mul(self, gate_up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """silu(gate) * up of gate_up [T, 2F] (fp32 or bf16) -> [T, F] in dtype (fp32 or bf16)."""
        t, width = gate_up.shape
        out = torch.empty((t, width // 2), dtype=dtype)
        if self.lib.llmos_silu_mul(gate_up.data_ptr(), KV_KINDS[gate_up.dtype], t, width // 2, out.data_ptr(),
                                   KV_KINDS[dtype]):
            raise ValueError("native silu_mul refused its arguments")
        return out


KV_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cache_dir() -> Path:
    if os.environ.get("LLMOS_NATIVE_DIR"):
        return Path(os.environ["LLMOS_NATIVE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmos" / "native"


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines()[:40] if line.startswith(("model name", "flags"))]
    return "\n".join(keep[:2]) or os.uname().machine


def _build(cc: str) -> Path:
    """Compile native.c (or find it compiled) for this source, compiler and CPU; returns the .so."""
    source = SOURCE.read_bytes()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(FLAGS).encode(),
                                     _cpu_id().encode()])).hexdigest()[:16]
    where = cache_dir()
    target = where / f"llmos-native-{key}.so"
    if target.exists():
        return target
    where.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=where)
    os.close(fd)
    try:
        for flags in ((*FLAGS, OPENMP), FLAGS):
            done = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(f"{cc} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)          # atomic: two drivers building at once both end with one good file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _self_test(lib: Library) -> None:
    """Every type against numpy on random blocks, 1 and 5 rows; raises when any product is wrong."""
    rng = np.random.default_rng(0)
    for ggml_type in sorted(TYPES):
        t = random_tensor(ggml_type, 40, 96, rng)
        w = t.dequantize().astype(np.float64)
        for rows in (1, 5):
            x = torch.from_numpy(rng.standard_normal((rows, 96)).astype(np.float32))
            got = lib.gemm(lib.prepare([t]), x, torch.empty((rows, 40))).numpy()
            want = x.numpy().astype(np.float64) @ w.T
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            if not err < 1e-5:
                raise RuntimeError(f"self-test: {Q(ggml_type).name} at {rows} rows is off by {err:.2e}")
    x, w, y = torch.randn(3, 80), torch.randn(80), torch.randn(3, 80)
    want = torch.nn.functional.rms_norm(x + y, (80,), w, 1e-5)
    ok = torch.allclose(lib.rms_norm(x.clone(), w, 1e-5), torch.nn.functional.rms_norm(x, (80,), w, 1e-5), atol=1e-5)
    ok &= torch.allclose(lib.rms_norm(x.clone(), w, 1e-5, add=y), want, atol=1e-5)
    ok &= torch.equal(lib.rms_norm(x.clone(), w, 1e-5, add=y, dtype=torch.bfloat16),
                      lib.rms_norm(x.clone(), w, 1e-5, add=y).to(torch.bfloat16))
    if not ok:
        raise RuntimeError("self-test: rms_norm differs from torch's")
    for dtype in KV_KINDS:
        blocks, bs, kvh, heads, dim = 6, 4, 2, 6, 16
        k, v = torch.randn(blocks, bs, kvh, dim).to(dtype), torch.randn(blocks, bs, kvh, dim).to(dtype)
        tables = torch.tensor([[5, 0, 3], [2, 4, 1]])
        lengths = torch.tensor([9, 3], dtype=torch.int32)
        q = torch.randn(2, heads, dim)
        got = lib.attend(q, k, v, tables, lengths, 0.25)
        for n in range(2):
            keys = k[tables[n]].reshape(-1, kvh, dim)[:lengths[n]].float().repeat_interleave(heads // kvh, 1)
            vals = v[tables[n]].reshape(-1, kvh, dim)[:lengths[n]].float().repeat_interleave(heads // kvh, 1)
            p = torch.softmax(torch.einsum("hd,phd->hp", q[n], keys) * 0.25, -1)
            if not torch.allclose(got[n], torch.einsum("hp,phd->hd", p, vals), atol=1e-5):
                raise RuntimeError(f"self-test: attention over a {dtype} pool differs from the reference")
    for dtype in (torch.float32, torch.bfloat16):
        gu = torch.randn(3, 40).to(dtype)
        want = torch.nn.functional.silu(gu[:, :20].float()) * gu[:, 20:].float()
        for out in (torch.float32, torch.bfloat16):
            if not torch.allclose(lib.silu_mul(gu, out).float(), want.to(out).float(), atol=1e-2 if out != torch.float32 else 1e-5):
                raise RuntimeError("self-test: silu_mul differs from torch's")
    _test_rope_store(lib)


def _test_rope_store(lib: Library) -> None:
    heads, kvh, dim, t = 4, 2, 8, 3
    angles = torch.rand(t, dim // 2, dtype=torch.float64) * 6
    rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    for dtype in KV_KINDS:
        qkv = torch.randn(t, (heads + 2 * kvh) * dim)
        k, v = torch.zeros(10, kvh, dim, dtype=dtype), torch.zeros(10, kvh, dim, dtype=dtype)
        slots = torch.tensor([7, 2, 5])
        q = lib.rope_store(qkv, heads, kvh, rope, k, v, slots)
        x = torch.view_as_complex(qkv[:, :(heads + kvh) * dim].reshape(t, heads + kvh, dim // 2, 2).contiguous())
        turned = torch.view_as_real(x * rope.unsqueeze(1)).reshape(t, heads + kvh, dim)
        ok = torch.allclose(q, turned[:, :heads], atol=1e-5)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        ok &= torch.allclose(k[slots].float(), turned[:, heads:], atol=tol, rtol=tol) and not k[[0, 1, 3]].any()
        ok &= torch.equal(v[slots], qkv[:, (heads + kvh) * dim:].reshape(t, kvh, dim).to(dtype))
        if not ok:
            raise RuntimeError(f"self-test: rope_store into a {dtype} pool differs from torch's")


def random_tensor(ggml_type: int, rows: int, cols: int, rng: np.random.Generator, name: str = "random") -> RawTensor:
    """Blocks of a native type with random quants and small finite scales (tests and self-tests)."""
    from .types import TYPES as TABLE
    row = TABLE[int(ggml_type)]
    nblocks = rows * cols // row.block
    raw = rng.integers(0, 256, (nblocks, row.nbytes), dtype=np.uint8)
    scales = (rng.random((nblocks, 2)) * 0.02 + 0.001).astype(np.float16)
    scales[:, 1] *= -1
    fields = 2 if int(ggml_type) == int(Q.Q4_1) else 1
    raw[:, :2 * fields] = scales[:, :fields].view(np.uint8).reshape(nblocks, -1)
    return RawTensor(name, int(ggml_type), (rows, cols), raw.reshape(-1))


def library() -> Library | None:
    """The checked library, built on first use in this process; None when it cannot run here."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["why"] = None, ""
            try:
                _state["lib"] = _load()
            except Exception as e:          # any failure here means "use torch's kernels", never a failed load
                _state["why"] = f"{type(e).__name__}: {e}"
        return _state["lib"]


def why_not() -> str:
    """Why library() returned None ("" when it did not, or was not asked)."""
    return _state.get("why", "")


def _load() -> Library:
    if os.environ.get("LLMOS_NATIVE", "").lower() in ("0", "off", "never", "no"):
        raise RuntimeError("turned off by LLMOS_NATIVE")
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler ($CC, cc or gcc) on PATH")
    path = _build(cc)
    cdll = ctypes.CDLL(str(path))
    if cdll.llmos_abi() != ABI:
        raise RuntimeError(f"{path} speaks ABI {cdll.llmos_abi()}, this llmos {ABI}")
    cdll.llmos_gemm.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
    cdll.llmos_gemm.restype = ctypes.c_int
    cdll.llmos_rms_norm.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    cdll.llmos_rms_norm.restype = ctypes.c_int
    cdll.llmos_attend.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.c_int, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p]
    cdll.llmos_attend.restype = ctypes.c_int
    cdll.llmos_rope_store.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                      ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                      ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    cdll.llmos_rope_store.restype = ctypes.c_int
    cdll.llmos_silu_mul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_int]
    cdll.llmos_silu_mul.restype = ctypes.c_int
    lib = Library(cdll, path)
    _self_test(lib)
    return lib
