"""Which driver services run the model, and on which devices: decided once, by the kernel, at boot.

``[driver] device`` in config.toml picks; ``driver`` in ``[services] enabled`` (there by default)
stands for the model's driver, and the kernel puts in its place the services that device means:

    "cpu"    the service ``cpu`` (drivers/cpu.py)
    "cuda"   one service per GPU torch sees: ``cuda0``, ``cuda1``, ... (drivers/cuda.py); none is an error
    "auto"   (the default) as "cuda" when torch sees a GPU, else as "cpu"

The kernel then puts the names of the driver services it runs, in order, in its own environment as
LLMOS_DRIVERS (syscalls/runtime/devices.py), which every service it starts inherits. More GPUs than
one each get a driver with the model loaded, but the inference service uses only the first yet.

Never: import torch in this process. Asking torch costs seconds, so ``cuda_device_count`` asks it in
a child process, and only on a machine where it could say yes.
"""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from syscalls.runtime.config import MODEL_DRIVER, Config
from syscalls.runtime.devices import CPU_DRIVER, cuda_driver, is_driver

DEVICES = ("auto", "cpu", "cuda")
CUDA_MODULE = "drivers.cuda"
PROBE_TIMEOUT = 120.0             # importing a CUDA build of torch can take a while on a cold disk


def cuda_device_count() -> int:
    """How many GPUs torch sees, without importing torch here: 0 at once when torch is missing, is
    a build without CUDA or ROCm, or the machine has no GPU device node; else torch is asked in a
    child process (so CUDA_VISIBLE_DEVICES counts as it would for the driver)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin or not _gpu_build(Path(spec.origin).with_name("version.py")):
        return 0
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return 0
    try:
        r = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                           capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        return int(r.stdout.strip()) if r.returncode == 0 else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def _gpu_build(version_py: Path) -> bool:
    """Whether torch was built for CUDA or ROCm: its version.py sets ``cuda`` or ``hip`` to a string."""
    try:
        tree = ast.parse(version_py.read_text())
    except (OSError, SyntaxError):
        return True                 # an unexpected layout: let torch itself answer
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else \
            node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(target, ast.Name) and target.id in ("cuda", "hip") and \
                isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return True
    return False


def driver_services(device: str, gpus: int) -> list[str]:
    """The driver services for ``[driver] device`` on a machine where torch sees ``gpus`` GPUs."""
    if device not in DEVICES:
        raise ValueError(f"config: driver.device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and gpus == 0:
        raise ValueError("config: driver.device is \"cuda\" but torch sees no GPU "
                         "(a CPU-only torch build, no GPU, or CUDA_VISIBLE_DEVICES hides them)")
    if device == "cpu" or gpus == 0:
        return [CPU_DRIVER]
    return [cuda_driver(i) for i in range(gpus)]


def place_drivers(cfg: Config, gpus: int | None = None) -> list[str]:
    """Put the model's driver services in the place of ``driver`` in cfg.services; return every
    driver service cfg now runs, in order. Raises ValueError for a bad device."""
    device = cfg.driver.device
    if device not in DEVICES:                   # checked even when no driver is enabled
        driver_services(device, 0)
    if MODEL_DRIVER in cfg.services:
        names = driver_services(device, 0 if device == "cpu" else
                                cuda_device_count() if gpus is None else gpus)
        i = cfg.services.index(MODEL_DRIVER)
        cfg.services[i:i + 1] = names
        for name in names:
            if name != CPU_DRIVER:
                cfg.modules.setdefault(name, CUDA_MODULE)
    return [name for name in cfg.services if is_driver(name)]
