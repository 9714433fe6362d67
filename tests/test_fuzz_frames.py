"""A property-based campaign of frames from raw sockets, 10^4 in CI (bench/fuzz.py runs 10^5):
well-formed calls of every syscall with fuzzed arguments, headers of the wrong types and shapes,
byte-mutated frames, CANCELs and message types a program may not send, on the programs socket;
and forged frames on the services socket. The system runs the tiny model, so the inference and
tokenizer services see the arguments too.

What must hold: every call is answered and no answer is EIO (the kernel's, or a service's, own-bug
path: an argument of a kind the schema let through); no kernel_bug or op_failed in any log; every
forged service frame is dropped and counted; the kernel's and the services' memory stays flat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from conftest import wait_until
from syscalls import wire
from syscalls.table import BY_NAME, SYSCALLS
from test_fuzz_args import ANY, BY_TYPE, INT, SPAWN, TEXT, admitted, out_of_range, wrong_type
from tiny_system import tiny_system  # noqa: F401

# -- what a frame may be ----------------------------------------------------------------------------
# Calls whose free-form arguments could reach the test's own OS process (kill: the kernel signals
# a connected program's OS process) or run an arbitrary program (spawn) get arguments of their own.
KILL_PIDS = st.sampled_from([1, 1 << 22, (1 << 31) - 1])      # the kernel, or no process at all
GENERATION_CAPS = {"max_tokens": st.integers(1, 4), "ignore_eos": st.just(False)}
WAITS = {"recv", "wait"}
# Arguments whose values are read past the schema (messages' fields, the "any" constraints): values
# close to the real shape, with the wrong thing inside, beside the free-form ones.
KEYS = st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "name", "type", "function",
                        "arguments", "parameters", "json_schema", "schema", "strict"])
SHAPED = st.recursive(st.one_of(*BY_TYPE.values(), st.sampled_from(["user", "function", "object"])),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS | TEXT, inner, max_size=4),
                      max_leaves=8)
MESSAGE = st.one_of(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]),
                                           "content": TEXT}),
                    st.dictionaries(KEYS, SHAPED, max_size=4))
CONSTRAINT_TYPES = st.sampled_from(["json_object", "json_schema", "text", "regex"]) | SHAPED
FUNCTION = st.fixed_dictionaries({"type": st.just("function") | SHAPED},
                                 optional={"function": st.fixed_dictionaries({}, optional={
                                     "name": TEXT | SHAPED, "parameters": SHAPED, "description": SHAPED})})
SHAPES_OF = {
    "messages": st.lists(MESSAGE, max_size=3),
    "response_format": st.fixed_dictionaries({"type": CONSTRAINT_TYPES}, optional={
        "json_schema": st.fixed_dictionaries({}, optional={"name": SHAPED, "schema": SHAPED}) | SHAPED}),
    "tools": st.lists(FUNCTION, max_size=2) | SHAPED,
    "tool_choice": st.sampled_from(["auto", "none", "required", "f"]) | st.fixed_dictionaries(
        {"type": st.just("function")}, optional={"function": st.fixed_dictionaries({}, optional={"name": SHAPED})}),
}


def arguments(spec) -> st.SearchStrategy:
    """A map of arguments for one call: each argument admitted, of a wrong type, out of range, or
    left out; sometimes one the call does not take."""
    def one(a):
        if spec.name == "kill" and a.name == "pid":
            return st.one_of(KILL_PIDS, *(s for s in (wrong_type(a), out_of_range(a)) if s is not None))
        if spec.name == "spawn" and a.name in SPAWN:
            return SPAWN[a.name]
        if spec.name == "hello" and a.name == "privileged":
            return st.just(False)        # the raw socket must never gain privilege
        if spec.name in WAITS and a.name == "timeout":
            return st.floats(0, 0.01)
        if a.name in GENERATION_CAPS and spec.name in ("generate", "chat"):
            return GENERATION_CAPS[a.name]
        bad = [s for s in (wrong_type(a), out_of_range(a)) if s is not None]
        good = admitted(a, spec)
        if a.name in SHAPES_OF:
            good = st.one_of(good, SHAPES_OF[a.name], SHAPES_OF[a.name])
        return st.one_of(good, good, *bad) if bad else good
    fixed = {a.name: one(a) for a in spec.args if a.required or spec.name in WAITS and a.name == "timeout"}
    optional = {a.name: one(a) for a in spec.args if a.name not in fixed}
    args = st.fixed_dictionaries(fixed, optional=optional)
    if spec.name in ("kill", "spawn", "hello") or spec.name in WAITS or spec.name in ("generate", "chat"):
        return args
    extra = st.dictionaries(TEXT.filter(lambda k: k not in spec.by_name), ANY, max_size=1)
    return st.builds(lambda a, e: {**a, **e}, args, st.one_of(st.just({}), st.just({}), extra))


CALLS = st.one_of(*(st.tuples(st.just(spec.name), arguments(spec)) for spec in SYSCALLS))

# Header confusion: each item of [version, type, id, name, args] of another type or value.
HEADERS = st.lists(st.one_of(st.just(wire.VERSION), st.just(wire.CALL), INT, *BY_TYPE.values()),
                   max_size=7)
SHAPES = st.one_of(
    HEADERS,
    st.builds(lambda v: [v, wire.CALL, 1, "getpid", {}], ANY),           # the version
    st.builds(lambda t, i: [wire.VERSION, t, i], ANY, ANY),               # type and id
    st.builds(lambda n, a: [wire.VERSION, wire.CALL, 1, n, a], ANY, ANY),  # name and args
    st.builds(lambda k, i, rest: [wire.VERSION, k, i, *rest],             # types a program may not send
              st.sampled_from(sorted(wire.TYPE_NAMES)), st.integers(0, 5), st.lists(ANY, max_size=4)),
)
MUTABLE = [wire.call(i, name, args) for i, (name, args) in enumerate([
    ("getpid", {}), ("ps", {"pid": 1}), ("put", {"key": "k", "value": [1, "x"]}),
    ("get", {"key": "k"}), ("tokenize", {"text": "hello"}), ("recv", {"timeout": 0.0}),
    ("chat", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("subscribe", {"topic": "t"}), ("setrlimit", {"resource": "sequences", "limit": 9})], 1)]


def mutate(frame: bytes, rng) -> bytes:
    """A frame with bytes flipped, cut out, put in, or cut short."""
    out = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(len(out))
        op = rng.random()
        if op < 0.4:
            out[pos] = rng.randrange(256)
        elif op < 0.65:
            del out[pos:pos + rng.randint(1, 4)]
        elif op < 0.9:
            out[pos:pos] = rng.randbytes(rng.randint(1, 4))
        else:
            del out[max(pos, 1):]
        if not out:
            out = bytearray(b"\x90")
    return bytes(out)


NOISE = st.one_of(
    SHAPES.map(lambda m: [msgpack.packb(m, use_bin_type=True)]),
    st.lists(st.binary(max_size=8), min_size=0, max_size=3),       # raw bytes, several parts, none
    st.integers(0, 1 << 63).map(lambda i: [wire.cancel(i)]),
)
CALLS_PER_BATCH, NOISE_PER_BATCH = 12, 3
BATCH = 25                  # frames per example: the calls, the noise, and mutations of them all


@st.composite
def batches(draw) -> list:
    """One example: calls and noise drawn by hypothesis, then byte mutations of those frames
    (and of a few fixed ones) from a generator it seeds, which is many times cheaper to draw."""
    calls = draw(st.lists(CALLS, min_size=CALLS_PER_BATCH, max_size=CALLS_PER_BATCH))
    noise = draw(st.lists(NOISE, min_size=NOISE_PER_BATCH, max_size=NOISE_PER_BATCH))
    rng = draw(st.randoms(use_true_random=False))
    frames = [wire.call(1, *c) for c in calls] + [f[0] for f in noise if len(f) == 1 and f[0]] + MUTABLE
    mutations = [[mutate(rng.choice(frames), rng)] for _ in range(BATCH - len(calls) - len(noise))]
    return [("call", c) for c in calls] + [("noise", n) for n in noise + mutations]


def unsafe(frames: list[bytes]) -> bool:
    """A noise frame that decodes into a call the test could not survive: a kill (the kernel would
    signal this process), a spawn of whatever the bytes say, or a privileged hello."""
    if len(frames) != 1:
        return False
    try:
        msg = wire.decode(frames[0])
    except wire.BadMessage:
        return False
    if msg[1] != wire.CALL or type(msg[3]) is not str:
        return False
    args = msg[4]
    return msg[3] in ("kill", "spawn") or msg[3] == "hello" and isinstance(args, dict) and \
        bool(args.get("privileged"))


# -- sending and checking ---------------------------------------------------------------------------
@dataclass
class Tally:
    frames: int = 0
    calls: int = 0
    forged: int = 0
    by_code: dict = field(default_factory=dict)

    def add(self, code: str) -> None:
        self.by_code[code] = self.by_code.get(code, 0) + 1


class Campaign:
    """Raw sockets to a booted system: `calls` sends well-formed calls and matches every answer
    to its call, `noise` sends the rest (answers are checked, not matched), `forger` writes on
    the services socket."""

    def __init__(self, system):
        ctx = zmq.Context.instance()
        self.system, self.tally, self.cid = system, Tally(), 0
        self.calls, self.noise, self.forger = (ctx.socket(zmq.DEALER) for _ in range(3))
        for sock, endpoint in ((self.calls, system.paths.programs_endpoint),
                               (self.noise, system.paths.programs_endpoint),
                               (self.forger, system.paths.services_endpoint)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)

    def close(self) -> None:
        for sock in (self.calls, self.noise, self.forger):
            sock.close(linger=0)

    def send(self, batch: list) -> None:
        """Send a batch, then wait for the answer to every call in it."""
        open_calls = {}
        for kind, item in batch:
            self.tally.frames += 1
            if kind == "call" and item[0] == "exit":
                # exit drops the process's calls in flight unanswered: sent where none are matched
                self.noise.send(wire.call(0, *item))
                self.tally.calls += 1
            elif kind == "call":
                self.cid += 1
                name, args = item
                self.calls.send(wire.call(self.cid, name, args))
                open_calls[self.cid] = (name, args)
                self.tally.calls += 1
            elif not unsafe(item):
                self.noise.send_multipart(item) if item else self.noise.send(b"")
                self.forger.send_multipart(item) if item else self.forger.send(b"")
                self.tally.forged += 1
        deadline = time.monotonic() + 30
        while open_calls:
            assert self.calls.poll(max(0, int((deadline - time.monotonic()) * 1000))), \
                f"no answer within 30 s to {len(open_calls)} calls, e.g. {next(iter(open_calls.values()))!r}"
            msg = msgpack.unpackb(self.calls.recv(), raw=False)
            if msg[1] in (wire.OK, wire.ERR, wire.END):
                call = open_calls.pop(msg[2], None)
                assert call is not None or msg[1] == wire.ERR and msg[3] == "ECANCELED", msg
                self.check(msg, call)
        self.drain_noise()

    def check(self, msg: list, call) -> None:
        code = "OK" if msg[1] != wire.ERR else msg[3]
        self.tally.add(code)
        assert code != "EIO", f"{call!r} reached an internal error: {msg}"

    def drain_noise(self) -> None:
        while self.noise.poll(0):
            msg = msgpack.unpackb(self.noise.recv(), raw=False)
            if msg[1] == wire.ERR:
                self.check(msg, "a noise frame")

    def run(self, examples: int) -> None:
        @settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                  print_blob=False, suppress_health_check=list(HealthCheck),
                  phases=[Phase.generate])      # a live system: a failure is reported as found
        @given(batches())
        def campaign(batch):
            self.send(batch)
        campaign()


def memory(system) -> dict:
    """RSS in bytes of the kernel and of every service process."""
    with system.connect() as c:
        out = {"kernel": c.kstat()["rss"]}
        services = c.services()
    for s in services:
        if s["pid"]:
            with open(f"/proc/{s['pid']}/status") as f:
                rss = next(line for line in f if line.startswith("VmRSS:"))
            out[s["name"]] = int(rss.split()[1]) * 1024
    return out


def counters(system) -> dict:
    with system.connect() as c:
        return c.kstat()["counters"]


def own_bugs(system) -> list[str]:
    """Log lines of the kernel's or a service's own-bug path."""
    return [line for p in system.paths.logs.glob("*.log")
            for line in p.read_text(errors="replace").splitlines()
            if '"kernel_bug"' in line or '"op_failed"' in line]


def fuzz(system, frames: int, report=None) -> Campaign:
    """The whole campaign on a booted system: a warm-up tenth, then the rest, with memory read
    between. Returns the campaign for its tally; raises AssertionError on any failure."""
    before = counters(system)
    campaign = Campaign(system)
    try:
        warm = max(1, frames // BATCH // 10)
        campaign.run(warm)
        start = memory(system)
        campaign.run(frames // BATCH - warm)
        # every forged frame is dropped and counted, once (the kernel reads them in order)
        want = before["forged_service_messages"] + campaign.tally.forged
        wait_until(lambda: counters(system)["forged_service_messages"] >= want, timeout=30,
                   what="the kernel to read every forged service frame")
        end = memory(system)
    finally:
        campaign.close()
    after = counters(system)
    if report:
        report(campaign.tally, start, end, before, after)
    assert after["forged_service_messages"] == want, (want, after)
    assert after["kernel_bugs"] == before["kernel_bugs"] == 0, own_bugs(system)
    assert not own_bugs(system), own_bugs(system)[:5]
    with system.connect() as c:
        assert c.getpid() > 1
        assert {s["state"] for s in c.services()} == {"READY"}, c.services()
    for name, rss in end.items():
        grew = rss - start.get(name, rss)
        assert grew < 24 << 20, f"{name} grew by {grew >> 20} MiB over the campaign ({start} -> {end})"
    return campaign


def syscalls_made(system) -> dict:
    with system.connect() as c:
        return c.kstat()["syscalls"]


def test_ten_thousand_fuzzed_frames_get_no_eio(tiny_system):  # noqa: F811
    before = syscalls_made(tiny_system)
    campaign = fuzz(tiny_system, 10_000)
    made = syscalls_made(tiny_system)
    assert not [n for n in BY_NAME if made.get(n, 0) <= before.get(n, 0)], \
        f"syscalls the campaign never made: {[n for n in BY_NAME if made.get(n, 0) <= before.get(n, 0)]}"
    t = campaign.tally
    assert t.frames >= 10_000 and t.calls > 4_000, t
    # the campaign reaches the handlers, not only the schema: both successes and refusals
    assert t.by_code.get("OK", 0) > 500 and t.by_code.get("EINVAL", 0) > 1000, t.by_code
    assert len(t.by_code) >= 8, t.by_code
