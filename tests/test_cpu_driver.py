"""The CPU driver service: loads a model, runs steps for another service through the kernel."""

import os
import signal
import time

from conftest import FAST_CONFIG, Booted, wait_until
from model.tiny_gguf import write_tiny_gguf


def test_cpu_driver_steps_match_the_library(home):
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(
        FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 64\n'
        f'\n[services]\nenabled = ["storage", "cpu"]\n'
        f'modules = {{drivertest = "tests.services.drivertest"}}\n')
    system = Booted(home).boot()
    try:
        with system.connect() as c:
            states = {s["name"]: s["state"] for s in c.services()}
            assert states == {"storage": "READY", "cpu": "READY", "drivertest": "READY"}
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
    # the same greedy decode in this process, through the library the driver wraps
    from drivers.runner import ModelRunner
    from tests.services.drivertest import PROMPT
    local = ModelRunner.from_gguf(model, num_blocks=64)
    blocks = list(range((len(PROMPT) + 8) // 16 + 1))
    want = [local.step([{"seq_id": 1, "tokens": PROMPT, "start": 0, "block_table": blocks,
                         "sample": True, "params": {"temperature": 0.0}}])[0]["token"]]
    while len(want) < 8:
        want.append(local.step([{"seq_id": 1, "tokens": want[-1:],
                                 "start": len(PROMPT) + len(want) - 1, "block_table": blocks,
                                 "sample": True, "params": None}])[0]["token"])
    assert tokens == want
