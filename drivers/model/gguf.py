"""Open a Llama-architecture GGUF file: its config, its metadata, and a directory of its tensors.

Nothing here dequantises a model: `load_gguf` parses the header (drivers/model/gguf_header.py, about
0.1 s; gguf.GGUFReader when that reader meets something it does not handle), checks the config and
every tensor's presence, shape, type and extent, and returns a `ModelFile` whose `read` hands one
tensor's block bytes to the caller (drivers/model/quant.py turns them into held matrices, one at a
time, so the peak is the held model plus one tensor) and whose `memmap` maps one tensor read-only (an
embedding table, looked up a few rows per step, stays in the page cache and the file's own bits).

The model cache directory (LLMOS_HOME/data/models/cache) keeps no weights: it holds the product
kernels measured on this machine (drivers/model/kernels.py). Entries of the old fp32 weight cache
(~4 bytes per parameter) are removed by `llmos model clean` (syscalls/runtime/models.py).

Never: build the model, touch the tokenizer, or write anywhere except the cache directory it is given.
torch is not imported here, so the tokenizer service (which needs only read_metadata) does not pay for it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

import gguf as gguflib

from . import gguf_header
from .types import TYPES, RawTensor

Progress = Callable[[int, int, str], None]   # (done, total, what); done/total count bytes of tensor data

SUPPORTED_ARCHITECTURES = ("llama",)
Q = gguflib.GGMLQuantizationType
SUPPORTED_TYPES = frozenset(TYPES)
LAYER_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")


def layer_tensors(i: int) -> tuple[str, tuple[str, ...], str, str, tuple[str, ...], str]:
    """Layer i's tensor names as the forward pass takes them: attention norm, the fused q, k, v
    product's parts, attention output, feed-forward norm, the fused gate, up parts, and down."""
    p = f"blk.{i}."
    return (p + "attn_norm.weight", (p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"),
            p + "attn_output.weight", p + "ffn_norm.weight", (p + "ffn_gate.weight", p + "ffn_up.weight"),
            p + "ffn_down.weight")


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
    """A tensor is stored in a tensor type this library cannot run."""


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


def _header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
    """(metadata, [(tensor name, dims, ggml type, data offset)]): by the fast reader, else by GGUFReader."""
    try:
        return gguf_header.read_header(path)
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except gguf_header.TruncatedTensor as e:
        raise CorruptModelError(f"{path}: {e}") from None
    except gguf_header.UnknownType as e:
        raise UnsupportedQuantError(f"{path}: {e}") from None
    except (gguf_header.Unexpected, OSError):
        reader = _open(path)
        return _metadata(reader), [(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset))
                                   for t in reader.tensors]


def _summary(path: Path, metadata: dict, tensors: list[tuple[str, list[int], int, int]]) -> dict:
    """Works for any GGUF, supported architecture or not, so a listing can say why a model won't load."""
    try:
        types = [gguflib.GGMLQuantizationType(t).name for _, _, t, _ in tensors]
    except ValueError as e:
        raise UnsupportedQuantError(f"{path}: {e}") from None
    counts = Counter(types)
    matrix_types = Counter(name for (_, dims, _, _), name in zip(tensors, types) if len(dims) > 1)
    try:
        quant = gguflib.LlamaFileType(metadata.get("general.file_type")).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = "GUESSED"
    if quant == "GUESSED":
        quant = matrix_types.most_common(1)[0][0] if matrix_types else "unknown"
    arch = metadata.get("general.architecture", "unknown")
    held: dict[str, dict] = {}           # per type: how many tensors, their bytes, the layout they get
    for (_, dims, kind, _), name in zip(tensors, types):
        block, size = gguflib.GGML_QUANT_SIZES[gguflib.GGMLQuantizationType(kind)]
        row = held.setdefault(name, {"type": name, "tensors": 0, "bytes": 0,
                                     "layout": TYPES[kind].layout if kind in TYPES else "unsupported"})
        row["tensors"] += 1
        row["bytes"] += math.prod(dims) // block * size
    return {
        "name": metadata.get("general.name") or path.stem,
        "architecture": arch,
        "parameters": int(sum(math.prod(dims) for _, dims, _, _ in tensors)),
        "quantization": quant,
        "tensor_types": dict(counts),
        "held": sorted(held.values(), key=lambda r: -r["bytes"]),
        "context_length": metadata.get(f"{arch}.context_length"),
        "file_size": path.stat().st_size,
        "path": str(path),
    }


