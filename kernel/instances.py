"""Driver instances: a model other than the boot driver's runs in a driver the kernel starts on demand.

The inference service, asked for a registered model no driver holds, asks the kernel
(``kernel.driver_start {model, path}``, a service's call to the kernel itself) for a driver
instance: a service like any other, started, pinged and restarted by the supervisor, named after
the boot driver and the model (``cpu@tiny``, or ``cpu@3`` when that would make too long a name),
with LLMOS_MODEL naming the file it loads. An instance is one version of a model: its file and
that file's size and mtime (``version``); a model updated in place of a running one gets an
instance of its own (``cpu@tiny.2``) while the old one finishes its requests. ``kernel.driver_stop``
stops an instance for good (its model unloaded: idle past its keep_alive, or evicted to make room
under ``[models] memory_budget``), answered once its process has exited and its memory is back.
``kernel.drivers`` lists every driver service and its state, which the tokenizer service's
``models`` shows.

These calls come only from services (trusted, past their HELLO); their arguments are checked all
the same, and a bad one is an error for that call. The kernel never opens the model file: whether
it loads is the driver's start to say, and a driver that cannot load it says why before it exits
(a progress event with ``error``, kept with the service and listed by ``kernel.drivers``).
"""

from __future__ import annotations

import asyncio
import os

from syscalls import errors, wire
from syscalls.paths import Paths
from syscalls.runtime.config import Config
from syscalls.runtime.devices import CPU_DRIVER, INSTANCE, MODEL_ENV, MODEL_NAME_ENV, is_driver, model_driver
from syscalls.runtime.models import NAME, Registry

from . import keep
from .supervisor import FAILED, STOPPED, Service

KERNEL = "kernel."          # the target of a service's call to the kernel itself
MAX_INSTANCES = 16          # driver instances one kernel runs at most
LONGEST_OP = ".release"      # the longest op called on a driver: "<instance>.release" must fit a name
VERSION_ENV = "LLMOS_MODEL_VERSION"   # which version of the file an instance loaded: "SIZE-MTIME_NS"


def driver_start(kernel, origin: Service, args: dict) -> dict:
    """Start (or find) the driver instance for one version of a model: {service, state}. A FAILED
    one is given a fresh start; a running one for the same file and version is returned as it is."""
    model, path, version = args.get("model"), args.get("path"), args.get("version", "")
    if type(model) is not str or not NAME.fullmatch(model):
        raise errors.EINVAL(f"driver_start: 'model' must be a model's name, got {model!r}")
    if type(path) is not str or not os.path.isabs(path):
        raise errors.EINVAL(f"driver_start: 'path' must be an absolute path, got {path!r}")
    if type(version) is not str or len(version) > 64:
        raise errors.EINVAL(f"driver_start: 'version' must be a short string, got {version!r}")
    sup, base = kernel.supervisor, model_driver()
    if base not in sup.services:
        raise errors.ESRVDOWN(f"driver_start: no model driver is enabled in this llmos "
                              f"(services.enabled has no 'driver')")
    instances = {n: s for n, s in sup.services.items() if s.env.get(MODEL_ENV)}
    name = next((n for n, s in instances.items() if s.removed is None and s.env.get(MODEL_NAME_ENV) == model
                 and s.env[MODEL_ENV] == path and s.env.get(VERSION_ENV, "") == version), None)
    if name is not None:
        svc = sup.services[name]
        if svc.state in (FAILED, STOPPED):
            sup.restart(svc)
        return {"service": name, "state": svc.state}
    if len(instances) >= MAX_INSTANCES:
        raise errors.EAGAIN(f"driver_start: {MAX_INSTANCES} driver instances run already")
    name = _instance_name(base, model, set(sup.services), len(instances))
    svc = sup.add(name, kernel.cfg.modules[base], {MODEL_ENV: path, MODEL_NAME_ENV: model,
                                                    VERSION_ENV: version})
    # A file that does not load fails the same way every time: FAILED at the first death before
    # READY, so its requests hear why in seconds; the next request naming it starts it again.
    svc.fail_unready = True
    kernel.log.info("driver_instance_added", service=name, model=model, path=path, version=version)
    sup.start(svc)
    return {"service": name, "state": svc.state}


