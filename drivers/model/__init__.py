"""The model library the drivers and the tokenizer service import: GGUF loading, the Llama forward with a
paged KV cache, sampling and tokenization.

Pure library code: it owns tensors and files under the cache directory it is given, and never starts a
process, opens a socket or reads the environment. Callers pass plain lists (token ids, positions, block
tables) in and get tensors or plain values back.

A driver's loop, in short:
    model = Llama.from_gguf(path, cache_dir)              # cache_dir e.g. LLMOS_HOME/data/models
    pool = model.new_kv_pool(num_blocks, block_size=16)
    logits = model.step(pool, [Chunk(tokens, start, block_table), ...])   # one row per chunk
    picks = sample(logits, [SequenceSampler(params), ...], histories)     # Sample(token, logprob, top)
The tokenizer service needs only Tokenizer and StreamDecoder, and the inference service only those and
SamplingParams (drivers.model.params): none of them imports torch.
"""

# Names resolve on first use (PEP 562), so importing drivers.model.tokenizer alone never loads torch.
_EXPORTS = {
    "drivers.model.gguf": ("CorruptModelError", "LlamaConfig", "MissingTensorError", "ModelError", "ModelFile",
                           "UnsupportedArchitectureError", "UnsupportedQuantError", "describe", "load_gguf",
                           "read_metadata"),
    "drivers.model.llama": ("Chunk", "KVPool", "Llama"),
    "drivers.model.params": ("SamplingParams", "SamplingParamsError"),
    "drivers.model.sampling": ("Sample", "SequenceSampler", "sample"),
    "drivers.model.tokenizer": ("ChatTemplateError", "StreamDecoder", "Tokenizer", "UnsupportedTokenizerError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'drivers.model' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(_WHERE[name]), name)
