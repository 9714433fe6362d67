"""The CUDA driver: a service process that owns one GPU's copy of a model and its KV cache.

One runs per GPU torch sees, named cuda0, cuda1, ... by the kernel (kernel/devices.py decides when);
the name says which GPU, in torch's numbering (so CUDA_VISIBLE_DEVICES applies). Everything else is
drivers/driver.py's Driver: the weights and the KV pool are moved to ``cuda:N`` when the model
loads, each step's token ids and block tables are copied there, and only the sampled tokens come
back (sampling runs on the host, over the few logit rows a step returns).
"""

from __future__ import annotations

from typing import Any

from syscalls.runtime.devices import cuda_index
from drivers.driver import Driver, named
from syscalls.runtime.service import main


class CUDADriver(Driver):
    name = "cuda0"          # main() gives each process the name the kernel started it under

    def torch_device(self) -> str:
        return f"cuda:{cuda_index(self.name)}"

    def device_info(self) -> dict[str, Any]:
        import torch
        i = cuda_index(self.name)
        free, total = torch.cuda.mem_get_info(i)
        return {"device_name": torch.cuda.get_device_name(i), "memory_total": total,
                "memory_used": total - free, "memory_allocated": torch.cuda.memory_allocated(i)}


def serve(cls: type[CUDADriver]) -> None:
    """Run cls as the service the kernel named in LLMOS_SERVICE (cuda0, cuda1, ...)."""
    cls = named(cls)
    cuda_index(cls.name)                # a name that says no GPU is a mistake: fail before starting
    main(cls)


if __name__ == "__main__":
    serve(CUDADriver)
