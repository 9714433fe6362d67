"""Argument schemas: how the syscall table says what a call takes, and how arguments are checked.

The kernel checks every call against its schema before anything runs, so a handler can trust the
types and ranges of what it receives; a failed check is an EINVAL whose message names the argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

from .errors import EINVAL

REQUIRED = object()


def _is_int(v: Any) -> bool:
    return type(v) is int              # not bool: True is no pid


def _is_float(v: Any) -> bool:
    return type(v) in (int, float)


def _list_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: type(v) is list and all(item(x) for x in v)


def _map_of(item: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: type(v) is dict and all(type(k) is str and item(x) for k, x in v.items())


def _is_str(v: Any) -> bool:
    return type(v) is str


class Kind(NamedTuple):
    """One kind of argument value: the check a value must pass, the annotation of the client's
    stubs, and the words for it in EINVAL messages and the docs."""

    check: Callable[[Any], bool]
    annotation: Any
    text: str


# One row per kind, by the name the table and docs/abi.md use for it.
KINDS: dict[str, Kind] = {
    "int": Kind(_is_int, int, "an integer"),
    "float": Kind(_is_float, float, "a number"),
    "bool": Kind(lambda v: type(v) is bool, bool, "true or false"),
    "str": Kind(_is_str, str, "a string"),
    "bytes": Kind(lambda v: type(v) is bytes, bytes, "bytes"),
    "[str]": Kind(_list_of(_is_str), list, "a list of strings"),
    "[int]": Kind(_list_of(_is_int), list, "a list of integers"),
    "{str:str}": Kind(_map_of(_is_str), dict, "a map of strings to strings"),
    # null stands for "unlimited" in a map of limits (getrlimit's answer passed on as it is)
    "{str:int?}": Kind(_map_of(lambda x: x is None or _is_int(x)), dict,
                       "a map of strings to integers or null"),
    "[message]": Kind(_list_of(lambda x: type(x) is dict), list, "a list of messages (maps)"),
    "any": Kind(lambda v: True, Any, "any value"),
}


@dataclass(frozen=True)
class Arg:
    """One argument: its name, kind (a key of KINDS), default, and the limits a value must keep."""

    name: str
    kind: str
    default: Any = REQUIRED
    nullable: bool = False
    min: float | None = None
    max: float | None = None
    max_len: int | None = None
    choices: tuple | None = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TypeError(f"argument {self.name}: unknown kind {self.kind!r}")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, call: str, value: Any) -> Any:
        """Return the value if it fits, else raise EINVAL naming the argument and the rule."""
        if value is None and (self.nullable or self.default is None):
            return None
        where = f"{call}: argument '{self.name}'"
        if not KINDS[self.kind].check(value):
            raise EINVAL(f"{where} must be {self.kind_text()}, got {_describe(value)}")
        if self.kind == "float":
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise EINVAL(f"{where} must be a finite number, got {value}")
        if self.min is not None and value < self.min:
            raise EINVAL(f"{where} must be >= {_num(self.min)}, got {value}")
        if self.max is not None and value > self.max:
            raise EINVAL(f"{where} must be <= {_num(self.max)}, got {value}")
        if self.max_len is not None and len(value) > self.max_len:
            raise EINVAL(f"{where} is too long: {len(value)} > {self.max_len}")
        if self.choices is not None and value not in self.choices:
            allowed = ", ".join(map(str, self.choices))
            raise EINVAL(f"{where} must be one of {allowed}; got {value!r}")
        return value

    def kind_text(self) -> str:
        return KINDS[self.kind].text + (" or null" if self.nullable or self.default is None else "")

    def doc_type(self) -> str:
        t = self.kind + ("?" if self.nullable or self.default is None else "")
        if self.min is not None or self.max is not None:
            lo = "" if self.min is None else _num(self.min)
            hi = "" if self.max is None else _num(self.max)
            t += f" [{lo}..{hi}]"
        if self.max_len is not None:
            t += f" (len <= {self.max_len})"
        if self.choices is not None:
            t += " (" + "|".join(map(str, self.choices)) + ")"
        return t


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _describe(value: Any) -> str:
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            bytes: "bytes", list: "a list", dict: "a map", type(None): "null"}.get(type(value))
    return name or type(value).__name__


# What the kernel may add to the caller map of a call it forwards, beyond pid, uid, privileged and
# txid: the names a row's ``caller`` lists, each with the words docs/abi.md and the table use.
CALLER_CONTEXT: dict[str, str] = {
    "priority": "the process's priority now (-20 .. 19)",
    "stopped": "true while the process is stopped (kill -STOP)",
    "limits": "its model limits that are set: a map of kv_blocks, sequences, tokens_per_minute "
              "to integers",
    "storage_allowance": "{pid, limit, left} when the process has a storage_bytes limit: the limit "
                         "and the bytes it may still add",
}


@dataclass(frozen=True)
class Syscall:
    """One row of the syscall table."""

    name: str
    target: str                      # "kernel", or the name of the service that handles it
    args: tuple[Arg, ...] = ()
    result: str = "null"
    errors: tuple[str, ...] = ()
    doc: str = ""
    privilege: str | None = None     # "admin": only a privileged process may make the call;
                                     # "owner": only a process of root or of the kernel's OS user
    idempotent: bool = False         # safe to run twice: retried if its service dies mid-call
    stream: bool = False             # answered by CHUNK messages and an END
    resumable: bool = False          # a stream the kernel resubmits when its service dies: its
                                     # CHUNKs' "tokens" are kept, and the new call's args carry
                                     # resume = {tokens} (docs/architecture.md, "Calls when a
                                     # service dies")
    caller: tuple[str, ...] = ()     # caller context the handler needs (keys of CALLER_CONTEXT)
    by_name: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name.update({a.name: a for a in self.args})
        if self.privilege not in (None, "admin", "owner"):
            raise TypeError(f"syscall {self.name}: unknown privilege {self.privilege!r}")
        if self.resumable and not self.stream:
            raise TypeError(f"syscall {self.name}: only a stream can be resumable")
        unknown = set(self.caller) - set(CALLER_CONTEXT)
        if unknown:
            raise TypeError(f"syscall {self.name}: unknown caller context {sorted(unknown)}")

    def check_args(self, args: Any) -> dict:
        """Validate a call's arguments; fill in defaults; reject unknown and missing ones."""
        if not isinstance(args, dict):
            raise EINVAL(f"{self.name}: arguments must be a map of name to value, got {_describe(args)}")
        for key in args:
            if key not in self.by_name:
                known = ", ".join(self.by_name) or "none"
                raise EINVAL(f"{self.name}: unknown argument '{key}' (it takes: {known})")
        out = {}
        for a in self.args:
            if a.name in args:
                out[a.name] = a.check(self.name, args[a.name])
            elif a.required:
                raise EINVAL(f"{self.name}: missing required argument '{a.name}' ({a.kind_text()})")
            else:
                out[a.name] = a.default
        return out
