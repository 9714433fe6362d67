"""The tokenizer service: text <-> token ids and chat templates for every model llmos knows, and the
model registry's syscalls (models, model_add, model_remove) until an inference service takes them.

A model's tokenizer is built from its GGUF's metadata (drivers.model.Tokenizer) the first time a
call names the model, and kept; the default model's is built at start, so the first call after
boot is fast. Building runs in a worker thread, so pings are answered meanwhile; a call that needs
a tokenizer being built waits for that build instead of starting another.

Never: load weights, or keep a tokenizer for a file that changed (the cache key is path, size
and mtime, so a replaced file is read again).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import Any

from syscalls.runtime import models
from syscalls.runtime.config import Config
from syscalls.runtime.service import Service, main
from syscalls import errors, wire

BIG_TEXT = 1 << 16        # characters: tokenize longer texts in a worker thread
REPLY_ROOM = wire.MAX_MESSAGE - 4096


def _key(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise errors.ENOENT(f"{path}: the model's file is gone (model_remove it, or put it back)")
    return (str(path), st.st_size, st.st_mtime_ns)


def _check_size(what: str, nbytes: int) -> None:
    if nbytes > REPLY_ROOM:
        raise errors.E2BIG(f"{what}: the result would be {nbytes} bytes, more than one message "
                           f"holds ({wire.MAX_MESSAGE}); split the input")


def _encode_releasing_the_gil(tok, text: str, add_bos: bool | None, special: bool) -> list[int]:
    """tok.encode(text, add_bos, special), but letting the event loop run meanwhile.

    drivers.model.Tokenizer.encode calls tokenizers' `encode`, which holds the GIL for the whole
    text (~1 s per MB), so even in a worker thread it stalls this service's pongs and the
    supervisor kills it as hung. `encode_batch` releases the GIL and gives the same ids. This
    reaches into the library's private tokenizers until it makes the switch itself.
    """
    if not special:
        tok.encode("", add_bos=False, parse_special=False)     # builds tok._hf_plain
    hf = tok._hf if special else tok._hf_plain
    ids = hf.encode_batch([text], add_special_tokens=False)[0].ids
    if (tok.add_bos if add_bos is None else add_bos) and tok.bos_id is not None:
        ids = [tok.bos_id, *ids]
    return ids


class TokenizerService(Service):
    name = "tokenizer"

    async def start(self) -> None:
        self.registry = models.Registry(self.paths)
        self.tokenizers: dict[tuple, Any] = {}                 # _key(path) -> drivers.model.Tokenizer
        self.building: dict[tuple, asyncio.Future] = {}
        self.described: dict[tuple, dict] = {}                 # (path, size, mtime) -> its header's summary
        try:
            path = self.registry.resolve(None)
        except errors.ENOENT as e:          # the service still serves added models
            self.log.warning("no_default_model", error=e.message)
            return
        # Built in the background (~1 s for a 49k vocabulary): the service is READY at once, a
        # call for the default model waits for the build, and any other call is answered now.
        self.warming = asyncio.ensure_future(self._tokenizer(path))
        self.warming.add_done_callback(lambda f: self._warmed(f, path))

    def _warmed(self, build: asyncio.Future, path: Path) -> None:
        if build.cancelled():
            return
        if build.exception() is not None:   # calls naming it will say why; the others still work
            self.log.error("default_tokenizer_failed", path=str(path), error=getattr(
                build.exception(), "message", repr(build.exception())))
            return
        self.log.info("tokenizer_loaded", model=models.DEFAULT, path=str(path))

    # -- tokenizers -----------------------------------------------------------------------------
    async def _tokenizer(self, path: Path):
        key = _key(path)
        tok = self.tokenizers.get(key)
        if tok is not None:
            return tok
        build = self.building.get(key)
        if build is None:
            build = self.building[key] = asyncio.ensure_future(asyncio.to_thread(self._build, path))

            def built(f: asyncio.Future) -> None:
                self.building.pop(key, None)
                if not f.cancelled() and f.exception() is None:
                    self.tokenizers[key] = f.result()
            build.add_done_callback(built)
        return await asyncio.shield(build)      # a cancelled call leaves the build to finish

    def _build(self, path: Path):
        from drivers.model import ModelError, Tokenizer, read_metadata
        try:
            return Tokenizer(read_metadata(path))
        except (ModelError, FileNotFoundError) as e:
            raise models.model_error(e, path) from None
        except KeyError as e:
            raise errors.EINVAL(f"{path}: no tokenizer in its metadata (missing {e})") from None

    async def _for(self, args: dict):
        return await self._tokenizer(self.registry.resolve(args["model"]))

    # -- tokens ---------------------------------------------------------------------------------
    async def op_tokenize(self, args: dict, caller: dict) -> list[int]:
        tok = await self._for(args)
        text, add_bos, special = args["text"], args["add_bos"], args["special"]
        if len(text) > BIG_TEXT:
            ids = await asyncio.to_thread(_encode_releasing_the_gil, tok, text, add_bos, special)
        else:
            ids = tok.encode(text, add_bos, special)
        if len(ids) > wire.MAX_ARRAY:
            raise errors.E2BIG(f"tokenize: the text is {len(ids)} tokens, more than one reply "
                               f"holds ({wire.MAX_ARRAY}); split it")
        return ids

    async def op_detokenize(self, args: dict, caller: dict) -> str:
        tok = await self._for(args)
        ids = args["ids"]
        for i, t in enumerate(ids):
            if not 0 <= t < tok.vocab_size:
                raise errors.EINVAL(f"detokenize: ids[{i}] = {t} is not a token id: the vocabulary "
                                    f"of {args['model'] or models.DEFAULT} has {tok.vocab_size} "
                                    f"tokens (0..{tok.vocab_size - 1})")
        text = tok.decode(ids, skip_special=args["skip_special"])
        _check_size("detokenize", len(text.encode()))
        return text

    async def op_apply_chat_template(self, args: dict, caller: dict) -> str:
        from drivers.model import ChatTemplateError
        messages = args["messages"]
        if not messages:
            raise errors.EINVAL("apply_chat_template: argument 'messages' is empty")
        for i, m in enumerate(messages):
            for field in ("role", "content"):
                if field not in m:
                    raise errors.EINVAL(f"apply_chat_template: messages[{i}] has no {field!r} "
                                        f"(a message is {{role, content}})")
                if type(m[field]) is not str:
                    raise errors.EINVAL(f"apply_chat_template: messages[{i}].{field} must be a "
                                        f"string, got {type(m[field]).__name__}")
            extra = sorted(map(str, set(m) - {"role", "content"}))
            if extra:
                raise errors.EINVAL(f"apply_chat_template: messages[{i}] has unknown key "
                                    f"{extra[0]!r} (a message is {{role, content}})")
        tok = await self._for(args)
        try:
            text = tok.apply_chat_template(messages, args["add_generation_prompt"])
        except ChatTemplateError as e:
            raise errors.EINVAL(f"apply_chat_template: {e}") from None
        _check_size("apply_chat_template", len(text.encode()))
        return text

    # -- the registry ---------------------------------------------------------------------------
    async def op_models(self, args: dict, caller: dict) -> list[dict]:
        """Every registered model, with its state as the inference service holds it (queued for
        room in the memory budget, loading: its progress, resident: its device and memory,
        unloading, failed: why, or absent), its last use and when keep_alive unloads it, and the
        version of its file (size, mtime); an older version still finishing requests is listed
        under the model as ``older``."""
        rows = await asyncio.to_thread(self._models)
        drivers = await self._drivers()
        held = await self._held()
        by_driver = {d["service"]: d for d in drivers}
        for row in rows:
            real = os.path.realpath(row["path"])
            if held is None:                # no inference service: what the drivers say
                here = next((d for d in drivers if d["real"] == real), None)
                state = "absent" if here is None else "resident" if here.get("info") else \
                    "failed" if here["state"] == "FAILED" else "loading"
                mine, older = {"state": state, "driver": here["service"] if here else None}, []
            else:
                versions = [m for m in held["models"] if m["path"] == real or
                            (m["name"] == row["name"] and not m["default"])]
                mine = next((m for m in versions if m["path"] == real and
                             m["version"] == row["version"]), None) or {"state": "absent", "driver": None}
                older = [{k: m[k] for k in ("path", "version", "state", "driver", "requests")}
                         for m in versions if m is not mine and m["state"] != "absent"]
            here = by_driver.get(mine["driver"]) if mine["driver"] else None
            loaded = here.get("info") if here and mine["state"] == "resident" else None
            row["state"], row["driver"], row["older"] = mine["state"], mine["driver"], older
            row["progress"] = here["progress"] if here and row["state"] == "loading" else None
            if row["state"] == "failed":
                said = (here or {}).get("progress") or {}     # the driver's own reason, if it gave one
                row["error"] = mine.get("error") or row["error"] or (
                    f"its driver {here['service']} failed: "
                    f"{said['error'] if said.get('what') == 'failed' and said.get('error') else here['last_exit']}"
                    if here else None)
            for k in ("memory_bytes", "last_used", "expires_at", "keep_alive", "requests", "position"):
                row[k] = mine.get(k)
            row["budget"] = held["budget"] if held else None
            row["device"] = loaded["device"] if loaded else None
            row["memory"] = {k: loaded.get(k) for k in ("rss", "kv_bytes", "num_blocks",
                                                        "block_size", "threads", "device_name",
                                                        "memory_total", "memory_used", "weight_bytes",
                                                        "kv_dtype", "compute_dtype",
                                                        "dense_copy", "native", "engine")} if loaded else None
            row["weights"] = loaded.get("weights") if loaded else None   # each kind of matrix as held
        return rows

    async def _held(self) -> dict | None:
        """The inference service's models (model_states), or None when there is none to ask."""
        try:
            return await asyncio.wait_for(self.runtime.call("inference", "model_states", {}), 2.0)
        except (errors.LLMOSError, asyncio.TimeoutError):
            return None

    async def _drivers(self) -> list[dict]:
        """The kernel's driver services, each with the real path of the model it runs (or loads)
        and, if READY, its info. models must answer at once: a driver slow to say is left out."""
        try:
            drivers = await self.runtime.call("kernel", "drivers", {})
        except errors.LLMOSError:
            return []
        boot = Config.load(self.paths.home / "config.toml").driver.model or None
        for d in drivers:
            spec = d["path"] or boot
            try:
                path = spec if spec and os.path.isabs(spec) else self.registry.resolve(spec)
            except errors.ENOENT:
                path = ""
            d["real"], d["info"] = os.path.realpath(path) if path else None, None
        ready = [d for d in drivers if d["state"] == "READY"]
        infos = await asyncio.gather(*(asyncio.wait_for(self.runtime.call(d["service"], "info", {}), 2.0)
                                       for d in ready), return_exceptions=True)
        for d, info in zip(ready, infos):
            if isinstance(info, dict):
                d["info"], d["real"] = info, os.path.realpath(info["model"])
        return drivers

    def _models(self) -> list[dict]:
        """The registry's models, each with what its file's header says (read once per version
        of the file: a listing of many models is a stat each) and that version."""
        from drivers.model import ModelError, describe
        out = []
        for m in self.registry.list():
            row = {"name": m["name"], "architecture": None, "parameters": None,
                   "quantization": None, "context_length": None, "file_size": None, "held": None,
                   "path": m["path"], "added": m["added"], "default": m["default"], "error": None,
                   "version": None, "mtime": None}
            try:
                try:
                    st = os.stat(m["path"])
                except FileNotFoundError:
                    raise ModelError(f"{m['path']}: no such model file") from None
                key = (os.path.realpath(m["path"]), st.st_size, st.st_mtime_ns)
                row.update(version=f"{st.st_size}-{st.st_mtime_ns}", mtime=st.st_mtime)
                if key not in self.described:
                    info = describe(Path(m["path"]))
                    self.described[key] = {k: info[k] for k in ("architecture", "parameters", "quantization",
                                                               "context_length", "file_size", "held")}
                row.update(self.described[key])
            except (ModelError, OSError) as e:
                row["error"] = str(e)
            out.append(row)
        return out

    async def op_model_add(self, args: dict, caller: dict) -> dict:
        built = []

        def check(path: Path) -> None:   # a model whose tokenizer llmos cannot build is no use
            _check_runnable(path)
            built.append((_key(path), self._build(path)))
        entry = await asyncio.to_thread(self.registry.add, args["path"], args["name"],
                                        caller.get("uid"), check, bool(args.get("replace")))
        self.tokenizers.update(built)
        self.log.info("model_added", name=entry["name"], path=entry["path"], uid=caller.get("uid"),
                      replace=bool(args.get("replace")))
        await self._changed()
        return {k: entry[k] for k in ("name", "path", "added")}

    async def _changed(self) -> None:
        """Tell the inference service the registry changed: an older version of a model unloads
        once idle, and the default model's driver may have a name now."""
        with contextlib.suppress(errors.LLMOSError, asyncio.TimeoutError):   # none (yet): nobody to tell
            await asyncio.wait_for(self.runtime.call("inference", "models_changed", {}), 2.0)

    async def op_model_remove(self, args: dict, caller: dict) -> None:
        name = args["name"]
        users = await self._users(name)
        if users and not args["force"]:
            who = ", ".join(f"pid {u['pid']} ({u['requests']} requests, {u['contexts']} contexts)"
                            for u in users)
            raise errors.EBUSY(f"model {name!r} is in use by {who}; force removes it anyway, "
                               f"ending those requests and contexts")
        path = await asyncio.to_thread(self.registry.remove, name, caller.get("uid"),
                                       bool(caller.get("privileged")))
        if users:
            await self._evict(path, name)
        if path not in {m["path"] for m in self.registry.list()}:
            for key in [k for k in self.tokenizers if k[0] == path]:
                del self.tokenizers[key]
        self.log.info("model_removed", name=args["name"], uid=caller.get("uid"))
        await self._changed()


    async def _users(self, name: str) -> list[dict]:
        """Who has requests or contexts on an added model now, as the inference service says
        ([] for a name that is not an added model: removing it fails on its own)."""
        entry = self.registry.list()
        path = next((m["path"] for m in entry if m["name"] == name and not m["default"]), None)
        if path is None:
            return []
        try:
            return await self.runtime.call("inference", "model_users", {"path": path})
        except errors.LLMOSError:         # no inference service (a light llmos): nobody uses it
            return []

    async def _evict(self, path: str, name: str) -> None:
        try:
            await self.runtime.call("inference", "model_evict", {"path": path, "name": name})
        except errors.LLMOSError as e:    # removed all the same; its requests end with their driver
            self.log.warning("model_evict_failed", name=name, error=e.message)


def _check_runnable(path: Path) -> None:
    """EINVAL or ENOENT unless path is a whole GGUF file llmos can run: a Llama whose every tensor
    is present, of its shape and of a type the driver holds (the message names what is wrong)."""
    from drivers.model import ModelError, load_gguf
    try:
        load_gguf(path)                # the header and tensor table only: ~0.1 s, no weights read
    except ModelError as e:
        raise models.model_error(e, path) from None


if __name__ == "__main__":
    main(TokenizerService)
