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

from .types import RawTensor, Q

SOURCE = Path(__file__).with_name("native.c")
ABI = 2
TYPES = frozenset({int(Q.Q4_0), int(Q.Q4_1), int(Q.Q8_0)})   # the block types offered to the torch engine
# every type llmos_gemm multiplies: F32 and F16 rows too, for the lean engine (drivers/model/lean.py);
# the torch engine holds those dense, where torch's own BLAS is the faster
PRODUCT_TYPES = TYPES | {int(Q.F32), int(Q.F16)}
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
OPENMP = "-fopenmp"          # tried first; without it the products run on one thread
MAX_PARTS = 8

_lock = threading.Lock()
_state: dict = {}

# native.c's element kinds, by the dtype of a numpy array or a torch tensor; bf16 lives in numpy as
# its bits, uint16
KINDS = {"float32": 0, "uint16": 1, "float16": 2, "torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2}


def _ptr(a) -> int:
    """The address of a numpy array's or a torch tensor's first element."""
    return a.ctypes.data if isinstance(a, np.ndarray) else a.data_ptr()


def _kind(a) -> int:
    try:
        return KINDS[str(a.dtype)]
    except KeyError:
        raise ValueError(f"native.c takes fp32, bf16 or fp16 arrays, not {a.dtype}") from None


class Library:
    """The loaded, checked library: `prepare` a matrix's parts once, then `gemm` per product.

    The `*_into` methods take numpy arrays or torch tensors (contiguous, on the CPU) and write into
    `out`: the torch-free engine (lean.py) calls them with numpy buffers. The others allocate their
    result as a torch tensor, for the torch engine (llama.py), and import torch."""

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

    def gemm(self, prepared: tuple, x, out):
        """out [R, N] fp32 = x [R, K] fp32 (contiguous, on the CPU) times the prepared matrix, transposed."""
        n, types, ptrs, rows, k = prepared
        if self.lib.llmos_gemm(n, types, ptrs, rows, k, _ptr(x), x.shape[0], _ptr(out), out.shape[1]):
            raise ValueError(f"native product refused its arguments (K {k}, rows {x.shape[0]})")
        return out

    def rms_norm_into(self, x, w, eps: float, add, out):
        """out = torch's rms_norm over the last dimension of fp32 x [R, K] with fp32 weights w [K], out
        fp32 or bf16. With `add` (fp32 or bf16, x's shape), x += add first, in place: a residual step
        and the norm after it."""
        rc = self.lib.llmos_rms_norm(_ptr(x), _ptr(add) if add is not None else None,
                                     _kind(add) if add is not None else 0, _ptr(w), x.shape[0], x.shape[1], eps,
                                     _ptr(out), _kind(out))
        if rc:
            raise ValueError("native rms_norm refused its arguments")
        return out

    def attend_into(self, q, k, v, tables, lengths, scale: float, out):
        """Attention of each row of q [n, H, D] fp32 over the first lengths[n] positions of one layer's
        paged k, v [blocks, block_size, KVH, D] (fp32, bf16 or fp16) through its block table
        tables[n] (int64 [n, max_blocks]; lengths int32) -> out [n, H, D] fp32. A decoding token is
        one row; so is each token of a prompt, its length its position + 1 (causal)."""
        nd, heads, dim = q.shape
        rc = self.lib.llmos_attend(_ptr(q), nd, heads, k.shape[2], dim, _ptr(k), _ptr(v), _kind(k), k.shape[1],
                                   _ptr(tables), tables.shape[1], _ptr(lengths), scale, _ptr(out))
        if rc:
            raise ValueError(f"native attention refused its arguments ({'out of memory' if rc == -2 else 'shapes'})")
        return out

    def rope_store_into(self, qkv, heads: int, kv_heads: int, cs, k, v, slots, q_out):
        """Rotate q and k of qkv [T, (heads + 2 kv_heads) * D] (fp32 or bf16, rows contiguous) by cs
        [T, D/2, 2] (fp32 cos, sin), write k and v to the pool rows `slots` (int64) of k, v
        [rows, kv_heads, D]; q_out [T, heads, D] fp32 gets the rotated q."""
        stride = qkv.strides[0] // qkv.itemsize if isinstance(qkv, np.ndarray) else qkv.stride(0)
        if self.lib.llmos_rope_store(_ptr(qkv), _kind(qkv), qkv.shape[0], heads, kv_heads, k.shape[-1], stride,
                                     _ptr(cs), _ptr(k), _ptr(v), _kind(k), _ptr(slots), _ptr(q_out)):
            raise ValueError("native rope_store refused its arguments")
        return q_out

    def silu_mul_into(self, gate_up, out):
        """out [T, F] (fp32 or bf16) = silu(gate) * up of gate_up [T, 2F] (fp32 or bf16)."""
        t, width = gate_up.shape
        if self.lib.llmos_silu_mul(_ptr(gate_up), _kind(gate_up), t, width // 2, _ptr(out), _kind(out)):
            raise ValueError("native silu_mul refused its arguments")
        return out

    # the torch engine's: results as new torch tensors

    def rms_norm(self, x, w, eps: float, add=None, dtype=None):
        import torch
        return self.rms_norm_into(x, w, eps, add, torch.empty(x.shape, dtype=dtype or torch.float32))

    def attend(self, q, k, v, tables, lengths, scale: float):
        import torch
        return self.attend_into(q, k, v, tables, lengths, scale, torch.empty_like(q))

    def rope_store(self, qkv, heads: int, kv_heads: int, rope, k, v, slots):
        """As rope_store_into, rope [T, D/2] complex; returns q [T, heads, D] fp32."""
        import torch
        q = torch.empty((qkv.shape[0], heads, k.shape[-1]), dtype=torch.float32)
        return self.rope_store_into(qkv, heads, kv_heads, torch.view_as_real(rope), k, v, slots, q)

    def silu_mul(self, gate_up, dtype):
        import torch
        return self.silu_mul_into(gate_up, torch.empty((gate_up.shape[0], gate_up.shape[1] // 2), dtype=dtype))


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


def to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), rounding to nearest, ties to even, as torch and native.c do."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(b: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> fp32."""
    return (b.astype(np.uint32) << 16).view(np.float32)


def _as(x: np.ndarray, kind: str) -> np.ndarray:
    """fp32 x in the element kind named ("float32", "uint16" for bf16, "float16")."""
    return to_bf16(x) if kind == "uint16" else x.astype(kind)


def _values(x: np.ndarray) -> np.ndarray:
    return from_bf16(x) if x.dtype == np.uint16 else x.astype(np.float32)


def _norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"self-test: {what}")


def _self_test(lib: Library) -> None:
    """Every op against numpy on random data (numpy only: the torch-free engine runs this too);
    raises when any result is wrong."""
    rng = np.random.default_rng(0)
    randn = lambda *shape: rng.standard_normal(shape).astype(np.float32)   # noqa: E731
    for ggml_type in sorted(PRODUCT_TYPES):
        t = random_tensor(ggml_type, 40, 96, rng)
        w = t.dequantize().astype(np.float64)
        for rows in (1, 5):
            x = randn(rows, 96)
            got = lib.gemm(lib.prepare([t]), x, np.empty((rows, 40), np.float32))
            want = x.astype(np.float64) @ w.T
            err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
            _check(err < 1e-5, f"{Q(ggml_type).name} at {rows} rows is off by {err:.2e}")
    x, w, y = randn(3, 80), randn(80), randn(3, 80)
    out = np.empty((3, 80), np.float32)
    _check(np.allclose(lib.rms_norm_into(x.copy(), w, 1e-5, None, out), _norm(x, w, 1e-5), atol=1e-5)
           and np.allclose(lib.rms_norm_into(x.copy(), w, 1e-5, y, out), _norm(x + y, w, 1e-5), atol=1e-5)
           and np.array_equal(lib.rms_norm_into(x.copy(), w, 1e-5, y, np.empty((3, 80), np.uint16)),
                              to_bf16(lib.rms_norm_into(x.copy(), w, 1e-5, y, out))),
           "rms_norm differs from numpy's")
    for kind in ("float32", "uint16", "float16"):
        blocks, bs, kvh, heads, dim = 6, 4, 2, 6, 16
        k, v = _as(randn(blocks, bs, kvh, dim), kind), _as(randn(blocks, bs, kvh, dim), kind)
        tables = np.array([[5, 0, 3], [2, 4, 1]], dtype=np.int64)
        lengths = np.array([9, 3], dtype=np.int32)
        q = randn(2, heads, dim)
        got = lib.attend_into(q, k, v, tables, lengths, 0.25, np.empty_like(q))
        for n in range(2):
            keys = np.repeat(_values(k[tables[n]]).reshape(-1, kvh, dim)[:lengths[n]], heads // kvh, 1)
            vals = np.repeat(_values(v[tables[n]]).reshape(-1, kvh, dim)[:lengths[n]], heads // kvh, 1)
            s = np.einsum("hd,phd->hp", q[n], keys) * 0.25
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            _check(np.allclose(got[n], np.einsum("hp,phd->hd", p, vals), atol=1e-5),
                   f"attention over a {kind} pool differs from numpy's")
    for kind in ("float32", "uint16"):
        gu = _as(randn(3, 40), kind)
        g, u = _values(gu)[:, :20], _values(gu)[:, 20:]
        want = g / (1 + np.exp(-g)) * u
        for out_kind in ("float32", "uint16"):
            got = _values(lib.silu_mul_into(gu, np.empty((3, 20), out_kind)))
            tol = 1e-5 if out_kind == "float32" else 1e-2
            _check(np.allclose(got, want, atol=tol, rtol=tol), f"silu_mul of {kind} into {out_kind} differs")
    _test_rope_store(lib, randn)


def _test_rope_store(lib: Library, randn) -> None:
    heads, kvh, dim, t = 4, 2, 8, 3
    angles = np.random.default_rng(1).random((t, dim // 2)) * 6
    cs = np.stack([np.cos(angles), np.sin(angles)], -1).astype(np.float32)      # [t, dim/2, 2]
    for kind in ("float32", "uint16", "float16"):
        qkv = randn(t, (heads + 2 * kvh) * dim)
        k, v = np.zeros((10, kvh, dim), kind), np.zeros((10, kvh, dim), kind)
        slots = np.array([7, 2, 5], dtype=np.int64)
        q = lib.rope_store_into(qkv, heads, kvh, cs, k, v, slots, np.empty((t, heads, dim), np.float32))
        pairs = qkv[:, :(heads + kvh) * dim].reshape(t, heads + kvh, dim // 2, 2)
        c, s = cs[:, None, :, 0], cs[:, None, :, 1]
        turned = np.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c],
                          -1).reshape(t, heads + kvh, dim)
        tol = 1e-5 if kind == "float32" else 1e-2
        ok = np.allclose(q, turned[:, :heads], atol=1e-5)
        ok &= np.allclose(_values(k[slots]), turned[:, heads:], atol=tol, rtol=tol) and not k[[0, 1, 3]].any()
        ok &= np.array_equal(v[slots], _as(qkv[:, (heads + kvh) * dim:].reshape(t, kvh, dim), kind))
        _check(ok, f"rope_store into a {kind} pool differs from numpy's")


def random_tensor(ggml_type: int, rows: int, cols: int, rng: np.random.Generator, name: str = "random") -> RawTensor:
    """Blocks of a native type with random quants and small finite scales (tests and self-tests)."""
    from .types import TYPES as TABLE
    if int(ggml_type) in (int(Q.F32), int(Q.F16)):
        values = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32 if int(ggml_type) == int(Q.F32) else np.float16)
        return RawTensor(name, int(ggml_type), (rows, cols), values.view(np.uint8).reshape(-1))
    row = TABLE[int(ggml_type)]
    nblocks = rows * cols // row.block
    raw = rng.integers(0, 256, (nblocks, row.nbytes), dtype=np.uint8)
    scales = (rng.random((nblocks, 2)) * 0.02 + 0.001).astype(np.float16)
    scales[:, 1] *= -1
    fields = 2 if int(ggml_type) == int(Q.Q4_1) else 1
    raw[:, :2 * fields] = scales[:, :fields].view(np.uint8).reshape(nblocks, -1)
    return RawTensor(name, int(ggml_type), (rows, cols), raw.reshape(-1))


def library(torch_free: bool = False) -> Library | None:
    """The checked library, built on first use in this process; None when it cannot run here.

    Unless torch_free, torch is imported first, so that native.c's libgomp.so.1 resolves to the one
    torch ships and the two share one OpenMP runtime (the torch-free engine loads the system's)."""
    if not torch_free:
        import torch  # noqa: F401
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
