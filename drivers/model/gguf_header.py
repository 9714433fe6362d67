"""A fast reader for a GGUF file's header: metadata and the tensor directory, nothing else.

gguf's GGUFReader builds numpy views of every field, which for a 49k-token vocabulary takes
seconds; the registry and the tokenizer service read headers at every boot, so this reads them
directly with struct and mmap (about 0.1 s). It handles little-endian GGUF v2 and v3 with every
value type; anything else raises Unexpected and the caller uses GGUFReader.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import gguf as gguflib
import numpy as np

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_ARRAY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
_STRING, _LIST = 8, 9


class Unexpected(Exception):
    """Something this reader does not handle; gguf's GGUFReader reads the file instead."""


class UnknownType(Exception):
    def __init__(self, name: str, kind: int):
        super().__init__(f"tensor {name} has tensor type {kind}, which GGUF does not define")


class TruncatedTensor(Exception):
    def __init__(self, name: str, end: int, size: int):
        super().__init__(f"truncated: tensor {name} ends at byte {end} but the file has {size} bytes")


def read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
    """(metadata, [(tensor name, dims innermost first, ggml type, data offset in the file)]) of a
    little-endian GGUF v2/v3.

    Raises Unexpected for anything it does not handle (the caller falls back to GGUFReader) and
    TruncatedTensor when a tensor's data would run past the end of the file.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise Unexpected("too short for a GGUF header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        at = 0

        def take(fmt: str):
            nonlocal at
            value = struct.unpack_from(fmt, buf, at)[0]
            at += struct.calcsize(fmt)
            return value

        def string() -> str:
            nonlocal at
            n = take("<Q")
            if at + n > len(buf):
                raise Unexpected("a string runs past the end of the file")
            text = buf[at:at + n].decode("utf-8")
            at += n
            return text

        try:
            if buf[:4] != b"GGUF":
                raise Unexpected("no GGUF magic")
            at = 4
            if take("<I") not in (2, 3):
                raise Unexpected("GGUF version")
            n_tensors, n_kv = take("<Q"), take("<Q")
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key, kind = string(), take("<I")
                if kind == _STRING:
                    meta[key] = string()
                elif kind in _SCALAR:
                    meta[key] = take(_SCALAR[kind])
                elif kind == _LIST:
                    item, n = take("<I"), take("<Q")
                    if item == _STRING:
                        meta[key] = [string() for _ in range(n)]
                    elif item in _ARRAY:
                        dtype = np.dtype(_ARRAY[item])
                        meta[key] = np.frombuffer(buf, dtype, n, at).tolist()
                        at += n * dtype.itemsize
                    else:
                        raise Unexpected(f"array of type {item}")
                else:
                    raise Unexpected(f"value type {kind}")
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                kind = take("<I")
                tensors.append((name, dims, kind, take("<Q")))
            align = meta.get("general.alignment", 32)
            data_start = (at + align - 1) // align * align
            size = len(buf)
            for name, dims, kind, offset in tensors:
                try:
                    block, type_size = gguflib.GGML_QUANT_SIZES[gguflib.GGMLQuantizationType(kind)]
                except (ValueError, KeyError):
                    raise UnknownType(name, kind) from None
                end = data_start + offset + math.prod(dims) // block * type_size
                if end > size:
                    raise TruncatedTensor(name, end, size)
            return meta, [(name, dims, kind, data_start + offset) for name, dims, kind, offset in tensors]
        except (struct.error, ValueError, UnicodeDecodeError) as e:    # truncated or garbled
            raise Unexpected(str(e)) from None
