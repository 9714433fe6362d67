"""The CPU driver service: loads a model, runs steps for another service through the kernel."""

import os
import signal
import time

import pytest

from conftest import FAST_CONFIG, FAST_SUPERVISION, Booted, wait_until
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


def waiting_for_its_token(pid: int) -> bool:
    """A spare has done its imports: its main thread is in read(0, ...), on its stdin."""
    try:
        call = open(f"/proc/{pid}/syscall").read().split()
    except OSError:
        return False
    return call[0] == "0" and int(call[1], 16) == 0


def test_a_driver_that_dies_comes_back_as_its_spare(home):
    """The boot driver keeps a spare process that has imported torch before it is needed; a kill
    of the driver makes the spare the driver (same answers), and a new spare is started; a spare
    that dies is replaced at the driver's next READY, and the driver starts cold meanwhile."""
    from tiny_system import MODEL_SERVICES
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(FAST_CONFIG + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 64\n'
                                      + MODEL_SERVICES)
    system = Booted(home).boot()
    greedy = dict(max_tokens=12, ignore_eos=True, temperature=0.0)
    try:
        with system.connect() as c:
            want = "".join(ch.text for ch in c.generate("The spare", **greedy))
        spare = wait_until(lambda: system.service("cpu")["spare"], 10, "the driver's spare")
        wait_until(lambda: waiting_for_its_token(spare), 60, "the spare to finish its imports")
        assert "libtorch" in open(f"/proc/{spare}/maps").read()
        os.kill(system.service("cpu")["pid"], signal.SIGKILL)
        wait_until(lambda: (s := system.service("cpu"))["state"] == "READY" and s["pid"] == spare, 10,
                   "the spare to be the driver")
        with system.connect() as c:
            assert "".join(ch.text for ch in c.generate("The spare", **greedy)) == want
        second = wait_until(lambda: (s := system.service("cpu"))["spare"] not in (None, spare)
                            and s["spare"], 10, "a new spare")
        os.kill(second, signal.SIGKILL)
        wait_until(lambda: system.service("cpu")["spare"] is None, 10, "the dead spare to be dropped")
        os.kill(spare, signal.SIGKILL)
        wait_until(lambda: (s := system.service("cpu"))["state"] == "READY"
                   and s["pid"] not in (spare, second), 20, "a cold start of the driver")
        wait_until(lambda: system.service("cpu")["spare"] not in (None, spare, second), 10, "a third spare")
        with system.connect() as c:
            assert "".join(ch.text for ch in c.generate("The spare", **greedy)) == want
            assert next(s for s in c.services() if s["name"] == "cpu")["restarts"] == 2
            assert next(s for s in c.services() if s["name"] == "storage")["spare"] is None
    finally:
        system.shutdown()
    assert not any(os.path.exists(f"/proc/{pid}") and open(f"/proc/{pid}/stat").read().split()[2] != "Z"
                   for pid in (spare, second))


def test_no_spare_when_the_config_says_so(home):
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(
        FAST_SUPERVISION + "spare_drivers = false\n\n[gateway]\nenabled = false\n"
        f'\n[driver]\nmodel = "{model}"\nkv_blocks = 64\n[services]\nenabled = ["storage", "cpu"]\n')
    system = Booted(home).boot()
    try:
        old = system.service("cpu")
        assert old["spare"] is None
        os.kill(old["pid"], signal.SIGKILL)
        wait_until(lambda: (s := system.service("cpu"))["state"] == "READY" and s["pid"] != old["pid"],
                   20, "the cpu driver to come back")
        assert system.service("cpu")["spare"] is None
    finally:
        system.shutdown()


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
        spare = wait_until(lambda: system.service("cpu")["spare"], 10, "the driver's spare")
        wait_until(lambda: waiting_for_its_token(spare), 30, "the spare to finish its imports")
        spare_maps = open(f"/proc/{spare}/maps").read()
    finally:
        system.shutdown()
    assert "libtorch" not in maps and "llmos-native" in maps
    assert "libtorch" not in spare_maps         # nor does its spare: the config asks for the lean engine
    assert info["engine"].startswith("lean") and info["kv_dtype"] == "bfloat16" and info["steps"] == 8
    from drivers.runner import ModelRunner
    assert tokens == local_greedy(ModelRunner.from_gguf(model, num_blocks=64, dense_copy="never"))
