"""Fixtures for the inference engine: the model library's tiny random Llama GGUF, one per session, on
each engine (torch's kernels, llmos's compiled ones, the torch-free lean one)."""

from __future__ import annotations

import pytest

# the model library's session fixtures: one tiny GGUF, its model and tokenizer
from tests.model.conftest import tiny_any_engine, tiny_path, tiny_tokenizer  # noqa: F401


@pytest.fixture
def make_engine(tiny_any_engine, tiny_tokenizer):
    """make_engine(num_blocks=64, block_size=4, **engine_args) -> (Engine, ModelRunner over a fresh
    KV pool), to be stepped as the inference service steps them (services.inference.step_in_process)."""
    from drivers.runner import ModelRunner
    from services.inference import Engine

    def make(num_blocks: int = 64, block_size: int = 4, **kw):
        runner = ModelRunner(tiny_any_engine, num_blocks, block_size)
        return Engine(runner.info(), tiny_tokenizer, **kw), runner
    return make
