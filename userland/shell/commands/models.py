"""The commands about models and their tokens: tokens, models and model (add, update, rm, show,
load, unload)."""

from __future__ import annotations

import json
import os
import time

from syscalls import errors

from ..builtin import (Failure, Shell, Streams, Usage, command, duration, error_text, for_each, operands,
                       options, size, table)


def _piece(text: str) -> str:
    """A token's text made visible: quoted, with spaces kept and newlines escaped."""
    return json.dumps(text, ensure_ascii=False)


@command("[--model M] [--ids] [--plain] TEXT")
def cmd_tokens(sh: Shell, io: Streams, args: list[str]) -> None:
    """Show how a model (the default unless --model) splits TEXT into tokens: id and text of each.

    Each token's text is quoted, so spaces show; a piece of a multi-byte character shows as
    U+FFFD. --ids prints only the ids, on one line. --plain reads special-token text such as
    <|im_start|> as ordinary characters.
    """
    opts, rest = options(args, "", ("model=", "ids", "plain"))
    (text,) = operands(rest, "TEXT")
    model = opts.get("--model")
    ids = sh.call("tokenize", text=text, model=model, special="--plain" not in opts)
    if "--ids" in opts:
        print(" ".join(map(str, ids)), file=io.stdout)
        return
    rows = [[str(i), _piece(sh.call("detokenize", ids=[i], model=model, skip_special=False))]
            for i in ids]
    if rows:
        table(io.stdout, ["ID", "TEXT"], rows, right={"ID"})
    print(f"{len(ids)} token{'' if len(ids) == 1 else 's'}", file=io.stdout)


def _count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


