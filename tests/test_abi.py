"""The syscall table is the single source: the kernel, the services, the stubs and the doc agree."""

import inspect
import re

from kernel import accounting
from kernel.kernel import TRAPS
from services.inference.service import Inference
from services.storage import Storage
from services.tokenizer import TokenizerService
from syscalls import abi, client, errors, wire
from syscalls.schema import CALLER_CONTEXT, REQUIRED
from syscalls.table import SYSCALLS

SERVICE_CLASSES = {"storage": Storage, "tokenizer": TokenizerService, "inference": Inference}


def test_every_kernel_syscall_has_a_handler_and_every_handler_a_syscall():
    kernel_calls = {s.name for s in SYSCALLS if s.target == "kernel"}
    assert kernel_calls == set(TRAPS)


def test_every_service_syscall_is_answered_by_its_service():
    for target, cls in SERVICE_CLASSES.items():
        calls = {s.name for s in SYSCALLS if s.target == target}
        ops = {n[3:] for n in dir(cls) if n.startswith("op_")} - set(cls.internal)
        assert calls == ops, f"{target}: table {sorted(calls)} vs ops {sorted(ops)}"
    targets = {s.target for s in SYSCALLS} - {"kernel"}
    assert targets <= set(SERVICE_CLASSES), "a syscall names a service the test does not know"


def test_doc_matches_table():
    doc = abi.DOC.read_text()
    assert abi.current(doc) == abi.render(), \
        "docs/abi.md is out of date: run `python -m syscalls.abi --write`"


def test_errors_named_in_table_exist():
    for s in SYSCALLS:
        for code in s.errors:
            assert code in errors.CODES, f"{s.name} names unknown error {code}"


def test_client_stubs_follow_the_table():
    for s in SYSCALLS:
        for cls in (client.Connection, client.AsyncConnection):
            method = getattr(cls, s.name)
            params = list(inspect.signature(method).parameters.values())[1:]
            assert [p.name for p in params] == [a.name for a in s.args]
            for p, a in zip(params, s.args):
                want = inspect.Parameter.empty if a.default is REQUIRED else a.default
                assert p.default == want, f"{s.name}.{a.name}"
        assert inspect.iscoroutinefunction(getattr(client.AsyncConnection, s.name))


def test_exceptions_are_typed_and_match_builtins():
    e = errors.from_wire("ESRCH", "no process with pid 9")
    assert isinstance(e, errors.ESRCH) and isinstance(e, ProcessLookupError)
    assert e.code == "ESRCH" and "pid 9" in str(e)
    assert isinstance(errors.from_wire("ETIMEDOUT", "x"), TimeoutError)
    odd = errors.from_wire("EWHATEVER", "from a newer kernel")
    assert type(odd) is errors.LLMOSError and odd.code == "EWHATEVER"


def test_doc_lists_every_key_of_the_caller_the_kernel_sends():
    """Each key the kernel puts in a forwarded call's caller map has a row in docs/abi.md."""
    import ast
    from pathlib import Path
    keys = set()
    for path in (Path(abi.DOC).parent.parent / "kernel").glob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "caller"
                                                 for t in n.targets) and isinstance(n.value, ast.Dict):
                keys |= {k.value for k in n.value.keys if isinstance(k, ast.Constant)}
            elif isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "update" \
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "caller":
                keys |= {k.arg for k in n.keywords}
            elif isinstance(n, ast.Subscript) and isinstance(n.ctx, ast.Store) and \
                    isinstance(n.value, ast.Name) and n.value.id == "caller":
                keys.add(n.slice.value)
    assert {"pid", "uid", "privileged", "txid"} <= keys, "the test no longer finds the caller map"
    # the rest is the caller context rows ask for, each read off the process by accounting.CONTEXT
    assert set(accounting.CONTEXT) == set(CALLER_CONTEXT)
    keys |= set(CALLER_CONTEXT)
    documented = _documented("### The caller, as a service sees it")
    assert keys == documented, f"undocumented: {sorted(keys - documented)}; " \
                               f"documented but never sent: {sorted(documented - keys)}"
    section = abi.DOC.read_text().split("### The caller, as a service sees it", 1)[1]
    for key in CALLER_CONTEXT:
        present = next(line for line in section.splitlines() if line.startswith(f"| `{key}` |"))
        named = set(re.findall(r"\w+", present.split("|")[2]))
        for s in SYSCALLS:
            assert (s.name in named) == (key in s.caller), \
                f"docs/abi.md: `{key}` is present for the calls whose row names it; {s.name}?"


def test_doc_lists_every_usage_key_and_the_kernel_counts_each():
    assert set(accounting.CHARGED) == set(wire.USAGE)
    documented = _documented("### Usage, as a service reports it")
    assert documented == set(wire.USAGE), f"docs/abi.md's usage table says {sorted(documented)}"


def _documented(heading: str) -> set[str]:
    """The keys in the first column of the table under a heading of docs/abi.md."""
    section = abi.DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
