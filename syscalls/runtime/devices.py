"""Driver services by name: which names are drivers, which GPU a name means, which runs the model.

A driver service owns one device's copy of the model: ``cpu``, or ``cuda0``, ``cuda1``, ... (one per
GPU, the number in torch's numbering). The kernel decides at boot which run (kernel/devices.py) and
puts their names, in order, in LLMOS_DRIVERS, which every service it starts inherits: the first is
the one that runs the model for the inference and tokenizer services.
"""

from __future__ import annotations

import os
import re

DRIVERS_ENV = "LLMOS_DRIVERS"
CPU_DRIVER = "cpu"
_CUDA_NAME = re.compile(r"cuda(0|[1-9][0-9]*)")


def is_driver(name: str) -> bool:
    return name == CPU_DRIVER or _CUDA_NAME.fullmatch(name) is not None


def cuda_index(name: str) -> int:
    """The GPU a CUDA driver service owns, from its name: cuda0 -> 0 (torch's numbering)."""
    m = _CUDA_NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"{name!r} is not a CUDA driver's name (cuda0, cuda1, ...)")
    return int(m.group(1))


def cuda_driver(index: int) -> str:
    return f"cuda{index}"


def model_driver() -> str:
    """The driver service that runs the model, as the kernel chose it (the CPU's when not told)."""
    names = os.environ.get(DRIVERS_ENV, "")
    return names.split(",")[0] if names else CPU_DRIVER