def _instance_name(base: str, model: str, taken: set[str], count: int) -> str:
    """cpu@tiny; cpu@tiny.2 beside an older version still running; cpu@N when too long a name."""
    for n in range(1, MAX_INSTANCES + 2):
        name = f"{base}{INSTANCE}{model}" + (f".{n}" if n > 1 else "")
        if len(name) + len(LONGEST_OP) > wire.MAX_NAME:
            break
        if name not in taken:
            return name
    return next(f"{base}{INSTANCE}{n}" for n in range(count + 1, count + MAX_INSTANCES + 2)
                if f"{base}{INSTANCE}{n}" not in taken)


def driver_stop(kernel, origin: Service, args: dict):
    """Stop a driver instance for good (its model is unloaded); answered {service, state} once its
    process has exited. The boot driver is never stopped: it holds the default model."""
    name = args.get("service")
    svc = kernel.supervisor.services.get(name) if type(name) is str else None
    if svc is None or not svc.env.get(MODEL_ENV):
        instances = [n for n, s in kernel.supervisor.services.items() if s.env.get(MODEL_ENV)]
        raise errors.ENOENT(f"driver_stop: {name!r} is no driver instance (instances: "
                            f"{', '.join(instances) or 'none'})")
    kernel.log.info("driver_instance_stopping", service=name, model=svc.env.get(MODEL_NAME_ENV))
    done = kernel.supervisor.remove(svc)
    answer = asyncio.get_running_loop().create_future()
    done.add_done_callback(lambda _: answer.set_result({"service": name, "state": svc.state}))
    return answer


def drivers(kernel, origin: Service, args: dict) -> list[dict]:
    """Every driver service: the boot driver(s) and the instances, with their state and model;
    crashed: its last death was a crash or an exit, not a kill (supervisor.py)."""
    return [{"service": s.name, "model": s.env.get(MODEL_NAME_ENV), "path": s.env.get(MODEL_ENV),
             "version": s.env.get(VERSION_ENV), "state": "STOPPING" if s.removed else s.state,
             "progress": s.progress, "last_exit": s.last_exit, "crashed": s.crashed, "pid": s.pid}
            for s in kernel.supervisor.services.values() if is_driver(s.name)]


SERVICE_TRAPS = {"driver_start": driver_start, "driver_stop": driver_stop, "drivers": drivers,
                 "kept": keep.kept}


# == at boot =======================================================================================
def check_budget(paths: Paths, cfg: Config) -> None:
    """ValueError, with the numbers, when [models] memory_budget cannot hold even the smallest
    registered model: its file's size is the least memory it needs (the kernel only stats the
    files). A share of a GPU's memory is checked by the inference service, which knows it."""
    if not cfg.services or "inference" not in cfg.services:
        return
    text = cfg.models.memory_budget.strip()
    if text.endswith("%") and model_driver() != CPU_DRIVER:
        return
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    budget = cfg.models.budget_bytes(ram)
    files = [(m["path"], m["name"]) for m in Registry(paths).list()]
    if os.path.isabs(cfg.driver.model):
        files.append((cfg.driver.model, cfg.driver.model))      # the boot driver's own file
    sizes = []
    for path, name in files:
        try:
            sizes.append((os.stat(path).st_size, name))
        except OSError:
            continue                    # a missing file is its request's error, not the boot's
    if sizes and budget < min(sizes)[0]:
        size, name = min(sizes)
        raise ValueError(f"config: models.memory_budget {text!r} is {budget} bytes, less than the "
                         f"smallest model, {name!r}, whose file alone is {size} bytes; raise the "
                         f"budget (a share of memory like \"50%\", or bytes like \"8GiB\")")
