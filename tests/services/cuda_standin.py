"""The CUDA driver with the CPU standing in for its GPU, for the tests: no GPU exists where they run.

Everything of drivers/cuda.py that does not need a GPU runs as it would on one: the service is
named cuda0 by the kernel, the inference and tokenizer services find it through LLMOS_DRIVERS, and
drivers/driver.py loads the model and serves info, step and release. Only the torch device ("cpu"
for "cuda:0") and what the device says of itself (read from /proc instead of torch.cuda) differ.
Not part of llmos.
"""

from drivers.cpu import cpu_info
from drivers.cuda import CUDADriver, serve


class StandInCUDADriver(CUDADriver):
    def torch_device(self) -> str:
        super().torch_device()              # the name must still say which GPU (cuda0 -> cuda:0)
        return "cpu"

    def device_info(self) -> dict:
        return dict(cpu_info(), device_name="cpu standing in for " + super().torch_device())


if __name__ == "__main__":
    serve(StandInCUDADriver)
