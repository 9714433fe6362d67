"""The inference engine as a library: continuous batching over a paged KV cache, with the model behind
a `Driver` reached by plain messages (token ids, positions, block tables, sampling parameters).

The inference service process wraps `Engine`; a driver process wraps `LocalDriver`'s model side.
    engine = Engine(LocalDriver.from_gguf(path, cache_dir, num_blocks=512), Tokenizer.from_gguf(path))
    seq_id = engine.add(prompt_ids, {"temperature": 0}, max_tokens=64, stop=["\\n\\n"])
    while engine.has_work(): for event in engine.step(): ...
"""

from services.inference.blocks import BlockAllocator, OutOfBlocks
from services.inference.driver import Driver, LocalDriver, Sampled, SeqStep
from services.inference.engine import Engine, QueueFull, QuotaExceeded, RequestError
from kernel.sched import Policy
from services.inference.scheduler import Batch, Scheduler
from services.inference.sequence import FINISH_REASONS, Sequence, Status

__all__ = [
           "FINISH_REASONS",
           "Batch",
           "BlockAllocator",
           "Driver",
           "Engine",
           "LocalDriver",
           "OutOfBlocks",
           "QueueFull",
           "QuotaExceeded",
           "Policy",
           "RequestError",
           "Sampled",
           "Scheduler",
           "SeqStep",
           "Sequence",
           "Status",
]
