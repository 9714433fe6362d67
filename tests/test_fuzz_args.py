"""Property-based, over the whole syscall table, from a raw socket: a wrong-typed or out-of-range
argument gets EINVAL naming it, for every syscall and every argument; and no arguments at all,
well-typed or not, reach the kernel's own-bug path (EIO, counted in kernel_bugs).

The test models the kinds from their names in docs/abi.md (which msgpack types each admits), not
from syscalls/schema.py's checks, so a check that lets a wrong type through fails here.
"""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings, strategies as st

from syscalls import wire
from syscalls.schema import REQUIRED, Arg
from syscalls.table import SYSCALLS
from test_bad_input import Raw, kernel_counters

# Seeded and bounded, so CI sees the same inputs every run and the whole file takes seconds.
SETTINGS = settings(derandomize=True, deadline=None, database=None, print_blob=False,
                    suppress_health_check=list(HealthCheck))


def for_each(cases: dict, check, examples: int) -> None:
    """Run check(case, value) on `examples` values of each case's strategy: one search per case,
    so that every case gets values of its own."""
    for case, strategy in cases.items():
        settings(SETTINGS, max_examples=examples)(given(st.just(case), strategy)(_returning_none(check)))()


def _returning_none(check):
    def run(case, value) -> None:      # @given refuses a test that returns something
        check(case, value)
    return run


TEXT = st.text(st.characters(codec="utf-8"), max_size=12)      # no lone surrogates: not UTF-8
INT = st.integers(-2**63, 2**64 - 1)                             # what msgpack carries
BY_TYPE = {
    "null": st.none(), "bool": st.booleans(), "int": INT, "float": st.floats(),
    "str": TEXT, "bytes": st.binary(max_size=12),
}
ANY = st.recursive(st.one_of(*BY_TYPE.values()),
                   lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                   max_leaves=6)
BY_TYPE |= {"list": st.lists(ANY, max_size=3), "map": st.dictionaries(TEXT, ANY, max_size=3)}

# kind -> the msgpack types it admits: at the top, and (for a container) as its items
TOP = {"int": {"int"}, "float": {"int", "float"}, "bool": {"bool"}, "str": {"str"},
       "bytes": {"bytes"}, "[str]": {"list"}, "[int]": {"list"}, "[message]": {"list"},
       "{str:str}": {"map"}, "{str:int?}": {"map"}, "any": set(BY_TYPE)}
ITEMS = {"[str]": {"str"}, "[int]": {"int"}, "[message]": {"map"}, "{str:str}": {"str"},
         "{str:int?}": {"int", "null"}}


def _of(types: set[str]) -> st.SearchStrategy:
    return st.one_of(*(BY_TYPE[t] for t in sorted(types)))


def _nullable(a: Arg) -> bool:
    return a.nullable or a.default is None


def wrong_type(a: Arg) -> st.SearchStrategy | None:
    """Values of a type the argument does not admit; None for an argument that admits any."""
    admitted = TOP[a.kind] | ({"null"} if _nullable(a) else set())
    choices = [_of(set(BY_TYPE) - admitted)] if set(BY_TYPE) - admitted else []
    if a.kind in ITEMS:
        good, bad = _of(ITEMS[a.kind]), _of(set(BY_TYPE) - ITEMS[a.kind])
        if a.kind.startswith("["):
            choices.append(st.builds(lambda g, b, i: g[:i] + [b] + g[i:],
                                     st.lists(good, max_size=2), bad, st.integers(0, 2)))
        else:
            choices.append(st.dictionaries(TEXT, bad, min_size=1, max_size=2))
            choices.append(st.dictionaries(st.binary(max_size=4), good, min_size=1, max_size=2))
    return st.one_of(*choices) if choices else None


