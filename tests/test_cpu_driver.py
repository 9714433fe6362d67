"""The CPU driver service: loads a model, runs steps for another service through the kernel."""

import os
import signal
import time

import pytest

from conftest import FAST_CONFIG, Booted, wait_until
from model.tiny_gguf import write_tiny_gguf


def boot_with_drivertest(home, model, driver: str = ""):
    """Boot storage, the cpu driver on `model` and the drivertest service (which decodes through
    it); returns the booted system, once the three are READY."""
    (home / "config.toml").write_text(
        FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 64\n{driver}'
        f'\n[services]\nenabled = ["storage", "cpu"]\n'
        f'modules = {{drivertest = "tests.services.drivertest"}}\n')
    system = Booted(home).boot()
    with system.connect() as c:
        states = {s["name"]: s["state"] for s in c.services()}
    assert states == {"storage": "READY", "cpu": "READY", "drivertest": "READY"}
    return system


def local_greedy(runner) -> list[int]:
    """What drivertest decodes, in this process, through the library the driver wraps."""
    from tests.services.drivertest import PROMPT
    blocks = list(range((len(PROMPT) + 8) // 16 + 1))
    want = [runner.step([{"seq_id": 1, "tokens": PROMPT, "start": 0, "block_table": blocks,
                          "sample": True, "params": {"temperature": 0.0}}])[0]["token"]]
    while len(want) < 8:
        want.append(runner.step([{"seq_id": 1, "tokens": want[-1:],
                                  "start": len(PROMPT) + len(want) - 1, "block_table": blocks,
                                  "sample": True, "params": None}])[0]["token"])
    return want


def test_cpu_driver_steps_match_the_library(home):
    model = write_tiny_gguf(home / "tiny.gguf")
    system = boot_with_drivertest(home, model)
    try:
        with system.connect() as c:
            tokens = c.get("drivertest/tokens")["value"]
            info = c.get("drivertest/info")["value"]
        old = system.service("cpu")
        os.kill(old["pid"], signal.SIGKILL)                 # a model service is back within 5 s
        started = time.monotonic()
        wait_until(lambda: (s := system.service("cpu"))["state"] == "READY"
                   and s["pid"] != old["pid"], 5, "the cpu driver to come back")
        assert time.monotonic() - started < 5
    finally:
        system.shutdown()
    assert info["device"] == "cpu" and info["num_blocks"] == 64 and info["steps"] == 8
    assert info["engine"] == "torch"
    from drivers.runner import ModelRunner
    assert tokens == local_greedy(ModelRunner.from_gguf(model, num_blocks=64))


def test_a_lean_driver_runs_without_torch(home):
    """dense_copy = "never" on a file native.c multiplies: the driver process never maps libtorch,
    and decodes what the lean library does in this process."""
    from drivers.model import native
    if native.library() is None:
        pytest.skip(f"the lean engine needs llmos's compiled kernels, which cannot run here: {native.why_not()}")
    model = write_tiny_gguf(home / "tiny.gguf")
    system = boot_with_drivertest(home, model, 'dense_copy = "never"\n')
    try:
        with system.connect() as c:
            tokens = c.get("drivertest/tokens")["value"]
            info = c.get("drivertest/info")["value"]
        maps = open(f"/proc/{system.service('cpu')['pid']}/maps").read()
    finally:
        system.shutdown()
    assert "libtorch" not in maps and "llmos-native" in maps
    assert info["engine"].startswith("lean") and info["kv_dtype"] == "bfloat16" and info["steps"] == 8
    from drivers.runner import ModelRunner
    assert tokens == local_greedy(ModelRunner.from_gguf(model, num_blocks=64, dense_copy="never"))