# ---------------------------------------------------------------------------------------------- loading

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in the file: its type, torch-order shape ([out, in]), offset and size."""
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def type_name(self) -> str:
        return gguflib.GGMLQuantizationType(self.ggml_type).name


@dataclass
class ModelFile:
    """A checked GGUF: parsed config, all metadata (tokenizer included), and its tensor directory."""
    path: Path
    config: LlamaConfig
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    summary: dict[str, Any]

    def read(self, name: str):
        """One tensor's bytes, read into memory of its own (the file is not kept mapped)."""
        t = self.tensors[name]
        data = np.empty(t.nbytes, dtype=np.uint8)
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            if f.readinto(memoryview(data)) != t.nbytes:
                raise CorruptModelError(f"{self.path}: tensor {name} at offset {t.offset}: the file ended early")
        return RawTensor(name, t.ggml_type, t.shape, data, t.offset)

    def memmap(self, name: str):
        """One tensor mapped read-only from the file: pages are read (and kept) only where touched."""
        t = self.tensors[name]
        return RawTensor(name, t.ggml_type, t.shape, np.memmap(self.path, np.uint8, "r", t.offset, (t.nbytes,)),
                         t.offset)

    @property
    def matrix_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def load_gguf(path: str | os.PathLike) -> ModelFile:
    """Parse and check a GGUF: config, metadata, and every tensor the Llama forward pass reads."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    metadata, directory = _header(path)
    by_name = {name: (dims, kind, offset) for name, dims, kind, offset in directory}
    config = parse_config(metadata, set(by_name), where=str(path))
    shapes = expected_shapes(config)
    for name in shapes:
        if name not in by_name:
            raise MissingTensorError(f"{path}: tensor {name!r} is missing")
    unexpected = sorted(set(by_name) - set(shapes))
    if unexpected:
        raise UnsupportedArchitectureError(f"{path}: tensors this Llama implementation does not use:"
                                           f" {', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    tensors = {}
    for name, shape in shapes.items():
        dims, kind, offset = by_name[name]
        torch_shape = tuple(int(d) for d in reversed(dims))      # GGUF lists dims innermost first
        if kind not in SUPPORTED_TYPES:
            raise UnsupportedQuantError(
                f"{path}: tensor {name} uses quantisation {_type_name(kind)}, which is not supported"
                f" ({', '.join(sorted(_type_name(q) for q in SUPPORTED_TYPES))})")
        if torch_shape != shape:
            raise CorruptModelError(f"{path}: tensor {name} has shape {torch_shape}, expected {shape}")
        block, type_size = gguflib.GGML_QUANT_SIZES[gguflib.GGMLQuantizationType(kind)]
        if torch_shape[-1] % block:
            raise CorruptModelError(f"{path}: tensor {name}: rows of {torch_shape[-1]} are not whole"
                                    f" {_type_name(kind)} blocks of {block}")
        tensors[name] = TensorInfo(name, kind, torch_shape, offset, math.prod(torch_shape) // block * type_size)
    return ModelFile(path, config, metadata, tensors, _summary(path, metadata, directory))


def _type_name(kind: int) -> str:
    try:
        return gguflib.GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All metadata key/values (no weights), from the file's header."""
    return _header(Path(path))[0]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """name, architecture, parameters, quantization, tensor_types, context_length, file_size, path."""
    path = Path(path)
    return _summary(path, *_header(path))
