"""``python -m services.inference``: the inference service process (started by the kernel)."""

from services.inference.service import Inference
from syscalls.runtime.service import main

main(Inference)
