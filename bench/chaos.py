"""The chaos campaign: python bench/chaos.py [--faults 1000] [--seed 1] [--model PATH]

Boots llmos with its HTTP gateway (the tiny random model of tests/model/tiny_gguf.py, or --model:
a GGUF file, or "default" for the model llmos boots with) and runs a mixed load from several
programs while it sends SIGKILL and SIGSTOP to every service (storage, tokenizer, the model's
driver, inference) and to the gateway at random moments:

- puts with compare-and-set, each writer on a key of its own, every acknowledged write recorded;
- generate, greedy and seeded, checked token for token against an undisturbed run;
- chat on contexts, saved to storage and loaded again, checked against an undisturbed run;
- tokenize, checked; send/recv and publish/subscribe between two programs, checked in order;
- spawn/wait of a short program; chat completions through the gateway with the openai package.

A fault goes to a target that is up (READY, or for the gateway listening) and has been for
``--floor`` seconds, so that every fault tests a recovery from a working system, never a start; a SIGSTOP lasts a random time up to twice the ping timeout (the
supervisor kills a service that misses its pongs that long), then SIGCONT. It reports faults by
target, calls made and failed by syscall and error, answers that differ from the undisturbed run,
hung calls, acknowledged writes lost, kernel deaths and kernel bugs, and each target's restart
time (from its old process's death to up again) and down time (from the fault) p50/p99. Exit
status 1 when any count is not 0. Each program pauses a random ``--think`` between its calls.

``Chaos`` is what tests/test_chaos.py runs too, with a few dozen faults.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from conftest import Booted, process_exists  # noqa: E402
from model.tiny_gguf import write_tiny_gguf  # noqa: E402
from syscalls import errors  # noqa: E402

SERVICES = ("storage", "tokenizer", "cpu", "inference")
TARGETS = SERVICES + ("gateway",)
# Supervision for the campaign: the tests' quick pings, and room for the restarts it causes (the
# defaults make a service that dies 5 times a minute FAILED, which is their job, not this one's).
SUPERVISION = """
[supervisor]
ping_interval = 0.2
ping_timeout = 1.0
backoff_base = 0.05
backoff_max = 0.5
max_restarts = 1000000
restart_window = 1.0
"""
HANG_S = 60.0           # a call unanswered this long is hung
FAILED = object()       # what Chaos.call returns for a call that failed
GEN = dict(max_tokens=48, ignore_eos=True, repetition_penalty=1.5)
TURNS = ("Hello there.", "Tell me more.", "And then?")


@dataclass
class Tally:
    calls: Counter = field(default_factory=Counter)          # syscall -> made
    failed: Counter = field(default_factory=Counter)         # (syscall, code) -> failed
    wrong: Counter = field(default_factory=Counter)          # syscall -> answered, but not as undisturbed
    hung: list = field(default_factory=list)                 # (syscall, seconds)
    faults: Counter = field(default_factory=Counter)         # (target, signal) -> sent
    restarts: dict = field(default_factory=lambda: defaultdict(list))   # target -> [seconds dead -> up]
    down: dict = field(default_factory=lambda: defaultdict(list))       # target -> [seconds fault -> up]
    not_back: Counter = field(default_factory=Counter)       # target -> not up again in time
    examples: dict = field(default_factory=dict)             # (syscall, code) -> one message
    lost_writes: int = 0
    writes_acked: int = 0
    kernel_deaths: int = 0
    kernel_bugs: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def failures(self) -> int:
        return sum(self.failed.values()) + sum(self.wrong.values()) + len(self.hung) \
            + self.lost_writes + self.kernel_deaths + self.kernel_bugs + sum(self.not_back.values())


class Chaos:
    """The load, the faults and the checks, on a booted system with its gateway at url."""

    def __init__(self, system: Booted, url: str, model: str, seed: int = 1, workers: int = 2,
                 think: float = 0.01):
        self.system, self.url, self.model = system, url, model
        self.rng = random.Random(seed)
        self.workers = workers
        self.think = think                  # mean pause of a program between two calls
        self.tally = Tally()
        self.stop = threading.Event()
        self.acked: dict[str, tuple[int, int]] = {}          # key -> (value, version) acknowledged
        self.up_since: dict[tuple, float] = {}               # (target, OS pid) -> first seen up
        self.want: dict = {}

    # -- calls, counted ------------------------------------------------------------------------
    def call(self, name: str, fn, *args, **kw):
        """fn(*args, **kw), counted; an error is counted and returned as FAILED."""
        t0, started = time.monotonic(), time.strftime("%H:%M:%S", time.gmtime())
        with self.tally.lock:
            self.tally.calls[name] += 1
        if self.think:          # a program's think time (a load, not a synchronisation)
            time.sleep(random.expovariate(1 / self.think))
        try:
            return fn(*args, **kw)
        except errors.LLMOSError as e:
            took = time.monotonic() - t0
            with self.tally.lock:
                if e.code == "ETIMEDOUT" and took >= HANG_S * 0.9:
                    self.tally.hung.append((name, round(took, 1), f"from {started} UTC"))
                else:
                    self.tally.failed[(name, e.code)] += 1
                    self.tally.examples.setdefault((name, e.code), str(e)[:300])
            return FAILED
        except Exception as e:     # noqa: BLE001 -- a client's failure (HTTP) counts as a failed call
            with self.tally.lock:
                self.tally.failed[(name, type(e).__name__)] += 1
                self.tally.examples.setdefault((name, type(e).__name__),
                                               f"{e} ({e.__cause__!r})"[:300] if e.__cause__ else str(e)[:300])
            return FAILED

    def check(self, name: str, ok: bool, got=None, want=None) -> None:
        if not ok:
            with self.tally.lock:
                self.tally.wrong[name] += 1
                self.tally.examples.setdefault((name, "wrong"), f"got {str(got)[:140]}, not {str(want)[:140]}")

    def connect(self, **kw):
        return self.system.connect(timeout=HANG_S, **kw)

    # -- what an undisturbed run answers --------------------------------------------------------
    def references(self) -> None:
        with self.connect() as c:
            self.want["greedy"] = {p: tokens(c.generate(p, temperature=0.0, **GEN)) for p in PROMPTS}
            self.want["seeded"] = {p: tokens(c.generate(p, temperature=1.2, seed=5, **GEN)) for p in PROMPTS}
            self.want["tokenize"] = {p: c.tokenize(p * 8) for p in PROMPTS}
            ctx, turns = c.open_context(system="Be brief."), []
            for text in TURNS:
                turns.append(tokens(c.chat([{"role": "user", "content": text}], ctx=ctx,
                                           temperature=0.0, **GEN)))
            c.close_context(ctx)
            self.want["turns"] = turns
        self.want["http"] = self.http_chat(None)

    def http_chat(self, counted: str | None):
        import openai
        client = openai.OpenAI(base_url=self.url + "/v1", api_key="chaos", max_retries=8, timeout=HANG_S)

        def ask():
            r = client.chat.completions.create(model=self.model, max_tokens=24, temperature=0.0,
                                               messages=[{"role": "user", "content": "Hello, HTTP"}])
            return r.choices[0].message.content
        return ask() if counted is None else self.call(counted, ask)

    # -- the load --------------------------------------------------------------------------------
    def writer(self, n: int) -> None:
        key, version, value = f"chaos/w{n}", 0, 0
        with self.connect() as c:
            while not self.stop.is_set():
                value += 1
                done = self.call("put", c.put, key, value, if_version=version)
                if done is FAILED:             # an error: where does the key stand now?
                    got = self.call("get", c.get, key)
                    if got is not FAILED:
                        version = got["version"]
                    continue
                version = done["version"]
                with self.tally.lock:
                    self.acked[key] = (value, version)
                    self.tally.writes_acked += 1

    def generator(self, n: int) -> None:
        rng = random.Random(n)
        with self.connect() as c:
            while not self.stop.is_set():
                prompt, kind = rng.choice(PROMPTS), rng.choice(("greedy", "seeded"))
                kw = dict(temperature=0.0) if kind == "greedy" else dict(temperature=1.2, seed=5)
                got = self.call("generate", lambda: tokens(c.generate(prompt, **kw, **GEN)))
                if got is not FAILED:
                    self.check("generate", got == self.want[kind][prompt], got, self.want[kind][prompt])

    def chatter(self, n: int) -> None:
        with self.connect() as c:
            while not self.stop.is_set():
                ctx = self.call("open_context", c.open_context, system="Be brief.")
                if ctx is FAILED:
                    continue
                for i, text in enumerate(TURNS):
                    if i == 1:           # the conversation goes to storage and comes back
                        if self.call("save_context", c.save_context, ctx, f"chaos/ctx{n}") is FAILED:
                            break
                        again = self.call("load_context", c.load_context, f"chaos/ctx{n}")
                        if again is FAILED:
                            break
                        self.call("close_context", c.close_context, ctx)
                        ctx = again
                    got = self.call("chat", lambda: tokens(c.chat(
                        [{"role": "user", "content": text}], ctx=ctx, temperature=0.0, **GEN)))
                    if got is FAILED:
                        break
                    self.check("chat", got == self.want["turns"][i], got, self.want["turns"][i])
                self.call("close_context", c.close_context, ctx)

    def tokenizer(self, n: int) -> None:
        rng = random.Random(100 + n)
        with self.connect() as c:
            while not self.stop.is_set():
                prompt = rng.choice(PROMPTS)
                got = self.call("tokenize", c.tokenize, prompt * 8)
                if got is not FAILED:
                    self.check("tokenize", got == self.want["tokenize"][prompt])

    def messenger(self) -> None:
        with self.connect() as a, self.connect() as b:
            self.call("subscribe", b.subscribe, "chaos/")
            seq = 0
            while not self.stop.is_set():
                seq += 1
                if seq % 2:
                    sent = self.call("send", a.send, b.pid, {"seq": seq})
                else:
                    sent = self.call("publish", a.publish, "chaos/tick", {"seq": seq})
                if sent is FAILED:
                    continue
                got = self.call("recv", b.recv, timeout=HANG_S)
                if got is not FAILED:
                    self.check("recv", got["data"] == {"seq": seq}, got, {"seq": seq})

    def spawner(self) -> None:
        with self.connect() as c:
            while not self.stop.is_set():
                pid = self.call("spawn", c.spawn, ["true"])
                if pid is not FAILED:
                    done = self.call("wait", c.wait, pid, timeout=HANG_S)
                    if done is not FAILED:
                        self.check("wait", done["status"] == 0)

    def http(self) -> None:
        while not self.stop.is_set():
            got = self.http_chat("http chat")
            if got is not FAILED:
                self.check("http chat", got == self.want["http"], got, self.want["http"])

    # -- the faults ------------------------------------------------------------------------------
    def target_pid(self, c, target: str) -> int | None:
        """The OS pid of a target that is up now, None while it is not."""
        if target == "gateway":
            g = next((p for p in c.ps() if p["name"] == "gateway" and p["daemon"]), None)
            return g["os_pid"] if g and g["advertised"].get("state") == "listening" else None
        s = next(s for s in c.services() if s["name"] == target)
        return s["pid"] if s["state"] == "READY" else None

    def faults(self, count: int, gap: float, stop_max: float, targets=TARGETS, floor: float = 2.0) -> None:
        """count faults, a random gap (mean gap) apart, each to a random target once it has been up
        for floor seconds: every fault tests a recovery from a working system, and a target that
        is faulted again before it could do any work (a driver that never finishes a step) is a
        livelock no system escapes, not a finding."""
        watchers = []
        with self.connect() as c:
            for _ in range(count):
                if self.stop.is_set():
                    break
                time.sleep(self.rng.expovariate(1 / gap))   # the campaign's pace, not a synchronisation
                target = self.rng.choice(targets)
                pid = self.up(c, target, None)
                if pid is None:
                    continue
                seen = self.up_since.setdefault((target, pid), time.monotonic())
                if time.monotonic() - seen < floor:       # pacing the campaign, not a synchronisation
                    time.sleep(floor - (time.monotonic() - seen))
                    if self.target_pid(c, target) != pid:
                        continue
                sig = signal.SIGKILL if self.rng.random() < 0.75 else signal.SIGSTOP
                t0 = time.monotonic()
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    continue
                with self.tally.lock:
                    self.tally.faults[(target, sig.name)] += 1
                if sig == signal.SIGSTOP:
                    time.sleep(self.rng.uniform(0.05, stop_max))
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                w = threading.Thread(target=self.restarted, args=(target, pid, t0, sig == signal.SIGKILL),
                                     daemon=True)
                w.start()
                watchers.append(w)
        for w in watchers:
            w.join(HANG_S)

    def up(self, c, target: str, old: int | None, timeout: float = 30.0, survived: bool = False) -> int | None:
        """Wait until target is up under an OS pid other than old (if given), or, survived, under
        old itself, if that process still runs (a SIGSTOP it outlived): its pid."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.target_pid(c, target)
            if pid is not None and pid != old:
                return pid
            if survived and pid == old and process_exists(old):
                return pid
            time.sleep(0.01)
        return None

    def restarted(self, target: str, pid: int, t0: float, killed: bool) -> None:
        """Watch a target after a fault: when its process died (a SIGSTOPped one may outlive it,
        or be killed by the supervisor for missing its pongs), and when it was up again."""
        dead = t0 if killed else None
        with self.connect() as c:
            deadline = time.monotonic() + 30
            while dead is None and time.monotonic() < deadline:
                if not process_exists(pid):
                    dead = time.monotonic()
                elif self.target_pid(c, target) == pid:
                    break                           # it outlived its SIGSTOP
                time.sleep(0.005)
            back = self.up(c, target, pid, survived=dead is None)
        with self.tally.lock:
            if back is None:
                self.tally.not_back[target] += 1
            elif back != pid:
                now = time.monotonic()
                self.up_since.setdefault((target, back), now)
                self.tally.restarts[target].append(now - (t0 if dead is None else dead))
                self.tally.down[target].append(now - t0)

    # -- the campaign ----------------------------------------------------------------------------
    def run(self, faults: int, gap: float = 0.25, stop_max: float = 2.0, targets=TARGETS,
            floor: float = 2.0) -> Tally:
        kernel = self.system.kernel_pid
        self.references()
        load = [self.writer, self.generator, self.chatter, self.tokenizer]
        threads = [threading.Thread(target=f, args=(n,), daemon=True)
                   for f in load for n in range(self.workers)]
        threads += [threading.Thread(target=f, daemon=True) for f in (self.messenger, self.spawner, self.http)]
        for t in threads:
            t.start()
        try:
            self.faults(faults, gap, stop_max, targets, floor)
        finally:
            self.stop.set()
            for t in threads:
                t.join(HANG_S * 2)
            stuck = [t for t in threads if t.is_alive()]
            self.tally.hung += [(t.name, "still running at the end") for t in stuck]
        if not process_exists(kernel) or self.system.paths.kernel_pid() != kernel:
            self.tally.kernel_deaths += 1
            return self.tally
        with self.connect() as c:
            for s in SERVICES:          # every service up at the end
                if self.up(c, s, None) is None:
                    self.tally.not_back[s] += 1
            for key, (value, version) in self.acked.items():
                got = c.get(key)
                if (got["value"], got["version"]) != (value, version):
                    self.tally.lost_writes += 1
            self.tally.kernel_bugs = c.kstat()["counters"]["kernel_bugs"]
        return self.tally


