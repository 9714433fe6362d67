"""Open a Llama-architecture GGUF file: its config, its metadata and its weights dequantised to fp32.

Owns the weight cache under the directory the caller passes in. The first load parses the file with
gguf.GGUFReader (a few seconds: the reader walks every metadata array) and dequantises every tensor; it then
writes <cache_dir>/<key>/ holding `weights.pt` (torch.save of the fp32 tensors) and `metadata.json` (all
metadata, tokenizer arrays included, plus the parsed config). Later loads read only those two files, with
torch.load(mmap=True), so they take well under a second and several processes share the page cache.

torch.save rather than safetensors: torch is already a dependency, weights_only + mmap loading gives the same
zero-copy safety, and safetensors would be one more package for no gain here.

The cache key is the sha256 of (cache format version, file size, mtime_ns, first 16 MiB of the file). The
first 16 MiB hold the whole GGUF header (metadata and tensor table) of any ordinary model, so a different
model never shares a key; size and mtime catch an edited file without hashing gigabytes on every start.
A copied file (new mtime) is simply dequantised once more.

Never: build the model, touch the tokenizer, or write anywhere except the cache directory it is given.
torch is imported only by the functions that make tensors, so the tokenizer service (which needs only
read_metadata) does not pay for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

import gguf as gguflib

from . import gguf_header

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int, str], None]   # (done, total, what); done/total count bytes of tensor data

CACHE_FORMAT = 1
HEADER_HASH_BYTES = 16 << 20
SUPPORTED_ARCHITECTURES = ("llama",)
Q = gguflib.GGMLQuantizationType
SUPPORTED_QUANTS = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                              Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K})
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


# ---------------------------------------------------------------------------------------------- errors

class ModelError(Exception):
    """A model file that cannot be used; the message says which file and why."""


class CorruptModelError(ModelError):
    """Not a GGUF file, truncated, or inconsistent (missing metadata, wrong tensor shapes)."""


class UnsupportedArchitectureError(ModelError):
    """A valid GGUF whose architecture this library does not implement."""


class MissingTensorError(ModelError):
    """A tensor the architecture needs is absent from the file."""


class UnsupportedQuantError(ModelError):
    """A tensor is stored in a quantisation type this library cannot dequantise."""


# ---------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class LlamaConfig:
    name: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    ffn: int
    vocab_size: int
    context_length: int
    head_dim: int
    rope_theta: float
    rope_scaling: str          # "none" or "linear"
    rope_scale: float          # positions are divided by this for "linear"
    rms_eps: float
    bos_id: int | None
    eos_id: int | None
    tied_embeddings: bool      # no output.weight: the output layer reuses token_embd.weight
    has_rope_freqs: bool       # rope_freqs.weight divides the rotary frequencies (Llama 3.1 style)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        return cls(**d)


def parse_config(metadata: dict, tensor_names: set[str], where: str = "model") -> LlamaConfig:
    arch = metadata.get("general.architecture")
    if arch is None:
        raise CorruptModelError(f"{where}: no general.architecture in the metadata")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{where}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")

    def need(key: str):
        full = f"{arch}.{key}"
        if full not in metadata:
            raise CorruptModelError(f"{where}: metadata key {full!r} is missing")
        return metadata[full]

    def opt(key: str, default):
        return metadata.get(f"{arch}.{key}", default)

    n_heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    head_dim = int(opt("attention.key_length", hidden // n_heads))
    rope_dims = int(opt("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise UnsupportedArchitectureError(f"{where}: partial rotary embedding ({rope_dims} of {head_dim} dims)"
                                           " is not supported")
    if int(opt("attention.value_length", head_dim)) != head_dim:
        raise UnsupportedArchitectureError(f"{where}: value head size differs from key head size")
    scaling = str(opt("rope.scaling.type", "none"))
    scale = float(opt("rope.scaling.factor", 1.0) or 1.0)
    if scaling not in ("none", "linear") and not (scaling == "yarn" and scale == 1.0):
        raise UnsupportedArchitectureError(f"{where}: rope scaling {scaling!r} is not supported (none, linear)")
    if scaling != "linear":
        scaling, scale = "none", 1.0
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(opt("vocab_size", len(tokens) if tokens else 0))
    if vocab <= 0:
        raise CorruptModelError(f"{where}: cannot tell the vocabulary size (no {arch}.vocab_size, no tokens)")

    def token_id(key: str) -> int | None:
        value = metadata.get(key)
        return None if value is None else int(value)

    return LlamaConfig(
        name=str(metadata.get("general.name", "")),
        architecture=arch,
        n_layers=int(need("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(opt("attention.head_count_kv", n_heads)),
        hidden=hidden,
        ffn=int(need("feed_forward_length")),
        vocab_size=vocab,
        context_length=int(need("context_length")),
        head_dim=head_dim,
        rope_theta=float(opt("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rope_scale=scale,
        rms_eps=float(opt("attention.layer_norm_rms_epsilon", 1e-5)),
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
        tied_embeddings="output.weight" not in tensor_names,
        has_rope_freqs="rope_freqs.weight" in tensor_names,
    )


def expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the forward pass reads, in torch layout ([out, in] for matrices)."""
    kv = c.n_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (c.vocab_size, c.hidden),
                                          "output_norm.weight": (c.hidden,)}
    if not c.tied_embeddings:
        shapes["output.weight"] = (c.vocab_size, c.hidden)
    if c.has_rope_freqs:
        shapes["rope_freqs.weight"] = (c.head_dim // 2,)
    per_layer = {"attn_norm": (c.hidden,), "attn_q": (c.n_heads * c.head_dim, c.hidden),
                 "attn_k": (kv, c.hidden), "attn_v": (kv, c.hidden),
                 "attn_output": (c.hidden, c.n_heads * c.head_dim), "ffn_norm": (c.hidden,),
                 "ffn_gate": (c.ffn, c.hidden), "ffn_up": (c.ffn, c.hidden), "ffn_down": (c.hidden, c.ffn)}
    for i in range(c.n_layers):
        for part, shape in per_layer.items():
            shapes[f"blk.{i}.{part}.weight"] = shape
    return shapes


# ---------------------------------------------------------------------------------------------- reading

def _open(path: Path) -> gguflib.GGUFReader:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    try:
        reader = gguflib.GGUFReader(path)
    except (ValueError, IndexError, KeyError, UnicodeDecodeError, OverflowError) as e:
        # the reader indexes past the end of a truncated header, or meets garbage where a length should be
        raise CorruptModelError(f"{path}: not a readable GGUF file ({e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise CorruptModelError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes}"
                                    f" but the file has {size} bytes")
    return reader


def _metadata(reader: gguflib.GGUFReader) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def dequantize(t: "gguflib.ReaderTensor", where: str | Path = "") -> torch.Tensor:
    """One tensor of a GGUFReader as fp32 torch, in torch layout (matrices [out, in])."""
    import torch
    if t.tensor_type not in SUPPORTED_QUANTS:
        raise UnsupportedQuantError(f"{where}: tensor {t.name} uses quantisation {t.tensor_type.name}, which is not"
                                    f" supported ({', '.join(sorted(q.name for q in SUPPORTED_QUANTS))})")
    array = gguflib.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))   # GGUF lists dims innermost first
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape))   # a copy: the reader's map is read-only


