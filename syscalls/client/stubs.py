"""The syscall methods of both connections, generated from the syscall table.

Each row of ``syscalls.table`` becomes one method with the row's argument names, defaults and
documentation, so no stub is written by hand and a new syscall needs no client change.
"""

from __future__ import annotations

import inspect

from ..schema import KINDS, REQUIRED, Syscall
from ..table import SYSCALLS


def install(cls: type, asynchronous: bool) -> None:
    """Give cls one method per syscall; coroutines where asynchronous."""
    for spec in SYSCALLS:
        setattr(cls, spec.name, _stub(spec, asynchronous))


def _signature(spec: Syscall) -> inspect.Signature:
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for a in spec.args:
        params.append(inspect.Parameter(
            a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=inspect.Parameter.empty if a.default is REQUIRED else a.default,
            annotation=KINDS[a.kind].annotation))
    return inspect.Signature(params)


def _doc(spec: Syscall) -> str:
    lines = [spec.doc or spec.name, "", f"Returns: {spec.result}."]
    if spec.errors:
        lines.append("Errors: " + ", ".join(spec.errors) + ".")
    return "\n".join(lines)


def _stub(spec: Syscall, asynchronous: bool):
    sig = _signature(spec)
    name = spec.name

    def args_of(self, a, kw) -> dict:
        bound = sig.bind(self, *a, **kw)
        return {k: v for k, v in bound.arguments.items() if k != "self"}

    if asynchronous:
        async def method(self, *a, **kw):
            args = args_of(self, a, kw)
            if spec.stream:
                return await self.stream(name, **args)
            result = await self.call(name, **args)
            if name == "exit":
                await self.abort()
            return result
    else:
        def method(self, *a, **kw):
            args = args_of(self, a, kw)
            if spec.stream:
                return self.stream(name, **args)
            result = self.call(name, **args)
            if name == "exit":          # this process has ended: nothing more may go out
                self.abort()
            return result
    method.__name__ = method.__qualname__ = name
    method.__signature__ = sig
    method.__doc__ = _doc(spec)
    return method