def out_of_range(a: Arg) -> st.SearchStrategy | None:
    """Values of the right type that break the argument's limits: range, length, choices."""
    choices = []
    if a.kind == "int":
        if a.min is not None:
            choices.append(st.integers(-2**63, int(a.min) - 1))
        if a.max is not None and a.max < 2**64 - 1:
            choices.append(st.integers(int(a.max) + 1, 2**64 - 1))
    if a.kind == "float":
        if a.min is not None:
            choices.append(st.floats(max_value=a.min, exclude_max=True))
        if a.max is not None:
            choices.append(st.floats(min_value=a.max, exclude_min=True))
        choices.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    # (no longer than the wire carries: a longer one is refused there, with EPROTO)
    if a.max_len is not None and a.max_len < (wire.MAX_MESSAGE // 2 if a.kind == "str" else wire.MAX_ARRAY):
        too_long = a.max_len + 1
        if a.kind == "str":
            choices.append(st.just("x" * too_long))
        elif a.kind.startswith("{"):        # a map: entries of a value its kind admits
            choices.append(st.just({str(i): "v" if a.kind == "{str:str}" else 1 for i in range(too_long)}))
        else:
            choices.append(st.just([base(a)[0]] * too_long))
    if a.choices is not None:
        choices.append(TEXT.filter(lambda v: v not in a.choices))
    return st.one_of(*choices) if choices else None


def base(a: Arg):
    """A value every limit of the argument admits, for the arguments a call needs beside the one
    under test."""
    if a.choices is not None:
        return a.choices[0]
    if a.kind in ("int", "float"):
        lo, hi = (a.min if a.min is not None else 0), (a.max if a.max is not None else 1 << 30)
        value = min(max(1, lo), hi)
        return int(value) if a.kind == "int" else float(value)
    return {"bool": False, "str": "k", "bytes": b"", "[str]": ["true"], "[int]": [1],
            "[message]": [{"role": "user", "content": "hi"}], "{str:str}": {},
            "{str:int?}": {}, "any": 1}[a.kind]


def required(spec) -> dict:
    return {a.name: base(a) for a in spec.args if a.default is REQUIRED}


class Caller:
    """Sends calls on a raw socket and checks each reply."""

    def __init__(self, llmos):
        self.raw, self.cid, self.sent = Raw(llmos), 0, 0

    def call(self, name: str, args: dict) -> list:
        self.cid += 1
        self.raw.send(wire.call(self.cid, name, args))
        self.sent += 1
        reply = self.raw.reply()
        assert reply[2] == self.cid, reply
        assert reply[1] == wire.OK or reply[1] == wire.ERR and reply[3] != "EIO", \
            f"{name}({args!r}) reached an internal error: {reply}"
        return reply


def test_a_bad_argument_gets_einval_naming_it(llmos):
    caller = Caller(llmos)
    assert {a.kind for spec in SYSCALLS for a in spec.args} <= set(TOP), "a kind the test does not model"
    cases = {(spec, a): st.one_of(*bad) for spec in SYSCALLS for a in spec.args
             if (bad := [s for s in (wrong_type(a), out_of_range(a)) if s is not None])}
    assert {spec.name for spec, _ in cases} == {s.name for s in SYSCALLS if s.args}

    def check(case, value):
        spec, a = case
        reply = caller.call(spec.name, {**required(spec), a.name: value})
        assert reply[1] == wire.ERR and reply[3] == "EINVAL" and f"'{a.name}'" in reply[4], \
            f"{spec.name}({a.name}={value!r}): {reply}"

    for_each(cases, check, examples=4)
    assert kernel_counters(llmos)["kernel_bugs"] == 0
    caller.raw.close()


# Calls that would end the test's own process (kill and exit reach the caller's OS process, whose
# pid the kernel knows) or make the raw socket privileged (hello) are left out of the free-form
# pass; spawn runs only `true`, never as a daemon.
LEFT_OUT = {"kill", "exit", "hello"}
WAITS = {"recv", "wait"}        # a free-form timeout could hold the call for a day


def admitted(a: Arg, spec) -> st.SearchStrategy:
    """Values the argument's row admits."""
    if spec.name in WAITS and a.name == "timeout":
        return st.floats(0, 0.01)
    if a.choices is not None:
        s = st.sampled_from(a.choices)
    elif a.kind in ("int", "float"):
        lo = a.min if a.min is not None else -2**63
        hi = a.max if a.max is not None else 2**63 - 1
        s = st.integers(int(lo), int(hi)) if a.kind == "int" else st.floats(lo, hi, allow_nan=False)
    elif a.kind in ITEMS:
        item = st.fixed_dictionaries({"role": TEXT, "content": TEXT}) if a.kind == "[message]" \
            else _of(ITEMS[a.kind])
        size = min(a.max_len or 3, 3)
        s = st.lists(item, max_size=size) if a.kind.startswith("[") else \
            st.dictionaries(TEXT, item, max_size=size)
    elif a.kind == "any":
        s = ANY
    else:
        s = BY_TYPE[a.kind] if a.max_len is None else \
            st.text(st.characters(codec="utf-8"), max_size=min(a.max_len, 12))
    return s | st.none() if _nullable(a) else s


SPAWN = {"argv": st.lists(TEXT, max_size=2).flatmap(
    lambda rest: st.sampled_from(["true", "", "true\0x", "/bin/true"]).map(lambda p: [p, *rest])),
    "cwd": st.sampled_from([None, "/", "/no/such/dir", "/tmp\0x"]),
    # what the OS refuses in an environment: a NUL anywhere, '=' or nothing as a name
    "env": st.dictionaries(st.sampled_from(["A", "A=B", "A\0", ""]) | TEXT,
                           st.sampled_from(["x", "x\0"]) | TEXT, max_size=2) | st.none(),
    "daemon": st.just(False), "restart": st.just("never")}


def test_no_arguments_reach_the_kernels_own_bug_path(llmos):
    caller = Caller(llmos)

    def arguments(spec) -> st.SearchStrategy:
        given_args = {a.name: SPAWN[a.name] if spec.name == "spawn" and a.name in SPAWN
                      else admitted(a, spec) for a in spec.args}
        needed = {n: s for n, s in given_args.items()
                  if spec.by_name[n].default is REQUIRED or n == "timeout" and spec.name in WAITS}
        optional = {n: s for n, s in given_args.items() if n not in needed}
        return st.fixed_dictionaries(needed, optional=optional)

    cases = {spec.name: arguments(spec) for spec in SYSCALLS if spec.name not in LEFT_OUT}
    spawn = {"spawn": cases.pop("spawn")}      # seven arguments, and the OS's rules for each
    for_each(cases, caller.call, examples=8)
    for_each(spawn, caller.call, examples=80)
    assert kernel_counters(llmos)["kernel_bugs"] == 0
    caller.raw.close()
