"""The kernel's model scheduler through a booted llmos: priorities, fairness, aging, STOP/CONT,
limits, the run queue, and what a process's death frees. The model is the tiny random Llama (fast);
what is checked is who gets tokens when, so every check reads the scheduler's own reports
(runqueue, ps) rather than timing anything."""

from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, ROOT, Booted, wait_until
from model.tiny_gguf import write_tiny_gguf
from syscalls import errors

MODEL_SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
LONG = dict(max_tokens=200, ignore_eos=True, temperature=0.0)


def boot(scheduler: str) -> Booted:
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 128\n'
                                      f'block_size = 16\n[scheduler]\n{scheduler}\n' + MODEL_SERVICES)
    return Booted(home).boot()


@pytest.fixture(scope="module")
def strict():
    """Two batch slots, a short queue, aging too slow to matter within a test."""
    system = boot("max_running = 2\nmax_queue = 3\naging_s = 600.0\nquantum = 4.0")
    yield system
    system.discard()


@pytest.fixture(scope="module")
def aging():
    system = boot("max_running = 4\naging_s = 0.01\nband = 5")
    yield system
    system.discard()


def mine(c, pid: int) -> list[dict]:
    return c.runqueue(pid=pid)["requests"]


def test_runqueue_and_ps_follow_a_generation_and_its_end(strict):
    with strict.connect() as c:
        s = c.generate("hello world", **LONG)
        next(s)
        (r,) = mine(c, c.pid)
        assert r["state"] == "running" and r["kv_blocks"] >= 1 and r["prompt_tokens"] > 0
        me = wait_until(lambda: (p := c.ps(pid=c.pid)[0])["kv_blocks"] and p, 10, "ps to show the blocks")
        assert me["state"] == "RUNNING" and me["sequences"] == 1
        wait_until(lambda: c.ps(pid=c.pid)[0]["tokens_out"] > 20, 10, "tokens counted as they stream")
        wait_until(lambda: c.ps(pid=c.pid)[0]["tok_s"] > 0, 10, "a token rate")
        s.close()
        wait_until(lambda: not mine(c, c.pid), 10, "the cancelled request to leave the queue")
        assert c.runqueue()["blocks_used"] == 0
        wait_until(lambda: c.ps(pid=c.pid)[0]["kv_blocks"] == 0, 10, "ps to drop the blocks")


def test_urgent_request_runs_while_less_urgent_ones_are_suspended_and_resume_unchanged(strict):
    prompts = ["the quick brown fox", "hello there, how are you"]
    with strict.connect() as low, strict.connect() as high:
        low.nice(10)
        streams = [low.generate(p, **LONG) for p in prompts]
        for s in streams:
            next(s)
        urgent = high.generate("numbers like 12345", **LONG)
        next(urgent)
        states = {r["pid"]: r["state"] for r in high.runqueue()["requests"] if r["pid"] == low.pid}
        assert states == {low.pid: "suspended"}
        assert {r["state"] for r in mine(high, low.pid)} == {"suspended"}   # both sit out (band)
        rest = [t for ch in urgent for t in ch.tokens]
        assert urgent.result.preemptions == 0 and len(rest) == 199
        outs = []
        for s in streams:
            list(s)
            outs.append([t for ch in s.chunks for t in ch.tokens])
            assert s.result.preemptions >= 1
        # preempted and resumed, a greedy generation is exactly the uninterrupted one
        for p, got in zip(prompts, outs):
            alone = low.generate(p, **LONG)
            assert [t for ch in alone for t in ch.tokens] == got


def test_equal_priorities_share_the_batch_fairly(strict):
    conns = [strict.connect() for _ in range(4)]
    try:
        streams = []
        for i, c in enumerate(conns):           # one by one: four at once could overflow the queue (3)
            streams.append(c.generate(f"hello world {i}", **LONG))
            wait_until(lambda: len(conns[0].runqueue()["requests"]) == i + 1, 10, "the request queued")
        pids = [c.pid for c in conns]

        def generated():
            got = {r["pid"]: r["generated"] for r in conns[0].runqueue()["requests"]}
            return [got.get(p, 0) for p in pids]
        base = generated()                      # from when all four wait: the first had a head start
        got = wait_until(lambda: sum(d := [g - b for g, b in zip(generated(), base)]) >= 120 and d, 30,
                         "120 more tokens generated")
        # two slots, four programs: first come first served would give two of them nothing
        assert min(got) >= 0.5 * sum(got) / 4, got
    finally:
        for s in streams:
            s.close()
        for c in conns:
            c.close()


def test_the_least_urgent_is_not_starved(aging):
    with aging.connect() as low, aging.connect() as high:
        low.nice(19)
        starved = low.generate("the lazy dog", **LONG)
        progressed = False
        for _ in range(20):                    # urgent work, back to back
            hog = high.generate("hello world", **LONG)
            seen = []                          # low's token count, while pid high had a request running
            for _ in hog:
                requests = high.runqueue()["requests"]
                mine_now = [r["generated"] for r in requests if r["pid"] == low.pid]
                if not mine_now or not any(r["pid"] == high.pid and r["state"] == "running" for r in requests):
                    continue
                seen.append(mine_now[0])
                if len(seen) > 1 and seen[-1] > seen[0]:
                    progressed = True          # the nice 19 request got tokens beside pid high's
                    break
            hog.close()
            if progressed:
                break
        starved.close()
        assert progressed