PROMPTS = ("The chaos test", "Once upon a time", "A list of things:")


def tokens(stream) -> list[int]:
    return [t for chunk in stream for t in chunk.tokens]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def boot(model: str | None) -> tuple[Booted, str, str, Path]:
    """llmos with its gateway on a fixed port (a restarted gateway comes back on the same address)."""
    home = Path(tempfile.mkdtemp(prefix="llmos-chaos-", dir="/tmp"))
    if model is None:
        path = write_tiny_gguf(home / "tiny.gguf", context=1024)
        driver = f'\n[driver]\nmodel = "{path}"\nkv_blocks = 512\n'
    elif model == "default":
        path, driver = None, ""
    else:
        path, driver = Path(model).resolve(), f'\n[driver]\nmodel = "{Path(model).resolve()}"\n'
    url = f"http://127.0.0.1:{free_port()}"
    (home / "config.toml").write_text(
        SUPERVISION + driver + '\n[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
        + f'\n[gateway]\nlisten = "{url[len("http://"):]}"\n')
    system = Booted(home).boot(timeout=120)
    name = "chaos"
    with system.connect(privileged=True) as c:
        if path is None:
            name = next(m["name"] for m in c.models() if m.get("default"))
        else:
            c.model_add(str(path), name)
        deadline = time.monotonic() + 30
        while not any(p["name"] == "gateway" and p["advertised"].get("state") == "listening"
                      for p in c.ps()):
            if time.monotonic() > deadline:
                raise AssertionError("the gateway did not start listening")
            time.sleep(0.05)
    return system, url, name, home


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def spare_starts(logs: Path) -> Counter:
    """service -> how many of its starts were its spare process (the supervisor's rule 4), from
    the kernel's log."""
    n: Counter = Counter()
    for path in logs.glob("kernel.log*"):
        for line in path.read_text(errors="replace").splitlines():
            if '"service_started"' in line and '"spare": true' in line:
                with contextlib.suppress(ValueError, KeyError):
                    n[json.loads(line)["service"]] += 1
    return n


