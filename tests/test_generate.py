"""generate and chat through a booted llmos: kernel -> inference service -> cpu driver -> back."""

import pytest

from conftest import FAST_CONFIG, Booted
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors
from tiny_system import tiny_system  # noqa: F401

MODEL_SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'


@pytest.fixture(scope="module")
def tiny_llmos(tmp_path_factory):
    import tempfile
    from pathlib import Path
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(
        FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 128\n' + MODEL_SERVICES)
    system = Booted(home).boot()
    system.model = model
    yield system
    system.discard()


def local_greedy(model, prompt: str, max_tokens: int) -> dict:
    """The same request through the engine in this process, for comparison."""
    from drivers.model import Tokenizer
    from drivers.runner import ModelRunner
    from services.inference import Engine, run_in_process
    runner = ModelRunner.from_gguf(model, num_blocks=128)
    engine = Engine(runner.info(), Tokenizer.from_gguf(model))
    engine.add(prompt, {"temperature": 0.0}, max_tokens=max_tokens)
    return next(iter(run_in_process(engine, runner).values()))


def test_generate_streams_what_the_engine_computes(tiny_llmos):
    with tiny_llmos.connect() as c:
        stream = c.generate("hello world", max_tokens=12, temperature=0.0)
        chunks = list(stream)
        assert len(chunks) >= 2                                  # streamed, not one blob
        text = "".join(ch.text for ch in chunks)
        tokens = [t for ch in chunks for t in ch.tokens]
        end = stream.result
        assert end.finish in ("length", "stop") and end.generated_tokens == len(tokens)
        assert end.prompt_tokens > 0 and end.ttft_s >= 0
        me = c.ps(pid=c.getpid())[0]
        assert me["tokens_in"] == end.prompt_tokens and me["tokens_out"] == end.generated_tokens
    want = local_greedy(tiny_llmos.model, "hello world", 12)
    assert tokens == want["tokens"] and text == want["text"]


def test_chat_and_the_text_of_a_whole_answer(tiny_llmos):
    with tiny_llmos.connect() as c:
        reply = c.chat([{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0.0)
        assert isinstance(reply.text, str) and reply.result.finish in ("length", "stop")
        same = c.chat([{"role": "user", "content": "Hi!"}], max_tokens=8, temperature=0.0)
        assert same.text == reply.text                           # greedy is deterministic
        a = c.generate("abc", max_tokens=10, temperature=1.0, seed=7).text
        b = c.generate("abc", max_tokens=10, temperature=1.0, seed=7).text
        assert a == b                                           # same seed, same output


def test_bad_requests_get_specific_errors(tiny_llmos):
    with tiny_llmos.connect() as c:
        with pytest.raises(errors.EINVAL, match="'top_p' must be <= 1"):
            list(c.generate("x", top_p=1.5))
        with pytest.raises(errors.EINVAL, match="'temperature' must be >= 0"):
            list(c.generate("x", temperature=-1.0))
        with pytest.raises(errors.EINVAL, match="context window is 256 tokens"):
            list(c.generate("word " * 400))
        with pytest.raises(errors.ENOENT, match=r"^ENOENT: generate: no model named 'nonesuch' "
                                                r"\(models: smollm2-135m-instruct\)$"):
            list(c.generate("x", model="nonesuch"))
        with pytest.raises(errors.ENOENT, match="is no registered model's file"):
            list(c.generate("x", model="/no/such.gguf"))
        c.model_add(str(tiny_llmos.model), name="tiny-gen")
        for name in ("tiny-gen", str(tiny_llmos.model)):       # its registered name, or its path
            stream = c.generate("x", model=name, max_tokens=2)
            list(stream)
            assert stream.result.generated_tokens >= 1
        c.model_remove("tiny-gen")
        with pytest.raises(errors.EINVAL, match="messages"):
            list(c.chat([{"role": "user"}]))
        after = c.generate("still fine", max_tokens=2, temperature=0.0)
        list(after)                                             # nothing above disturbed it
        assert 1 <= after.result.generated_tokens <= 2


def test_a_cancelled_generation_leaves_the_service_serving(tiny_llmos):
    with tiny_llmos.connect() as c:
        stream = c.generate("count with me", max_tokens=200, temperature=0.0)
        first = next(iter(stream))
        assert first.tokens
        stream.close()                                          # cancel mid-way
        out = c.generate("count with me", max_tokens=3, temperature=0.0)
        assert len([t for ch in out for t in ch.tokens]) == 3 and out.result.finish == "length"


def test_the_real_model_answers(home):
    """SmolLM2-135M-Instruct from the wheel, through everything."""
    (home / "config.toml").write_text(FAST_CONFIG + MODEL_SERVICES)
    system = Booted(home).boot(timeout=300)
    try:
        with system.connect() as c:
            reply = c.chat([{"role": "user", "content": "What is the capital of France?"}],
                           max_tokens=24, temperature=0.0)
            assert "Paris" in reply.text, reply.text
    finally:
        system.shutdown()


def test_a_generation_survives_a_crash_of_the_driver(tiny_system):  # noqa: F811
    """kill -9 of the cpu driver mid-generation: the request is recomputed on the new driver and
    its tokens are exactly those of an uninterrupted run. 2,000 tokens (the long-context tiny model
    of tiny_system) take seconds, so the kill after the first chunk lands mid-generation."""
    import os
    import signal

    from conftest import wait_until
    prompt, n = "the crash test", 2000
    tiny_llmos = tiny_system
    with tiny_llmos.connect() as c:
        want = [t for ch in c.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                                       repetition_penalty=3.0) for t in ch.tokens]
        old = tiny_llmos.service("cpu")
        stream = c.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True,
                            repetition_penalty=3.0)
        got, killed = [], False
        for chunk in stream:
            got += chunk.tokens
            if len(got) >= 5 and not killed:     # chunks carry several tokens when decoding ahead
                os.kill(old["pid"], signal.SIGKILL)
                killed = True
        assert got == want
        assert stream.result.finish == "length" and stream.result.preemptions >= 1
        wait_until(lambda: tiny_llmos.service("cpu")["pid"] != old["pid"], 10, "a new driver")


def test_models_show_the_device_and_memory_of_the_loaded_model(tiny_llmos):
    with tiny_llmos.connect(privileged=True) as c:
        c.model_add(str(tiny_llmos.model), "tiny")
        rows = {m["name"]: m for m in c.models()}
    loaded = rows["tiny"]
    assert loaded["device"] == "cpu" and loaded["architecture"] == "llama"
    assert loaded["memory"]["num_blocks"] == 128 and loaded["memory"]["kv_bytes"] > 0
    assert loaded["memory"]["rss"] > 0
    assert rows["smollm2-135m-instruct"]["device"] is None       # known, not loaded
