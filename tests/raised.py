"""Which error codes a function can answer with, read from its source (ast).

It follows every function, method and constructor of llmos's own packages that the code names,
called or passed on (a handler that hands ``self._put`` to a queue can fail as ``_put`` fails), and a
service's call to another (``self.runtime.call("storage", "put", ...)``) raises what that op
raises. Codes caught by an ``except`` around them are taken away, unless the handler re-raises.
It errs on the side of too many codes: every branch counts. Where the code is computed at run time
(``errors.from_wire(code, ...)``), it says so with a marker, ``?Class.method``, so a test can
account for each such place by hand.

Its limits: a method called on a value whose class the source does not name (a local variable, a
parameter) is not followed; ``self.x.f()`` is, when some method of the class assigns
``self.x = SomeClass(...)``.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import textwrap
import types
from dataclasses import dataclass

from syscalls import errors

PACKAGES = {"kernel", "services", "syscalls", "drivers", "userland"}
DYNAMIC = "?"       # a code known only at run time, at this place: "?Class.method"
ANSWERED = "="      # a code written into a reply, not raised: no except clause can catch it


def codes(found: frozenset[str]) -> set[str]:
    """The error codes in what ``Raised.of`` found, raised or answered."""
    return {c.removeprefix(ANSWERED) for c in found if not c.startswith(DYNAMIC)}


def dynamic(found: frozenset[str]) -> set[str]:
    """The places in what ``Raised.of`` found whose code only the running program knows."""
    return {c[len(DYNAMIC):] for c in found if c.startswith(DYNAMIC)}


@dataclass(frozen=True)
class Instance:
    """An object of a known class, such as ``self`` or ``self.launcher``."""

    cls: type


@dataclass(frozen=True)
class Member:
    """What a class holds under a name, looked up through an Instance of it."""

    cls: type
    value: object


def _ours(obj) -> bool:
    module = getattr(obj, "__module__", None) or ""
    return module.split(".")[0] in PACKAGES and module != errors.__name__


def _error_code(obj) -> str | None:
    if isinstance(obj, type) and issubclass(obj, errors.LLMOSError):
        return obj.code
    return None


def _tree(func) -> ast.AST | None:
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):     # built at run time, or a lambda inside a line
        return None
    return tree.body[0] if tree.body and isinstance(
        tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None


class Raised:
    """Codes per function, memoised; ``services`` maps a service's name to its class."""

    def __init__(self, services: dict[str, type]):
        self.services = services
        self.memo: dict[tuple, frozenset[str]] = {}
        self.fields: dict[type, dict[str, Instance]] = {}

    def of(self, func, cls: type | None = None) -> frozenset[str]:
        """Every code ``func`` (a method of ``cls`` when given) may raise, and dynamic markers."""
        func = inspect.unwrap(func)
        key = (func, cls)
        if key not in self.memo:
            self.memo[key] = frozenset()          # a recursive call adds nothing new
            node = _tree(func)
            self.memo[key] = frozenset(Scope(self, func, cls, node).codes()) if node else frozenset()
        return self.memo[key]

    def fields_of(self, cls: type) -> dict[str, Instance]:
        """``self.x = SomeClass(...)`` anywhere in the class (or its bases): x holds a SomeClass."""
        if cls not in self.fields:
            found: dict[str, Instance] = {}
            self.fields[cls] = found            # filled in place: a field's class may name another
            for klass in reversed(cls.__mro__):
                if not _ours(klass):
                    continue
                for value in vars(klass).values():
                    if not inspect.isfunction(value) or (node := _tree(value)) is None:
                        continue
                    scope = Scope(self, value, klass, node)
                    for n in ast.walk(node):
                        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call):
                            made = scope.resolve(n.value.func)
                            if isinstance(made, type) and _ours(made):
                                for t in n.targets:
                                    if isinstance(t, ast.Attribute) and \
                                            isinstance(t.value, ast.Name) and t.value.id == "self":
                                        found[t.attr] = Instance(made)
        return self.fields[cls]