def report(t: Tally, took: float, spares: Counter | None = None) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor())
    print(f"{cpu}, {os.cpu_count()} CPUs; {took:.0f} s")
    print(f"faults: {sum(t.faults.values())}")
    for target in TARGETS:
        kills, stops = t.faults[(target, "SIGKILL")], t.faults[(target, "SIGSTOP")]
        r, d = t.restarts.get(target, []), t.down.get(target, [])
        print(f"  {target:<10} SIGKILL {kills:>4}  SIGSTOP {stops:>4}  restarts {len(r):>4}  "
              f"restart p50 {pct(r, 0.5):5.2f} s  p99 {pct(r, 0.99):5.2f} s  max {max(r, default=0):5.2f} s  "
              f"down p50 {pct(d, 0.5):5.2f} s  p99 {pct(d, 0.99):5.2f} s"
              + (f"  from a spare {spares[target]}" if spares and spares[target] else "")
              + (f"  NOT BACK {t.not_back[target]}" if t.not_back[target] else ""))
    print(f"calls: {sum(t.calls.values()):,}")
    for name, n in sorted(t.calls.items(), key=lambda kv: -kv[1]):
        bad = {code: k for (call, code), k in t.failed.items() if call == name}
        print(f"  {name:<13} {n:>8,}  failed {sum(bad.values()):>4} {dict(bad) if bad else ''}"
              + (f"  wrong {t.wrong[name]}" if t.wrong[name] else ""))
    for (name, code), msg in t.examples.items():
        print(f"  e.g. {name} {code}: {msg}")
    print(f"hung calls: {len(t.hung)} {t.hung[:5] if t.hung else ''}")
    print(f"acknowledged writes: {t.writes_acked:,}, lost: {t.lost_writes}")
    print(f"kernel deaths: {t.kernel_deaths}, kernel bugs: {t.kernel_bugs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gap", type=float, default=0.25, help="mean seconds between faults")
    parser.add_argument("--workers", type=int, default=2, help="programs of each kind of load")
    parser.add_argument("--think", type=float, default=0.01, help="mean seconds a program waits between calls")
    parser.add_argument("--keep", action="store_true", help="keep LLMOS_HOME (its logs) when anything failed")
    parser.add_argument("--targets", default=",".join(TARGETS), help="what to fault, comma-separated")
    parser.add_argument("--floor", type=float, default=2.0, help="seconds a target is up before its next fault")
    parser.add_argument("--model", default=None,
                        help='a GGUF file, or "default" (the model llmos boots with); the tiny model if absent')
    args = parser.parse_args()
    system, url, name, home = boot(args.model)
    t0 = time.monotonic()
    try:
        tally = Chaos(system, url, name, args.seed, args.workers, args.think).run(
            args.faults, args.gap, targets=tuple(args.targets.split(",")), floor=args.floor)
    finally:
        took = time.monotonic() - t0
        system.shutdown()
    report(tally, took, spare_starts(system.paths.logs))
    if args.keep and tally.failures():
        print(f"LLMOS_HOME kept: {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return 1 if tally.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
