"""The model library the drivers and the tokenizer service import: GGUF loading, the Llama forward with a
paged KV cache, sampling and tokenization.

Pure library code: it owns tensors and files under the cache directory it is given, and never starts a
process, opens a socket or reads the environment. Callers pass plain lists (token ids, positions, block
tables) in and get tensors or plain values back.
"""

from drivers.model.gguf import (
    CorruptModelError,
    LlamaConfig,
    MissingTensorError,
    ModelError,
    ModelFile,
    UnsupportedArchitectureError,
    UnsupportedQuantError,
    describe,
    load_gguf,
)
from drivers.model.llama import Chunk, KVPool, Llama
from drivers.model.sampling import Sample, SamplingParams, SamplingParamsError, SequenceSampler, sample
from drivers.model.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer, UnsupportedTokenizerError

__all__ = [
    "ChatTemplateError", "Chunk", "CorruptModelError", "KVPool", "Llama", "LlamaConfig", "MissingTensorError",
    "ModelError", "ModelFile", "Sample", "SamplingParams", "SamplingParamsError", "SequenceSampler",
    "StreamDecoder", "Tokenizer", "UnsupportedArchitectureError", "UnsupportedQuantError",
    "UnsupportedTokenizerError", "describe", "load_gguf", "sample",
]
