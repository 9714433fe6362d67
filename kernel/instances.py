"""Driver instances: a model other than the boot driver's runs in a driver the kernel starts on demand.

The inference service, asked for a registered model no driver holds, asks the kernel
(``kernel.driver_start {model, path}``, a service's call to the kernel itself) for a driver
instance: a service like any other, started, pinged and restarted by the supervisor, named after
the boot driver and the model (``cpu@tiny``, or ``cpu@3`` when that would make too long a name),
with LLMOS_MODEL naming the file it loads. ``kernel.drivers`` lists every driver service and its
state, which the tokenizer service's ``models`` shows.

These calls come only from services (trusted, past their HELLO); their arguments are checked all
the same, and a bad one is an error for that call. The kernel never opens the model file: whether
it loads is the driver's start to say.
"""

from __future__ import annotations

import os

from syscalls import errors, wire
from syscalls.runtime.devices import INSTANCE, MODEL_ENV, MODEL_NAME_ENV, is_driver, model_driver
from syscalls.runtime.models import NAME

from .supervisor import FAILED, STOPPED, Service

KERNEL = "kernel."          # the target of a service's call to the kernel itself
MAX_INSTANCES = 16          # driver instances one kernel runs at most
LONGEST_OP = ".release"      # the longest op called on a driver: "<instance>.release" must fit a name


def driver_start(kernel, origin: Service, args: dict) -> dict:
    """Start (or find) the driver instance for model at path: {service, state}. A FAILED one is
    given a fresh start; a running one for the same model is returned as it is."""
    model, path = args.get("model"), args.get("path")
    if type(model) is not str or not NAME.fullmatch(model):
        raise errors.EINVAL(f"driver_start: 'model' must be a model's name, got {model!r}")
    if type(path) is not str or not os.path.isabs(path):
        raise errors.EINVAL(f"driver_start: 'path' must be an absolute path, got {path!r}")
    sup, base = kernel.supervisor, model_driver()
    if base not in sup.services:
        raise errors.ESRVDOWN(f"driver_start: no model driver is enabled in this llmos "
                              f"(services.enabled has no 'driver')")
    instances = {n: s for n, s in sup.services.items() if s.env.get(MODEL_ENV)}
    name = next((n for n, s in instances.items() if s.env.get(MODEL_NAME_ENV) == model), None)
    if name is None:
        if len(instances) >= MAX_INSTANCES:
            raise errors.EAGAIN(f"driver_start: {MAX_INSTANCES} driver instances run already")
        name = f"{base}{INSTANCE}{model}"
        if len(name) + len(LONGEST_OP) > wire.MAX_NAME:
            name = f"{base}{INSTANCE}{len(instances) + 1}"
        svc = sup.add(name, kernel.cfg.modules[base], {MODEL_ENV: path, MODEL_NAME_ENV: model})
        kernel.log.info("driver_instance_added", service=name, model=model, path=path)
        sup.start(svc)
        return {"service": name, "state": svc.state}
    svc = sup.services[name]
    if svc.env[MODEL_ENV] != path:          # the name now stands for another file: load that one
        svc.env[MODEL_ENV] = path
        sup.restart(svc)
    elif svc.state in (FAILED, STOPPED):
        sup.restart(svc)
    return {"service": name, "state": svc.state}


def drivers(kernel, origin: Service, args: dict) -> list[dict]:
    """Every driver service: the boot driver(s) and the instances, with their state and model."""
    return [{"service": s.name, "model": s.env.get(MODEL_NAME_ENV), "path": s.env.get(MODEL_ENV),
             "state": s.state, "progress": s.progress, "last_exit": s.last_exit, "pid": s.pid}
            for s in kernel.supervisor.services.values() if is_driver(s.name)]


SERVICE_TRAPS = {"driver_start": driver_start, "drivers": drivers}