def _header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """(metadata, [(tensor name, dims, ggml type)]): by the fast reader, else by GGUFReader."""
    try:
        return gguf_header.read_header(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except gguf_header.TruncatedTensor as e:
        raise CorruptModelError(f"{path}: {e}") from None
    except (gguf_header.Unexpected, OSError):
        reader = _open(path)
        return _metadata(reader), [(t.name, [int(d) for d in t.shape], int(t.tensor_type))
                                   for t in reader.tensors]


def _summary(path: Path, metadata: dict, tensors: list[tuple[str, list[int], int]]) -> dict:
    """Works for any GGUF, supported architecture or not, so a listing can say why a model won't load."""
    try:
        types = [gguflib.GGMLQuantizationType(t).name for _, _, t in tensors]
    except ValueError as e:
        raise UnsupportedQuantError(f"{path}: {e}") from None
    counts = Counter(types)
    matrix_types = Counter(name for (_, dims, _), name in zip(tensors, types) if len(dims) > 1)
    try:
        quant = gguflib.LlamaFileType(metadata.get("general.file_type")).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = "GUESSED"
    if quant == "GUESSED":
        quant = matrix_types.most_common(1)[0][0] if matrix_types else "unknown"
    arch = metadata.get("general.architecture", "unknown")
    return {
        "name": metadata.get("general.name") or path.stem,
        "architecture": arch,
        "parameters": int(sum(math.prod(dims) for _, dims, _ in tensors)),
        "quantization": quant,
        "tensor_types": dict(counts),
        "context_length": metadata.get(f"{arch}.context_length"),
        "file_size": path.stat().st_size,
        "path": str(path),
    }


# ---------------------------------------------------------------------------------------------- cache

def cache_key(path: str | os.PathLike) -> str:
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256(f"llmos-gguf-cache-v{CACHE_FORMAT}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(HEADER_HASH_BYTES))
    return h.hexdigest()


def _read_cache(entry: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    import torch
    try:
        info = json.loads((entry / "metadata.json").read_text())
        if info.get("format") != CACHE_FORMAT:
            return None
        weights = torch.load(entry / "weights.pt", mmap=True, weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError):   # a damaged entry is rebuilt, not trusted
        return None
    return info, weights


def _write_cache(entry: Path, info: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write into a private temporary directory, then rename: readers never see a half-written entry."""
    import torch
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name[:16]}-", dir=entry.parent))
    try:
        torch.save(weights, tmp / "weights.pt")
        (tmp / "metadata.json").write_text(json.dumps(info))
        try:
            os.rename(tmp, entry)
        except OSError:            # another process finished the same entry first; theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------- loading

@dataclass
class ModelFile:
    """A loaded GGUF: parsed config, all metadata (tokenizer included), fp32 weights by GGUF tensor name."""
    path: Path
    config: LlamaConfig
    metadata: dict[str, Any]
    weights: dict[str, torch.Tensor]
    summary: dict[str, Any]
    from_cache: bool
    cache_entry: Path | None


def load_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
              progress: Progress | None = None) -> ModelFile:
    """Load a GGUF's config, metadata and fp32 weights, through the cache when cache_dir is given."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    entry = Path(cache_dir) / cache_key(path) if cache_dir is not None else None
    if entry is not None and entry.is_dir():
        cached = _read_cache(entry)
        if cached is not None:
            info, weights = cached
            config = LlamaConfig.from_dict(info["config"])
            total = sum(w.numel() * 4 for w in weights.values())
            if progress:
                progress(total, total, "loaded from cache")
            return ModelFile(path, config, info["metadata"], weights, info["summary"], True, entry)
        shutil.rmtree(entry, ignore_errors=True)      # damaged or from an older format: rebuild it

    reader = _open(path)
    metadata = _metadata(reader)
    by_name = {t.name: t for t in reader.tensors}
    config = parse_config(metadata, set(by_name), where=str(path))
    shapes = expected_shapes(config)
    for name in shapes:
        if name not in by_name:
            raise MissingTensorError(f"{path}: tensor {name!r} is missing")
    unexpected = sorted(set(by_name) - set(shapes))
    if unexpected:
        raise UnsupportedArchitectureError(f"{path}: tensors this Llama implementation does not use:"
                                           f" {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    total = sum(int(by_name[n].n_bytes) for n in shapes)
    done = 0
    weights = {}
    for name, shape in shapes.items():
        t = by_name[name]
        if progress:
            progress(done, total, f"dequantising {name} ({t.tensor_type.name})")
        w = dequantize(t, path)
        if tuple(w.shape) != shape:
            raise CorruptModelError(f"{path}: tensor {name} has shape {tuple(w.shape)}, expected {shape}")
        weights[name] = w
        done += int(t.n_bytes)
    summary = _summary(path, metadata, [(t.name, [int(d) for d in t.shape], int(t.tensor_type))
                                        for t in reader.tensors])
    if entry is not None:
        if progress:
            progress(done, total, f"writing cache {entry}")
        info = {"format": CACHE_FORMAT, "config": config.to_dict(), "summary": summary, "metadata": metadata}
        _write_cache(entry, info, weights)
    if progress:
        progress(total, total, "loaded")
    return ModelFile(path, config, metadata, weights, summary, False, entry)


def _cached_info(path: Path, cache_dir: str | os.PathLike | None) -> dict | None:
    """The cache entry's info (config, summary, metadata) for this file, if there is a valid one."""
    if cache_dir is None or not path.is_file():
        return None
    try:
        info = json.loads((Path(cache_dir) / cache_key(path) / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    return info if info.get("format") == CACHE_FORMAT else None


def read_metadata(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """All metadata key/values (no weights): from the cache entry if there is one, else from the file."""
    path = Path(path)
    info = _cached_info(path, cache_dir)
    return info["metadata"] if info else _header(path)[0]


def describe(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """name, architecture, parameters, quantization, tensor_types, context_length, file_size, path."""
    path = Path(path)
    info = _cached_info(path, cache_dir)
    if info:
        return info["summary"]
    return _summary(path, *_header(path))