class Scope:
    """One function's source, with the names it can see."""

    def __init__(self, raised: Raised, func, cls: type | None, node: ast.AST):
        self.raised, self.func, self.cls, self.node = raised, func, cls, node
        self.where = func.__qualname__
        self.names = dict(getattr(func, "__globals__", {}))
        for n in ast.walk(node):          # imports inside the function (kept out of import time)
            if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                for alias in n.names:
                    module = importlib.import_module(n.module)
                    self.names[alias.asname or alias.name] = getattr(module, alias.name, None)
            elif isinstance(n, ast.Import):
                for alias in n.names:
                    self.names[alias.asname or alias.name.split(".")[0]] = \
                        importlib.import_module(alias.name.split(".")[0])
        params = node.args.posonlyargs + node.args.args
        self.self_name = params[0].arg if cls is not None and params else None
        # a parameter or local variable hides the module's name of the same spelling
        self.local = {n.arg for n in ast.walk(node) if isinstance(n, ast.arg)} | \
            {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}

    # -- what a name stands for -----------------------------------------------------------------
    def resolve(self, node: ast.AST):
        """The object an expression names, where the source says: a module, class, function or
        Instance; None when it cannot be known without running the code."""
        if isinstance(node, ast.Name):
            if node.id == self.self_name:
                return Instance(self.cls)
            if node.id in self.local:
                return None
            return self.names.get(node.id, getattr(builtins, node.id, None))
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            if isinstance(base, Instance):
                found = inspect.getattr_static(base.cls, node.attr, None)
                if found is None:
                    return self.raised.fields_of(base.cls).get(node.attr)
                return Member(base.cls, found)
            if isinstance(base, (types.ModuleType, type)):
                return getattr(base, node.attr, None)
        if isinstance(node, ast.Constant):
            return node.value
        return None

    def _follow(self, target) -> frozenset[str]:
        """The codes of running what an expression names (a reference counts as a call)."""
        cls = None
        if isinstance(target, Member):
            cls, target = target.cls, target.value
            if isinstance(target, staticmethod):
                cls, target = None, target.__func__
            elif isinstance(target, classmethod):
                target = target.__func__
            elif isinstance(target, property):
                target = target.fget
        if isinstance(target, type) or not inspect.isfunction(target) or not _ours(target):
            return frozenset()
        return self.raised.of(target, cls)

    # -- the walk -------------------------------------------------------------------------------
    def codes(self) -> set[str]:
        return self.block(self.node.body)

    def block(self, nodes: list[ast.AST]) -> set[str]:
        out: set[str] = set()
        for n in nodes:
            out |= self.visit(n)
        return out

    def visit(self, node: ast.AST) -> set[str]:
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            return self._try(node)
        out: set[str] = set()
        if isinstance(node, ast.Constant) and type(node.value) is str and node.value in errors.CODES:
            out.add(ANSWERED + node.value)      # a code passed on as text: wire.err(id, "EIO", ...)
        elif isinstance(node, ast.Call):
            out |= self._call(node)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
            out |= self._follow(self.resolve(node))
        elif isinstance(node, ast.Raise) and node.exc is not None:
            code = _error_code(self.resolve(node.exc))     # raise errors.EIO, the class itself
            if code:
                out.add(code)
        if isinstance(node, (ast.With, ast.AsyncWith)):
            return out | self._with(node)
        for child in ast.iter_child_nodes(node):
            out |= self.visit(child)
        return out

    def _call(self, node: ast.Call) -> set[str]:
        target = self.resolve(node.func)
        code = _error_code(target)
        if code:
            if target is errors.LLMOSError:          # LLMOSError(message, code)
                given = node.args[1] if len(node.args) > 1 else next(
                    (k.value for k in node.keywords if k.arg == "code"), None)
                if given is not None:
                    return self._code_arg(given)
            return {code}
        if target is errors.from_wire:
            return self._code_arg(node.args[0]) if node.args else {DYNAMIC + self.where}
        if isinstance(node.func, ast.Attribute) and node.func.attr == "call" and \
                isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "runtime":
            return self._service_call(node)
        if isinstance(target, type) and _ours(target) and "__init__" in vars(target):
            return set(self.raised.of(vars(target)["__init__"], target))
        return set()

    def _code_arg(self, node: ast.AST) -> set[str]:
        value = self.resolve(node)
        if isinstance(value, str):
            return {value}
        return {DYNAMIC + self.where}

    def _service_call(self, node: ast.Call) -> set[str]:
        """``self.runtime.call(service, op, ...)``: what that service's op raises."""
        service, op = (self.resolve(a) for a in node.args[:2]) if len(node.args) >= 2 else (None, None)
        cls = self.raised.services.get(service) if isinstance(service, str) else None
        method = getattr(cls, f"op_{op}", None) if cls and isinstance(op, str) else None
        if method is None:
            return {DYNAMIC + self.where}
        return set(self.raised.of(method, cls))

    def _caught(self, handler: ast.AST | None) -> tuple | None:
        """The exception classes an except clause names; None: it catches everything."""
        if handler is None:
            return None
        names = handler.elts if isinstance(handler, ast.Tuple) else [handler]
        return tuple(c for c in map(self.resolve, names) if isinstance(c, type))

    @staticmethod
    def _catches(classes: tuple | None, code: str) -> bool:
        if code.startswith(ANSWERED):
            return False
        if classes is None:
            return True
        raised = errors.LLMOSError if code.startswith(DYNAMIC) else errors.BY_CODE.get(code)
        return raised is not None and any(issubclass(raised, c) for c in classes)

    def _try(self, node: ast.Try) -> set[str]:
        body = self.block(node.body)
        out, caught_somewhere = set(), set()
        for h in node.handlers:
            classes = self._caught(h.type)
            caught = {c for c in body - caught_somewhere if self._catches(classes, c)}
            caught_somewhere |= caught
            out |= self.block(h.body)
            if any(isinstance(n, ast.Raise) and (n.exc is None or isinstance(n.exc, ast.Name)
                                                 and n.exc.id == h.name) for n in ast.walk(h)):
                out |= caught                      # re-raised
            elif h.name and any(isinstance(n, ast.Attribute) and n.attr == "code" and
                                isinstance(n.value, ast.Name) and n.value.id == h.name
                                for n in ast.walk(h)):
                out |= {ANSWERED + c for c in caught}     # passed on: wire.err(id, e.code, ...)
        return out | (body - caught_somewhere) | self.block(node.orelse) | self.block(node.finalbody)

    def _with(self, node: ast.With) -> set[str]:
        """A ``with contextlib.suppress(...)`` block: its body, less what is suppressed."""
        import contextlib
        out = self.block([i.context_expr for i in node.items])
        body = self.block(node.body)
        for item in node.items:
            e = item.context_expr
            if isinstance(e, ast.Call) and self.resolve(e.func) is contextlib.suppress:
                classes = self._caught(ast.Tuple(elts=e.args))
                body = {c for c in body if not self._catches(classes, c)}
        return out | body
