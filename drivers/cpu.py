"""The CPU driver: a service process that owns the CPU's copy of a model and its KV cache.

Everything a driver does is drivers/driver.py's Driver; this names the device (torch's "cpu",
with ``[driver] threads`` threads; which product runs each matrix is measured at load, see
drivers/model/kernels.py) and reads what the kernel says of it: the processor's name and the
machine's memory (the base of ``[driver] dense_copy_budget`` when given as a share).
"""

from __future__ import annotations

from typing import Any

from drivers.driver import Driver, named
from syscalls.runtime.service import main


class CPUDriver(Driver):
    name = "cpu"

    def torch_device(self) -> str:
        return "cpu"

    def device_info(self) -> dict[str, Any]:
        return cpu_info()


def cpu_info() -> dict[str, Any]:
    """The processor's name and the machine's memory (total, and in use by anything), from /proc."""
    name = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    mem = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            mem[key] = int(value.split()[0]) * 1024
    total = mem["MemTotal"]
    return {"device_name": name or "cpu", "memory_total": total,
            "memory_used": total - mem.get("MemAvailable", mem.get("MemFree", 0))}


if __name__ == "__main__":
    main(named(CPUDriver))
