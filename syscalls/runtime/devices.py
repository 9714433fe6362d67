"""Driver services by name: which names are drivers, which GPU a name means, which runs the model.

A driver service owns one device's copy of a model: ``cpu``, or ``cuda0``, ``cuda1``, ... (one per
GPU, the number in torch's numbering). The kernel decides at boot which run (kernel/devices.py) and
puts their names, in order, in LLMOS_DRIVERS, which every service it starts inherits: the first is
the one that runs the default model for the inference and tokenizer services.

Another model runs in a driver instance the kernel starts on demand (kernel/instances.py): the
boot driver's name, "@", and the model's (``cpu@tiny``), loading the file LLMOS_MODEL names.
"""

from __future__ import annotations

import os
import re

DRIVERS_ENV = "LLMOS_DRIVERS"
MODEL_ENV = "LLMOS_MODEL"        # a driver instance's model file (absolute path)
MODEL_NAME_ENV = "LLMOS_MODEL_NAME"   # and the registered name it stands for
CPU_DRIVER = "cpu"
INSTANCE = "@"
_CUDA_NAME = re.compile(r"cuda(0|[1-9][0-9]*)")


def base_driver(name: str) -> str:
    """The boot driver an instance's name starts with: cpu@tiny -> cpu; cuda0 -> cuda0."""
    return name.split(INSTANCE, 1)[0]


def is_driver(name: str) -> bool:
    base = base_driver(name)
    return base == CPU_DRIVER or _CUDA_NAME.fullmatch(base) is not None


def cuda_index(name: str) -> int:
    """The GPU a CUDA driver service (or an instance of one) owns, from its name: cuda0 -> 0."""
    m = _CUDA_NAME.fullmatch(base_driver(name))
    if m is None:
        raise ValueError(f"{name!r} is not a CUDA driver's name (cuda0, cuda1, ...)")
    return int(m.group(1))


def cuda_driver(index: int) -> str:
    return f"cuda{index}"


def model_driver() -> str:
    """The driver service that runs the model, as the kernel chose it (the CPU's when not told)."""
    names = os.environ.get(DRIVERS_ENV, "")
    return names.split(",")[0] if names else CPU_DRIVER
