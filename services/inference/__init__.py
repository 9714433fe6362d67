"""The inference engine as a library: continuous batching over a paged KV cache, with the model in a
driver reached by plain messages (token ids, positions, block tables, sampling parameters).

The inference service process wraps `Engine`; a driver process runs the model (drivers/runner.py's
ModelRunner). In one process, as the tests and benchmarks do:
    runner = ModelRunner.from_gguf(path, cache_dir, num_blocks=512)
    engine = Engine(runner.info(), Tokenizer.from_gguf(path))
    seq_id = engine.add(prompt_ids, {"temperature": 0}, max_tokens=64, stop=["\\n\\n"])
    while engine.has_work(): for event in step_in_process(engine, runner): ...
"""

from services.inference.blocks import BlockAllocator, OutOfBlocks
from services.inference.engine import (Engine, QueueFull, QuotaExceeded, RequestError, Step,
                                       run_in_process, step_in_process)
from services.inference.policy import Policy
from services.inference.scheduler import Batch, Scheduler
from services.inference.sequence import FINISH_REASONS, Sequence, Status

__all__ = [
           "FINISH_REASONS",
           "Batch",
           "BlockAllocator",
           "Engine",
           "OutOfBlocks",
           "Policy",
           "QueueFull",
           "QuotaExceeded",
           "RequestError",
           "Scheduler",
           "Sequence",
           "Status",
           "Step",
           "run_in_process",
           "step_in_process",
]