@command()
def cmd_models(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the models llmos knows; a * after its name marks the default (used when a call names none).

    Columns: name, architecture, parameters, quantization, context length in tokens, file
    size, its state (resident; queued:#N, waiting for room in the memory budget; loading with
    its progress; unloading; failed; absent: any model loads when a call names it), the device
    a driver runs it on, the memory it holds (weights and KV, as the budget counts it), how long
    ago it was last used (USED), how long until keep_alive unloads it (EXPIRES; never: the
    default model, or keep_alive -1; busy: in use, the clock starts when it is idle), and the file
    (or why it cannot be read or load). An older version still finishing requests after an
    update shows as a line of its own, "NAME (old)".
    """
    operands(args)
    show_models(io.stdout, sh.call("models"))


def show_models(out, models: list[dict]) -> None:
    """The table `models` prints (llmos models prints it too)."""
    rows = []
    for m in models:
        rows.append([m["name"] + ("*" if m["default"] else ""), m["architecture"] or "-",
                     _count(m["parameters"]), m["quantization"] or "-",
                     "-" if m["context_length"] is None else str(m["context_length"]),
                     "-" if m["file_size"] is None else size(m["file_size"]),
                     model_state(m), m.get("device") or "-", held(m), used(m), expires(m),
                     m["path"] + (f" ({m['error']})" if m["error"] else "")])
        rows += [[f"{m['name']} (old)", "-", "-", "-", "-", "-", o["state"], "-", "-", "-",
                  f"{o['requests']} requests", o["path"]] for o in m.get("older") or ()]
    table(out, ["NAME", "ARCH", "PARAMS", "QUANT", "CONTEXT", "SIZE", "STATE", "DEVICE", "MEM",
                "USED", "EXPIRES", "PATH"], rows, right={"PARAMS", "CONTEXT", "SIZE", "MEM"})


def model_state(m: dict) -> str:
    """resident, absent, unloading, failed, queued with its place (queued:#1), or loading with
    how far (loading:40%)."""
    state, p = m.get("state") or "-", m.get("progress") or {}
    if state == "loading" and p.get("total"):
        return f"loading:{100 * int(p.get('done') or 0) // max(1, int(p['total']))}%"
    if state == "queued" and m.get("position"):
        return f"queued:#{m['position']}"
    return state


def held(m: dict) -> str:
    """The memory a model holds as the budget counts it (an estimate while it loads)."""
    return size(m["memory_bytes"]) if m.get("memory_bytes") and m.get("state") != "absent" else "-"


def used(m: dict) -> str:
    if m.get("state") in (None, "absent") or not m.get("last_used"):
        return "-"
    return duration(time.time() - m["last_used"])


def expires(m: dict) -> str:
    """4m59s (from now); never (the default, keep_alive -1); busy (in use: the clock starts when idle)."""
    if m.get("state") != "resident":
        return "-"
    if m.get("expires_at") is None:
        return "never" if m.get("default") or (m.get("keep_alive") or 0) < 0 else "busy"
    return duration(m["expires_at"] - time.time())


def show_model(out, m: dict) -> None:
    """What `model show NAME` prints: the file, and how its weights are held and multiplied."""
    print(f"{m['name']}: {m['architecture'] or '-'}, {_count(m['parameters'])} parameters, "
          f"{m['quantization'] or '-'}, file {size(m['file_size']) if m['file_size'] else '-'}: {m['path']}",
          file=out)
    if m["error"]:
        print(f"error: {m['error']}", file=out)
    mem = m.get("memory")
    if m.get("weights") and mem:
        held = sum(w["bytes"] for w in m["weights"] if w["layout"] != "file blocks (mapped)")
        copies = sum(w["dense_bytes"] for w in m["weights"])
        print(f"loaded on {m['device']}: weights {size(held)} + bf16 copies {size(copies)}, "
              f"compute {mem['compute_dtype']}, "
              f"KV cache {mem['kv_dtype']} {size(mem['kv_bytes'])} ({mem['num_blocks']} blocks of "
              f"{mem['block_size']} tokens), dense copy {mem['dense_copy']}, peak RSS {size(mem['rss'])}",
              file=out)
        if mem.get("engine"):
            print(f"engine: {mem['engine']}", file=out)
        if mem.get("native"):
            print(f"compiled kernels: {mem['native']}", file=out)
        rows = [[w["matrix"], str(w["count"]), w["types"], w["layout"], size(w["bytes"]), w["batched"]]
                for w in m["weights"]]
        table(out, ["MATRIX", "COUNT", "TYPES", "HELD", "BYTES", "BATCHED"], rows,
              right={"COUNT", "BYTES"})
    elif m.get("held"):
        print("not loaded; its tensors would be held as:", file=out)
        rows = [[h["type"], str(h["tensors"]), size(h["bytes"]), h["layout"]] for h in m["held"]]
        table(out, ["TYPE", "TENSORS", "SIZE", "HELD"], rows, right={"TENSORS", "SIZE"})


@command("add PATH [--name NAME] [--replace]  |  model update NAME PATH  |  model rm [--force] NAME...  |  "
         "model show NAME  |  model load NAME [--keep-alive SECONDS]  |  model unload NAME...")
def cmd_model(sh: Shell, io: Streams, args: list[str]) -> int:
    """Add a GGUF model file under a name, remove added models (their files stay), show one, or
    load and unload one.

    `model add PATH` checks the file (a Llama GGUF whose tokenizer llmos can read) and names
    the model after the file, lowercased and without .gguf, unless --name NAME. Every user
    sees it in `models`; `tokens --model NAME` and `gen --model NAME` use it. `model update
    NAME PATH` (or `model add PATH --name NAME --replace`) points NAME at a new file, or at its
    own file rewritten, live: new requests run on it at once, requests in flight finish on the
    old version, which unloads when idle, and contexts go on on the new one. `model rm NAME`
    forgets it; the default model cannot be removed, nor one with requests or contexts on it
    (the error names their processes) unless --force, which ends them. `model show NAME` says how the model's weights are held:
    for the loaded model each kind of matrix, its GGUF types, the layout and bytes it is held
    in and what runs batched steps (a measured bf16 copy, or the held kernel); for others the
    layout each tensor type would get.

    `model load NAME` loads the model now, ahead of the requests that will name it (it waits
    while the model loads, or for room in the memory budget, as a request would), and prints
    its state and driver; --keep-alive SECONDS (or a duration: 90s, 10m, 1h; -1: until evicted)
    is how long it stays loaded once idle, from now on. `model unload NAME...` unloads each as
    soon as it is idle (requests running on it finish first; an open context keeps it loaded);
    the default model is never unloaded.
    """
    if not args:
        raise Usage("missing add, update, rm, show, load or unload")
    sub, rest = args[0], args[1:]
    if sub == "load":
        return _load(sh, io, rest)
    if sub == "unload":
        if not rest:
            raise Usage("missing NAME")
        return _unload(sh, io, rest)
    if sub == "add":
        opts, rest = options(rest, "", ("name=", "replace"), anywhere=True)  # model add PATH --name NAME
        (path,) = operands(rest, "PATH")
        added = sh.call("model_add", path=os.path.abspath(path), name=opts.get("--name"),
                        replace="--replace" in opts)
        print(f"{'updated' if '--replace' in opts else 'added'} model {added['name']}: {added['path']}",
              file=io.stdout)
        return 0
    if sub == "update":
        name, path = operands(rest, "NAME", "PATH")
        added = sh.call("model_add", path=os.path.abspath(path), name=name, replace=True)
        print(f"updated model {added['name']}: {added['path']}", file=io.stdout)
        return 0
    if sub == "show":
        (name,) = operands(rest, "NAME")
        show_model(io.stdout, find_model(sh.call("models"), name))
        return 0
    if sub != "rm":
        raise Usage(f"unknown subcommand {sub!r}")
    opts, rest = options(rest, "", ("force",), anywhere=True)
    if not rest:
        raise Usage("missing NAME")
    return for_each(io, "model", rest,
                    lambda name: sh.call("model_remove", name=name, force="--force" in opts))


def _load(sh: Shell, io: Streams, args: list[str]) -> int:
    from syscalls.runtime.config import parse_keep_alive
    opts, rest = options(args, "", ("keep-alive=",), anywhere=True)     # model load NAME --keep-alive 10m
    (name,) = operands(rest, "NAME")
    keep_alive = opts.get("--keep-alive")
    if keep_alive is not None:
        try:
            keep_alive = parse_keep_alive(keep_alive, "--keep-alive")
        except ValueError as e:
            raise Failure(str(e), 2) from None
    loaded = sh.call("model_load", model=name, keep_alive=keep_alive)
    print(f"model {loaded['model']} is {loaded['state']} ({loaded['driver']})", file=io.stdout)
    return 0


def _unload(sh: Shell, io: Streams, names: list[str]) -> int:
    """model_load with keep_alive 0 for each, in order; the boot driver's model is refused by name."""
    status = 0
    for name in names:
        try:
            print(_unloading(sh.call("model_load", model=name, keep_alive=0)), file=io.stdout)
        except (errors.LLMOSError, Failure) as e:
            io.error("model", error_text(e) if isinstance(e, errors.LLMOSError) else e.message)
            status = 1
    return status


def _unloading(m: dict) -> str:
    from syscalls.runtime.devices import base_driver
    if m["state"] == "absent":
        return f"model {m['model']} is not loaded"
    if m["driver"] and base_driver(m["driver"]) == m["driver"]:      # cpu, cuda0: not cpu@tiny
        raise Failure(f"{m['model']} is the default model (the {m['driver']} driver runs it), "
                      f"which is never unloaded")
    return f"model {m['model']} unloads once idle"


def find_model(models: list[dict], name: str) -> dict:
    for m in models:
        if m["name"] == name:
            return m
    raise errors.ENOENT(f"no model named {name!r} (see models)")
