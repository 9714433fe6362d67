"""Fixtures for the inference engine: the model library's tiny random Llama GGUF, one per session."""

from __future__ import annotations

import pytest

from tests.model.tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-inference") / "tiny.gguf", context=256)


@pytest.fixture(scope="session")
def tiny_model(tiny_path):
    from drivers.model.llama import Llama
    return Llama.from_gguf(tiny_path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from drivers.model.tokenizer import Tokenizer
    return Tokenizer.from_gguf(tiny_path)


@pytest.fixture
def make_engine(tiny_model, tiny_tokenizer):
    """make_engine(num_blocks=64, block_size=4, **engine_args) -> Engine over a fresh KV pool."""
    from services.inference import Engine, LocalDriver

    def make(num_blocks: int = 64, block_size: int = 4, **kw):
        return Engine(LocalDriver(tiny_model, num_blocks, block_size), tiny_tokenizer, **kw)
    return make
