"""A booted llmos running a tiny random model (model/tiny_gguf.py) with a long context, for the
userland tests that generate: it boots in seconds and generates hundreds of tokens a second, so a
generation of a few thousand tokens lasts long enough to be watched, stopped or interrupted.

Import the fixture into a test module: ``from tiny_system import tiny_system  # noqa: F401``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, Booted
from model.tiny_gguf import write_tiny_gguf

MODEL_SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
CONTEXT = 4096
KV_BLOCKS = 1024         # of 16 tokens: room for a few full-length generations at once


@pytest.fixture(scope="module")
def tiny_system():
    """llmos with the tiny model loaded and registered as "tiny" (so `models` shows it loaded)."""
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf", context=CONTEXT)
    (home / "config.toml").write_text(
        FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = {KV_BLOCKS}\n' + MODEL_SERVICES)
    system = Booted(home).boot()
    try:
        with system.connect(privileged=True) as c:
            c.model_add(str(model), "tiny")
        system.model = model
        yield system
    finally:
        system.shutdown()
        shutil.rmtree(home, ignore_errors=True)
