"""``python -m services.inference``: the inference service process (started by the kernel)."""

from services.inference.service import Inference
from services.runtime import main

main(Inference)