def spawn_generator(c, home: Path, prompt: str, key: str) -> int:
    """A program (its own OS process: STOP must not stop pytest) that generates and stores the ids."""
    script = home / f"gen_{key}.py"
    script.write_text(textwrap.dedent(f"""
        import syscalls
        with syscalls.connect() as os:
            ids = [t for ch in os.generate({prompt!r}, max_tokens=200, ignore_eos=True, temperature=0.0)
                   for t in ch.tokens]
            os.put({key!r}, ids)
    """))
    return c.spawn(argv=[sys.executable, str(script)], env={"PYTHONPATH": str(ROOT)})


def test_stop_suspends_model_work_and_cont_resumes_it_exactly(strict):
    with strict.connect() as c:
        pid = spawn_generator(c, strict.home, "the quick brown fox", "stopped_ids")
        wait_until(lambda: any(r["generated"] > 5 for r in mine(c, pid)), 30, "the program to generate")
        c.kill(pid, "STOP")
        wait_until(lambda: [r["state"] for r in mine(c, pid)] == ["stopped"], 10, "its request held")
        assert c.ps(pid=pid)[0]["state"] == "STOPPED"
        list(c.generate("hello", max_tokens=5, ignore_eos=True))   # past the step that was in flight
        held = mine(c, pid)[0]["generated"]
        other = c.generate("hello world", max_tokens=60, ignore_eos=True, temperature=0.0)
        assert len([t for ch in other for t in ch.tokens]) == 60     # the engine went on meanwhile
        assert mine(c, pid)[0]["generated"] == held and mine(c, pid)[0]["kv_blocks"] > 0
        c.kill(pid, "CONT")
        assert c.wait(pid, timeout=60)["status"] == 0
        alone = [t for ch in c.generate("the quick brown fox", **LONG) for t in ch.tokens]
        assert c.get("stopped_ids")["value"] == alone


def test_killed_program_frees_its_blocks(strict):
    with strict.connect() as c:
        pid = spawn_generator(c, strict.home, "hello world", "never_written")
        wait_until(lambda: any(r["kv_blocks"] for r in mine(c, pid)), 30, "the program's blocks")
        c.kill(pid, "KILL")
        wait_until(lambda: not mine(c, pid), 10, "its request to go")
        assert c.runqueue()["blocks_used"] == 0


def test_sequences_limit(strict):
    with strict.connect() as c, strict.connect() as other:
        c.setrlimit("sequences", 1)
        s = c.generate("hello world", **LONG)
        next(s)
        with pytest.raises(errors.EDQUOT, match=r"pid \d+ has 1 requests running or queued; its "
                                                r"sequences limit is 1"):
            list(c.generate("again", max_tokens=2))
        assert len(other.generate("fine", max_tokens=3, ignore_eos=True).text) >= 0   # not disturbed
        s.close()
        with pytest.raises(errors.EPERM, match="raising sequences"):
            c.setrlimit("sequences", 2)


def test_kv_blocks_limit_at_admission_and_while_generating(strict):
    with strict.connect() as c:
        c.setrlimit("kv_blocks", 2)                             # 2 blocks of 16 tokens
        with pytest.raises(errors.EDQUOT, match=r"the prompt needs \d+ KV blocks of 16 tokens; pid \d+'s "
                                                r"kv_blocks limit is 2"):
            list(c.generate("word " * 40))
        s = c.generate("hello", **LONG)
        with pytest.raises(errors.EDQUOT, match="reached its kv_blocks limit: this request needs 3 blocks"):
            for _ in s:
                pass
        got = [t for ch in s.chunks for t in ch.tokens]
        assert 25 <= len(got) <= 32            # it ran until its 33rd token needed a third block
        assert c.runqueue()["blocks_used"] == 0


def test_tokens_per_minute_throttles_then_refuses(strict):
    with strict.connect() as c:
        c.setrlimit("tokens_per_minute", 20)
        s = c.generate("hello", **LONG)
        next(s)
        wait_until(lambda: [r["state"] for r in mine(c, c.pid)] == ["throttled"], 10, "throttling")
        assert mine(c, c.pid)[0]["generated"] == 20
        wait_until(lambda: c.ps(pid=c.pid)[0]["state"] == "SUSPENDED", 10, "ps to show it")
        with pytest.raises(errors.EDQUOT, match=r"generated 20 tokens in the last minute; its "
                                                r"tokens_per_minute limit is 20 \(try again in \d+ s\)"):
            list(c.generate("more", max_tokens=2))
        s.close()
        wait_until(lambda: not mine(c, c.pid), 10, "the throttled request to go")
        with pytest.raises(errors.EDQUOT, match="tokens_per_minute limit is 20"):
            list(c.generate("later", max_tokens=2))       # the minute counts across requests


def test_bounded_run_queue_says_eagain_with_its_depth_and_positions(strict):
    conns = [strict.connect() for _ in range(6)]
    streams = []
    try:
        for c in conns[:5]:                                     # 2 run, 3 wait: the queue is full
            streams.append(c.generate("hello world", **LONG))
            if len(streams) <= 2:
                next(streams[-1])
        wait_until(lambda: conns[5].runqueue()["ready"] + conns[5].runqueue()["suspended"] == 3, 10,
                   "three waiting")
        positions = sorted(r["position"] for r in conns[5].runqueue()["requests"] if r["position"])
        assert positions == [1, 2, 3]
        waiting = [r["pid"] for r in conns[5].runqueue()["requests"] if r["state"] == "ready"]
        wait_until(lambda: conns[5].ps(pid=waiting[0])[0]["state"] == "READY", 10, "ps to show READY")
        with pytest.raises(errors.EAGAIN, match=r"the run queue is full: 3 requests wait \(max_queue 3\)"):
            list(conns[5].generate("one too many", max_tokens=2))
    finally:
        for s in streams:
            s.close()
        for c in conns:
            c.close()
