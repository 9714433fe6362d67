"""Models paged in and out under a memory budget (issue 14, items 2, 3 and 7): keep_alive, LRU
eviction of idle models, loads that wait for room and then fail by name, never an eviction under
a running request or an open context (a cache context excepted), a live update while requests
run, and a model file deleted while resident.

One llmos boots with a tiny model on the boot driver and a budget that holds it plus two more
tiny models, but not three; the models are tiny random GGUFs of the same shape, so each costs
the same, and their drivers load in a second or two.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, FAST_SUPERVISION, Booted, run_cli, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors
from test_llmsh import sh, table
from userland.shell.builtin import size

KV_BLOCKS = 1024        # of 16 tokens: a stream of 15,000 tokens fits
CONTEXT = 16384
LOAD_TIMEOUT = 2.0


def footprint(path: Path) -> tuple[int, int]:
    """(measured, estimated) bytes of a tiny model as the Pager counts them."""
    from drivers.runner import ModelRunner
    from services.inference.pager import estimate
    from syscalls.runtime.config import DriverConfig
    info = ModelRunner.from_gguf(path, num_blocks=KV_BLOCKS, native="never").info()
    pool = KV_BLOCKS * 16 * 2 * 2 * 2 * 16 * 4          # blocks, tokens, layers, K+V, heads, dim, fp32
    return info["weight_bytes"] + pool, estimate(path, DriverConfig(kv_blocks=KV_BLOCKS), 1 << 30)["total"]


@pytest.fixture(scope="module")
def system():
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    boot_model = write_tiny_gguf(home / "boot.gguf", context=CONTEXT, seed=1)
    measured, estimated = footprint(boot_model)
    # the boot model and one more fit with room for a third's estimate; a third resident does not
    budget = 2 * measured + estimated + measured // 2
    (home / "config.toml").write_text(
        FAST_SUPERVISION + '\n[gateway]\nlisten = "127.0.0.1:0"\n' + f'\n[driver]\ndevice = "cpu"\nmodel = "{boot_model}"\nkv_blocks = {KV_BLOCKS}\n'
        f'\n[models]\nmemory_budget = {budget}\nkeep_alive = 60.0\nload_timeout = {LOAD_TIMEOUT}\n'
        '[services]\nenabled = ["storage", "tokenizer", "driver", "inference"]\n')
    booted = Booted(home).boot(timeout=120)
    booted.budget = budget
    booted.files = {name: write_tiny_gguf(home / f"{name}.gguf", context=CONTEXT, seed=seed)
                    for name, seed in (("a", 2), ("b", 3), ("c", 4), ("d", 5))}
    with booted.connect(privileged=True) as c:
        c.model_add(str(boot_model), "boot")
        for name, path in booted.files.items():
            c.model_add(str(path), name)
    from test_gateway import advertised
    booted.url = advertised(booted)["advertised"]["url"]
    try:
        yield booted
    finally:
        booted.shutdown()
        shutil.rmtree(home, ignore_errors=True)


def rows(c) -> dict[str, dict]:
    return {m["name"]: m for m in c.models()}


def rows_of(system) -> dict[str, dict]:
    with system.connect() as c:
        return rows(c)


def state(c, name: str) -> str:
    return rows(c)[name]["state"]


def gen(c, model: str, prompt: str = "hello", **kw) -> list[int]:
    stream = c.generate(prompt, model=model, temperature=0.0, max_tokens=kw.pop("max_tokens", 4), **kw)
    return [t for chunk in stream for t in chunk.tokens]


def unload(c, *names: str) -> None:
    """Unload the named models (a request with keep_alive 0) and wait until they are gone."""
    for name in names:
        if state(c, name) == "resident":
            gen(c, name, keep_alive=0)
    for name in names:
        wait_until(lambda: state(c, name) == "absent", 20, f"{name} unloaded")


class Streaming:
    """A long generation on model, in a thread that owns its connection, until stop(); its first
    chunk is awaited. tokens grows as chunks come."""

    def __init__(self, system, model: str, prompt: str = "on and on", nice: int = 0):
        self.system, self.model, self.prompt, self.nice = system, model, prompt, nice
        self.first, self.done, self.quit = threading.Event(), threading.Event(), threading.Event()
        self.tokens, self.error, self.finish = [], None, None
        self.arrived: list[tuple[float, int]] = []         # (monotonic time, tokens) per chunk
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.first.wait(60), "the stream never started"

    def _run(self):
        try:
            with self.system.connect() as c:
                if self.nice:
                    c.nice(self.nice)
                stream = c.generate(self.prompt, model=self.model, max_tokens=15000, temperature=0.0,
                                    ignore_eos=True)
                for chunk in stream:
                    self.tokens += chunk.tokens
                    self.arrived.append((time.monotonic(), len(chunk.tokens)))
                    self.first.set()
                    if self.quit.is_set():
                        stream.close()
                        break
                else:
                    self.finish = stream.result.finish
        except errors.LLMOSError as e:
            self.error = e
        finally:
            self.first.set()
            self.done.set()

    def stop(self):
        self.quit.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_budget_evicts_the_least_recently_used_idle_model(system):
    with system.connect(privileged=True) as c:
        unload(c, "a", "b", "c", "d")
        gen(c, "a")
        gen(c, "b")
        assert {n: state(c, n) for n in "ab"} == {"a": "resident", "b": "resident"}
        gen(c, "a")                     # a is now more recently used than b
        gen(c, "c")                     # no room for c: b goes, a stays
        now = rows(c)
        assert (now["a"]["state"], now["b"]["state"], now["c"]["state"]) == ("resident", "absent", "resident")
        assert "cpu@b" not in {s["name"] for s in c.services()}
        assert now["boot"]["driver"] == "cpu" and now["boot"]["expires_at"] is None
        assert sum(r["memory_bytes"] for r in now.values() if r["state"] == "resident") <= system.budget
        assert now["c"]["budget"] == system.budget and now["c"]["expires_at"] > now["c"]["last_used"]
    # llmsh's models and llmos status show the same
    r = sh(system.home, "models")
    shown = {row["NAME"]: row for row in table(r.stdout)}
    assert (shown["c"]["STATE"], shown["b"]["STATE"], shown["boot"]["EXPIRES"]) == ("resident", "absent", "never")
    assert re.fullmatch(r"\d+s", shown["c"]["USED"]) and re.fullmatch(r"(\d+m)?\d+s", shown["c"]["EXPIRES"])
    assert shown["b"]["MEM"] == shown["b"]["EXPIRES"] == "-"
    r = run_cli(system.home, "model", "unload", "c")
    assert (r.returncode, r.stdout) == (0, "llmos: model c unloads once idle\n"), r.stderr
    with system.connect() as c:
        wait_until(lambda: state(c, "c") == "absent", 20, "c unloaded (llmos model unload)")
    r = run_cli(system.home, "model", "load", "c", "--keep-alive", "10m")
    assert (r.returncode, r.stdout) == (0, "llmos: model c is resident (cpu@c)\n"), r.stderr
    assert rows_of(system)["c"]["keep_alive"] == 600
    r = run_cli(system.home, "model", "load", "c", "--keep-alive", "soon")
    assert r.returncode == 2 and "--keep-alive must be seconds or a duration" in r.stderr
    status = run_cli(system.home, "status").stdout
    assert f"(memory budget {size(system.budget)}," in status
    assert any(line.split()[:3] == ["c", "resident", "cpu@c"] and line.split()[-1] != "-"
               for line in status.splitlines())


def test_keep_alive_per_request(system):
    """keep_alive 0 unloads the model as soon as it is idle; -1 keeps it (no expiry); a short
    one unloads it that long after its last use."""
    with system.connect(privileged=True) as c:
        unload(c, "c", "d")
        gen(c, "a", keep_alive=-1)
        r = rows(c)["a"]
        assert r["state"] == "resident" and r["expires_at"] is None and r["keep_alive"] == -1
        gen(c, "a", keep_alive=0.5)
        r = rows(c)["a"]
        assert r["keep_alive"] == 0.5 and r["expires_at"] == pytest.approx(r["last_used"] + 0.5, abs=0.05)
        wait_until(lambda: state(c, "a") == "absent", 20, "a unloaded after its keep_alive")
        gen(c, "a", keep_alive=0)
        wait_until(lambda: state(c, "a") == "absent", 20, "a unloaded when idle")
        with pytest.raises(errors.EINVAL, match="keep_alive"):
            gen(c, "a", keep_alive=-5)


def test_no_eviction_under_a_running_request_a_load_waits_then_fails_by_name(system):
    """Two models stream: a request for a third waits in the queue, shown queued with its
    position, and gets EAGAIN naming the budget after load_timeout; once a stream ends, a
    request for the third evicts that idle model and runs."""
    with system.connect(privileged=True) as c:
        unload(c, "a", "b", "c", "d")
        first, second = Streaming(system, "a"), Streaming(system, "b")
        try:
            got = {}

            def waiting():
                with system.connect() as w:
                    try:
                        got["tokens"] = gen(w, "c")
                    except errors.LLMOSError as e:
                        got["error"] = e
            t = threading.Thread(target=waiting)
            t.start()
            wait_until(lambda: any(r["state"] == "queued" and r["model"] == "c"
                                   for r in c.runqueue()["requests"]), 10, "c queued in the runqueue")
            queued = rows(c)["c"]
            assert queued["state"] == "queued" and queued["position"] == 1
            t.join(LOAD_TIMEOUT + 20)
            e = got["error"]
            assert isinstance(e, errors.EAGAIN)
            assert "model 'c' could not be loaded: no room for it within the memory budget" in e.message
            assert "a (1 requests)" in e.message and "b (1 requests)" in e.message
            assert not first.done.is_set() and not second.done.is_set()     # neither was evicted
            second.stop()
            assert len(gen(c, "c")) == 4
            now = rows(c)
            assert (now["a"]["state"], now["b"]["state"], now["c"]["state"]) == ("resident", "absent", "resident")
            assert not first.done.is_set() and first.error is None
        finally:
            first.stop()
            second.stop()


def test_open_contexts_keep_their_model_and_a_cache_context_does_not(system):
    """A model with an open context is not evicted under the budget (an older model goes
    instead) nor unloaded by keep_alive 0; a load that finds every model kept so gets EAGAIN
    naming the pid whose contexts keep them; once a context closes its model goes. A context
    opened with cache keeps nothing: its model unloads, and its next turn loads it again and
    recomputes (cached_tokens 0)."""
    hi = [{"role": "user", "content": "Hi"}]
    with system.connect(privileged=True) as c:
        unload(c, "a", "b", "c", "d")
        me = c.getpid()
        on_a = c.open_context(system="Be brief.", model="a")
        gen(c, "b")
        gen(c, "c")                 # no room for c: b goes, though a was used before it
        now = rows(c)
        assert (now["a"]["state"], now["b"]["state"], now["c"]["state"]) == ("resident", "absent", "resident")
        assert now["a"]["expires_at"] is None
        on_c = c.open_context(model="c")
        gen(c, "a", keep_alive=0)
        gen(c, "c", keep_alive=0)
        with pytest.raises(errors.EAGAIN) as e:
            gen(c, "b")
        assert f"a (0 requests; contexts open in pid {me}: 1)" in e.value.message
        assert f"c (0 requests; contexts open in pid {me}: 1)" in e.value.message
        # the Pager looked when those keep_alive 0 calls ended, seconds ago: both stay
        assert (state(c, "a"), state(c, "c")) == ("resident", "resident")
        c.close_context(on_c)
        wait_until(lambda: state(c, "c") == "absent", 20, "c unloaded once its context closed")
        assert len(gen(c, "b")) == 4
        c.close_context(on_a)
        unload(c, "a", "b")

        cache = c.open_context(system="Be brief.", model="a", cache=True)
        first = c.chat(hi, ctx=cache, max_tokens=3, temperature=0.0)
        assert first.text is not None and first.result.finish in ("stop", "length")
        gen(c, "a", keep_alive=0)
        wait_until(lambda: state(c, "a") == "absent", 20, "a unloaded under its cache context")
        turn = c.chat([{"role": "user", "content": "Again"}], ctx=cache, max_tokens=3, temperature=0.0)
        assert turn.text is not None and turn.result.finish in ("stop", "length")
        assert turn.result.cached_tokens == 0 and state(c, "a") == "resident"
        (row,) = [x for x in c.contexts() if x["ctx"] == cache]
        assert row["model"] == "a" and row["messages"] == 5
        # a turn on the context is a request naming its model: its keep_alive is the model's too
        c.chat([{"role": "user", "content": "Last"}], ctx=cache, max_tokens=3, temperature=0.0, keep_alive=0)
        wait_until(lambda: state(c, "a") == "absent", 20, "a unloaded after a turn with keep_alive 0")
        c.close_context(cache)


def test_the_kv_blocks_limit_counts_every_model(system):
    """A process's kv_blocks limit counts its blocks on every model: its idle context on a gives
    its blocks back for a request on b that needs them, and a prompt on b that cannot fit beside
    its request holding blocks on a is EDQUOT at once, naming what a holds."""
    text = "The quick brown fox jumps over the lazy dog. " * 6
    with system.connect(privileged=True) as root:
        unload(root, "c", "d")
    with system.connect() as c:
        ctx = c.open_context(model="a")
        c.chat([{"role": "user", "content": text}], ctx=ctx, max_tokens=2, temperature=0.0).text
        (row,) = c.contexts()
        on_a = row["kv_blocks"]
        stream = c.generate(text, model="b", max_tokens=1, temperature=0.0)
        list(stream)
        need = stream.result.prompt_tokens // 16 + 1         # blocks of 16 tokens that text takes on b
        assert 3 <= need <= on_a, (need, on_a)
        c.setrlimit("kv_blocks", on_a + 2)          # a's context and b's request do not fit together
        assert len(gen(c, "b", text, max_tokens=4)) == 4
        (row,) = c.contexts()
        assert row["kv_blocks"] == 0, "a's idle context kept its blocks"

        c.setrlimit("tokens_per_minute", 2)         # a's request holds its blocks, throttled
        held = c.generate(text, model="a", max_tokens=50, temperature=0.0, ignore_eos=True)
        assert next(iter(held)).tokens
        with pytest.raises(errors.EDQUOT) as e:
            gen(c, "b", text)
        assert f"kv_blocks limit is {on_a + 2}, of which its requests hold " in e.value.message
        assert re.search(r"on other models \(a: \d+\)$", e.value.message), e.value.message
        held.close()


def test_an_urgent_request_on_one_model_runs_before_low_priority_work_on_another(system):
    """Four nice-10 streams decode on b; an urgent (nice 0) request on a: the device's turns go
    to a's steps while it runs, so b's streams get far fewer tokens meanwhile than a does (each
    of them would get about as many as a, were the two drivers stepping side by side)."""
    with system.connect(privileged=True) as c:
        unload(c, "c", "d")
        gen(c, "a")
        gen(c, "b")
        lows = [Streaming(system, "b", prompt=f"low {i}", nice=10) for i in range(4)]
        try:
            stream = c.generate("urgent", model="a", max_tokens=200, temperature=0.0, ignore_eos=True)
            times = []
            for chunk in stream:
                times += [time.monotonic()] * len(chunk.tokens)
            assert len(times) == 200 and all(not s.done.is_set() for s in lows)
            start, end = times[0], times[-1]
            meanwhile = sum(n for s in lows for t, n in s.arrived if start < t < end)
        finally:
            for s in lows:
                s.stop()
        assert meanwhile < 200, f"b's streams got {meanwhile} tokens while a generated 200"


def test_a_model_bigger_than_the_budget_is_refused_at_once(system):
    with system.connect(privileged=True) as c:
        with pytest.raises(errors.EIO, match=r"more than the whole memory budget"):
            gen(c, "smollm2-135m-instruct")
        assert rows(c)["smollm2-135m-instruct"]["state"] == "failed"
        assert "memory budget" in rows(c)["smollm2-135m-instruct"]["error"]


def test_live_update_while_requests_run(system):
    """model_add with replace while a stream runs on the model: the stream goes on on the old
    file, new requests get the new file's tokens at once, a context goes on on the new version
    (recomputed), models shows the new version, and the old one unloads once idle."""
    from test_models_on_demand import in_process
    new_file = write_tiny_gguf(system.home / "d-v2.gguf", context=CONTEXT, seed=11)
    want_new = in_process(new_file, "hello", 4)["tokens"]
    with system.connect(privileged=True) as c:
        unload(c, "a", "b", "c")
        ctx = c.open_context(system="Be brief.", model="d")
        c.chat([{"role": "user", "content": "Hi"}], ctx=ctx, max_tokens=3, temperature=0.0).text
        old = Streaming(system, "d")
        before = rows(c)["d"]
        try:
            c.model_add(str(new_file), "d", replace=True)
            at_update = len(old.tokens)
            assert gen(c, "d") == want_new
            turn = c.chat([{"role": "user", "content": "Again"}], ctx=ctx, max_tokens=3, temperature=0.0)
            turn.text
            assert turn.result.cached_tokens == 0 and turn.result.finish in ("stop", "length")
            now = rows(c)["d"]
            assert now["path"] == str(new_file) and now["version"] != before["version"]
            assert now["state"] == "resident" and now["driver"] != before["driver"]
            assert [o["driver"] for o in now["older"]] == [before["driver"]]
            assert not old.done.is_set(), "the old stream ended before the update was tried"
        finally:
            old.stop()
        assert old.error is None
        n = min(len(old.tokens), at_update + 200)
        assert n > at_update
        assert old.tokens[:n] == in_process(system.files["d"], "on and on", n, ignore_eos=True)["tokens"]
        wait_until(lambda: rows(c)["d"]["older"] == [], 20, "the old version of d unloaded")
        assert before["driver"] not in {s["name"] for s in c.services()}
        c.close_context(ctx)


def test_a_model_file_deleted_while_resident(system):
    """Its requests go on while it is loaded; once unloaded, the next request gets EIO saying the
    file is gone, models says why, and other models answer as before."""
    victim = system.home / "gone.gguf"
    shutil.copy(system.files["a"], victim)
    with system.connect(privileged=True) as c:
        c.model_add(str(victim), "gone")
        assert len(gen(c, "gone")) == 4
        victim.unlink()
        assert len(gen(c, "gone", keep_alive=0)) == 4
        wait_until(lambda: state(c, "gone") != "resident", 20, "gone unloaded")
        with pytest.raises(errors.EIO, match=r"model 'gone' could not be loaded: its file .*gone.gguf is gone"):
            gen(c, "gone")
        assert rows(c)["gone"]["error"]
        assert len(gen(c, "b")) == 4
        assert len(list(c.generate("still", max_tokens=2))) >= 1
        c.model_remove("gone")


def test_a_budget_smaller_than_the_smallest_model_is_refused_at_boot():
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    try:
        (home / "config.toml").write_text(FAST_CONFIG + '\n[models]\nmemory_budget = "1MB"\n'
                                          '[services]\nenabled = ["storage", "tokenizer", "driver", "inference"]\n')
        r = run_cli(home, "boot", "--timeout", "30", timeout=60)
        assert r.returncode == 1
        assert "models.memory_budget '1MB' is 1000000 bytes, less than the smallest model" in r.stderr
        assert "smollm2-135m-instruct" in r.stderr
    finally:
        run_cli(home, "shutdown", timeout=30)
        shutil.rmtree(home, ignore_errors=True)


def test_the_gateway_lists_every_model_and_honours_keep_alive(system):
    """/v1/models and /api/tags list every registered model, /api/ps the resident ones with
    expires_at; Ollama's keep_alive (a duration, or seconds) is the model's from then on."""
    import datetime

    import ollama
    import openai
    client = ollama.Client(host=system.url, timeout=60)
    with system.connect(privileged=True) as c:
        unload(c, "a", "b", "c", "d")
        names = set(rows(c))
    oai = openai.OpenAI(base_url=system.url + "/v1", api_key="unused", max_retries=0)
    assert {m.id for m in oai.models.list().data} == names
    assert oai.models.retrieve("c").id == "c"
    assert {m.model for m in client.list().models} == names
    assert [m.model for m in client.ps().models] == ["boot"]
    (boot,) = client.ps().models
    assert boot.expires_at.year > 2300                   # the boot driver's model never unloads

    r = client.generate(model="c", prompt="hello", keep_alive="10m", options={"num_predict": 2})
    assert r.done
    loaded = {m.model: m for m in client.ps().models}
    assert set(loaded) == {"boot", "c"} and loaded["c"].size > 0
    left = loaded["c"].expires_at - datetime.datetime.now(datetime.timezone.utc)
    assert 9 * 60 < left.total_seconds() <= 10 * 60
    client.chat(model="c", messages=[{"role": "user", "content": "hi"}], keep_alive=0,
                options={"num_predict": 2})
    wait_until(lambda: [m.model for m in client.ps().models] == ["boot"], 20, "c unloaded (keep_alive 0)")
    # an empty prompt loads (ollama run's warm-up), and with keep_alive 0 unloads (ollama stop)
    assert client.generate(model="d", prompt="", keep_alive=-1).done_reason == "load"
    assert {m.model: m.expires_at.year for m in client.ps().models}["d"] > 2300
    assert client.generate(model="d", prompt="", keep_alive=0).done_reason == "unload"
    wait_until(lambda: [m.model for m in client.ps().models] == ["boot"], 20, "d unloaded (ollama stop)")
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="c", prompt="x", keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error
