"""A row's errors are exactly those its handler can raise, read from the source (tests/raised.py);
the dispatch adds only the errors that DISPATCH_ERRORS documents once for every call."""

import sys

import pytest

from kernel.kernel import TRAPS, Kernel
from kernel.routing import Router
from raised import Raised, codes, dynamic
from services.inference.service import Inference
from services.storage import Storage
from services.tokenizer import TokenizerService
from syscalls import errors
from syscalls.table import DISPATCH_ERRORS, SYSCALLS

SERVICE_CLASSES = {"storage": Storage, "tokenizer": TokenizerService, "inference": Inference}

# Places whose code only the running program knows, and what they can answer with (read by hand).
DYNAMIC = {
    # a request the engine ends with an error carries its code: EDQUOT when over its quota in
    # Engine.schedule, else EIO
    "Inference._stream": {"EDQUOT", "EIO"},
    # each driver's info is asked with return_exceptions: a driver's failure is only left out
    "TokenizerService._drivers": set(),
}
# Codes the reading finds on a path the call cannot take, and why it cannot.
UNREACHABLE = {
    ("save_context", "ECONFLICT"): "it puts with if_version null, which never conflicts",
}
# Where the kernel, its routing to services and the service runtime answer calls without a handler.
KERNEL_DISPATCH = ("_on_program", "_async_done", "_housekeeping", "_shutdown")
ROUTER_DISPATCH = ("service_ready", "service_down")
RUNTIME_DISPATCH = ("_on_message", "_done")


@pytest.fixture(scope="module")
def raised():
    return Raised(SERVICE_CLASSES)


def handler(spec):
    if spec.target == "kernel":
        return None, TRAPS[spec.name]          # a trap is a function, not a method
    cls = SERVICE_CLASSES[spec.target]
    return cls, getattr(cls, f"op_{spec.name}")


def handler_errors(raised: Raised, spec) -> set[str]:
    cls, method = handler(spec)
    found = raised.of(method, cls)
    unknown = dynamic(found) - set(DYNAMIC)
    assert not unknown, f"{spec.name}: codes only known at run time in {sorted(unknown)}; " \
                        f"read them and say which in DYNAMIC"
    own = codes(found).union(*(DYNAMIC[place] for place in dynamic(found)))
    return own - {code for (name, code) in UNREACHABLE if name == spec.name}


@pytest.mark.parametrize("spec", SYSCALLS, ids=lambda s: s.name)
def test_a_row_lists_what_its_handler_raises(raised, spec):
    own = handler_errors(raised, spec)
    listed = set(spec.errors)
    assert own <= listed, f"{spec.name} can answer {sorted(own - listed)}, which its row does not list"
    assert listed <= own, f"{spec.name}'s row lists {sorted(listed - own)}, which it never raises"
    assert len(spec.errors) == len(listed), f"{spec.name} lists an error twice"


def test_every_exception_is_still_needed(raised):
    for (name, code), why in UNREACHABLE.items():
        spec = next(s for s in SYSCALLS if s.name == name)
        cls, method = handler(spec)
        assert code in codes(raised.of(method, cls)), f"UNREACHABLE {name} {code} is stale"
    places = set()
    for spec in SYSCALLS:
        places |= dynamic(raised.of(*reversed(handler(spec))))
    assert places == set(DYNAMIC), "DYNAMIC names a place no handler reaches, or misses one"


def test_the_dispatch_answers_only_with_the_documented_errors(raised):
    runtime = sys.modules[Storage.__mro__[1].__module__].Runtime     # the base Service's module
    found = set()
    for cls, names in ((Kernel, KERNEL_DISPATCH), (Router, ROUTER_DISPATCH),
                       (runtime, RUNTIME_DISPATCH)):
        for name in names:
            assert hasattr(cls, name), f"{cls.__name__}.{name} is gone: update the lists above"
            f = raised.of(getattr(cls, name), cls)
            assert not dynamic(f), f"{cls.__name__}.{name}: codes known only at run time"
            found |= codes(f)
    spec = SYSCALLS[0]
    found |= codes(raised.of(type(spec).check_args, type(spec)))
    assert found - set(DISPATCH_ERRORS) == set(), "answered by the dispatch but not documented"
    assert set(DISPATCH_ERRORS) - found == set(), "documented, but the dispatch never answers it"
    assert set(DISPATCH_ERRORS) <= set(errors.CODES)


# -- the reading itself, on functions of known behaviour ------------------------------------------
class _Store:
    def op_put(self, args, caller):
        raise errors.EDQUOT("full")


class _Svc:
    def op_save(self, args, caller):
        try:
            return self.runtime.call("store", "put", {})
        except errors.ENOENT:
            return None

    def op_swallow(self, args, caller):
        try:
            self._helper()
        except errors.LLMOSError:
            pass

    def op_reraise(self, args, caller):
        try:
            self._helper()
        except errors.ESRCH:
            raise

    def op_pass_on(self, args, caller, reply=print):
        try:
            self._helper()
        except errors.LLMOSError as e:
            reply(e.code)

    def op_queued(self, args, caller, queue=None):
        queue.append(self._helper)            # runs later, and fails as _helper does

    def op_answered(self, args, caller, reply=print):
        try:
            reply("ETIMEDOUT")
        except Exception:
            pass

    def op_dynamic(self, args, caller, code="E"):
        raise errors.from_wire(code, "from elsewhere")

    def op_base_class(self, args, caller):
        try:
            self._helper()
        except LookupError:                   # ENOENT is a LookupError; ESRCH is not
            pass

    def _helper(self):
        if self:
            raise errors.ESRCH("x")
        raise errors.ENOENT("y")


@pytest.mark.parametrize("op, want", [
    ("op_save", {"EDQUOT"}), ("op_swallow", set()), ("op_reraise", {"ESRCH", "ENOENT"}),
    ("op_pass_on", {"ESRCH", "ENOENT"}), ("op_queued", {"ESRCH", "ENOENT"}),
    ("op_answered", {"ETIMEDOUT"}), ("op_dynamic", set()), ("op_base_class", {"ESRCH"}),
])
def test_the_reading_follows_calls_and_excepts(op, want, monkeypatch):
    import raised as module
    monkeypatch.setattr(module, "PACKAGES", module.PACKAGES | {__name__.split(".")[0]})
    found = Raised({"store": _Store}).of(getattr(_Svc, op), _Svc)
    assert codes(found) == want
    assert bool(dynamic(found)) == (op == "op_dynamic")
