"""The model's driver on a GPU: which driver services run (kernel/devices.py), and drivers/cuda.py.

No GPU exists on the machines these tests run on. So the placement logic is tested with GPU counts
handed to it; the CUDA driver service runs through a booted llmos with the CPU standing in for its
GPU (tests/services/cuda_standin.py, which says what differs); and the tests that need a real GPU
are skipped, saying why, when torch.cuda.is_available() is false.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST_CONFIG, ROOT, Booted, run_cli
from kernel.devices import cuda_device_count, driver_services, place_drivers
from syscalls.runtime.config import Config
from syscalls.runtime.devices import cuda_index, is_driver
from model.tiny_gguf import write_tiny_gguf


def gpu_available() -> bool:
    import torch
    return torch.cuda.is_available()


NO_GPU = "no GPU: torch.cuda.is_available() is false (a CPU build of torch, or no device)"


def imported_after(code: str) -> list[str]:
    """The torch modules a fresh interpreter has loaded after running code."""
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\n"
                          "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    return eval(out.stdout.strip().splitlines()[-1])


# -- the inference service without torch --------------------------------------------------------

def test_the_inference_service_does_not_import_torch():
    assert imported_after("import drivers.model.llama")             # the check sees torch when it is there
    assert imported_after(
        "import services.inference.engine, services.inference.service\n"
        "from drivers.model.params import SamplingParams\n"
        "SamplingParams.from_dict({'temperature': 0.5, 'top_p': 0.9, 'seed': 1})") == []


def test_sampling_params_keep_their_old_home():
    from drivers.model import SamplingParams as exported
    from drivers.model.params import SamplingParams, SamplingParamsError
    from drivers.model.sampling import SamplingParams as old, SamplingParamsError as old_error
    assert old is SamplingParams is exported and old_error is SamplingParamsError


# -- which drivers run ---------------------------------------------------------------------------

def test_the_gpu_count_needs_no_torch_in_the_asking_process():
    """As the kernel asks at boot: the answer is torch's own, and torch stays out of the asker."""
    import torch
    code = "from kernel.devices import cuda_device_count\nprint(cuda_device_count())"
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys\nprint('torch' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, check=True, timeout=180)
    count, loaded = out.stdout.split()
    assert int(count) == torch.cuda.device_count() and loaded == "False"
    assert cuda_device_count() == int(count)


@pytest.mark.parametrize("device, gpus, want", [
    ("cpu", 2, ["cpu"]), ("auto", 0, ["cpu"]), ("auto", 2, ["cuda0", "cuda1"]), ("cuda", 1, ["cuda0"])])
def test_driver_services_for_each_device(device, gpus, want):
    assert driver_services(device, gpus) == want


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "torch sees no GPU"), ("gpu", 1, "driver.device must be one of auto, cpu, cuda")])
def test_driver_services_refuse(device, gpus, message):
    with pytest.raises(ValueError, match=message):
        driver_services(device, gpus)


def config(home: Path, text: str) -> Config:
    (home / "config.toml").write_text(text)
    return Config.load(home / "config.toml")


def test_driver_in_services_is_where_the_drivers_go(tmp_path):
    cfg = config(tmp_path, "")                                   # device = "auto"
    assert place_drivers(cfg, gpus=2) == ["cuda0", "cuda1"]
    assert cfg.services == ["storage", "tokenizer", "cuda0", "cuda1", "inference"]
    assert cfg.modules["cuda0"] == cfg.modules["cuda1"] == "drivers.cuda"
    cfg = config(tmp_path, '[driver]\ndevice = "cpu"\n')
    assert place_drivers(cfg, gpus=2) == ["cpu"] and "cuda0" not in cfg.modules
    cfg = config(tmp_path, '[services]\nenabled = ["storage"]\nmodules = {cuda0 = "my.driver"}\n')
    assert place_drivers(cfg, gpus=0) == ["cuda0"] and cfg.modules["cuda0"] == "my.driver"
    cfg = config(tmp_path, '[services]\nenabled = ["storage", "cpu"]\n')    # the spelling of old
    assert cfg.services == ["storage", "driver"] and place_drivers(cfg, gpus=1) == ["cuda0"]
    cfg = config(tmp_path, '[driver]\ndevice = "tpu"\n[services]\nenabled = ["storage"]\n')
    with pytest.raises(ValueError, match="driver.device"):
        place_drivers(cfg, gpus=0)


def test_driver_names():
    assert cuda_index("cuda0") == 0 and cuda_index("cuda12") == 12
    for bad in ("cuda", "cuda01", "cpu", "cuda1x"):
        with pytest.raises(ValueError):
            cuda_index(bad)
    assert is_driver("cpu") and is_driver("cuda3") and not is_driver("inference")


@pytest.mark.skipif("gpu_available()", reason="a GPU is present, so device = cuda boots")
def test_boot_refuses_cuda_when_torch_sees_no_gpu(home):
    (home / "config.toml").write_text(FAST_CONFIG + '[driver]\ndevice = "cuda"\n'
                                      '[services]\nenabled = ["storage", "cpu"]\n')
    r = run_cli(home, "boot", "--timeout", "30", timeout=60)
    assert r.returncode != 0 and "torch sees no GPU" in r.stdout + r.stderr
    assert Booted(home).paths.kernel_pid() is None              # the kernel stopped at once


# -- the CUDA driver service -----------------------------------------------------------------------

def local_greedy(model: Path, prompt: str, n: int, device: str) -> list[int]:
    from drivers.model import Tokenizer
    from drivers.runner import ModelRunner
    from services.inference import Engine, run_in_process
    runner = ModelRunner.from_gguf(model, num_blocks=64, device=device)
    engine = Engine(runner.info(), Tokenizer.from_gguf(model))
    engine.add(prompt, {"temperature": 0.0}, max_tokens=n, ignore_eos=True)
    return next(iter(run_in_process(engine, runner).values()))["tokens"]


def maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_cuda_driver_serves_generate_with_the_cpu_standing_in(home):
    """No GPU here: cuda0 runs drivers/cuda.py's service with torch device "cpu" (see cuda_standin.py).
    The kernel starts it under its name, the inference service steps it, models reports it."""
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(
        FAST_CONFIG + f'[driver]\nmodel = "{model}"\nkv_blocks = 64\n'
        '[services]\nenabled = ["storage", "tokenizer", "inference"]\n'
        'modules = {cuda0 = "tests.services.cuda_standin"}\n')
    system = Booted(home).boot()
    try:
        with system.connect(privileged=True) as c:
            services = {s["name"]: s for s in c.services()}
            tokens = [t for ch in c.generate("hello world", max_tokens=10, temperature=0.0,
                                             ignore_eos=True) for t in ch.tokens]
            c.model_add(str(model), "tiny")
            row = next(m for m in c.models() if m["name"] == "tiny")
        assert set(services) == {"storage", "tokenizer", "inference", "cuda0"}
        assert all(s["state"] == "READY" for s in services.values())
        # the inference service ran all of it without loading torch; the driver did load it
        assert "libtorch" not in maps(services["inference"]["pid"])
        assert "libtorch" in maps(services["cuda0"]["pid"])
    finally:
        system.shutdown()
    assert tokens == local_greedy(model, "hello world", 10, "cpu")
    memory = row["memory"]
    assert memory["device_name"] == "cpu standing in for cuda:0"
    assert 0 < memory["memory_used"] < memory["memory_total"] and memory["num_blocks"] == 64


@pytest.mark.skipif("not gpu_available()", reason=NO_GPU)
def test_the_cuda_driver_on_a_real_gpu(home):
    import torch
    model = write_tiny_gguf(home / "tiny.gguf")
    (home / "config.toml").write_text(
        FAST_CONFIG + f'[driver]\ndevice = "cuda"\nmodel = "{model}"\nkv_blocks = 64\n'
        '[services]\nenabled = ["storage", "tokenizer", "driver", "inference"]\n')
    system = Booted(home).boot()
    try:
        with system.connect(privileged=True) as c:
            names = {s["name"] for s in c.services()}
            tokens = [t for ch in c.generate("hello world", max_tokens=10, temperature=0.0,
                                             ignore_eos=True) for t in ch.tokens]
            c.model_add(str(model), "tiny")
            row = next(m for m in c.models() if m["name"] == "tiny")
    finally:
        system.shutdown()
    gpus = torch.cuda.device_count()
    assert names == {"storage", "tokenizer", "inference", *(f"cuda{i}" for i in range(gpus))}
    assert row["device"] == "cuda:0" and row["memory"]["device_name"] == torch.cuda.get_device_name(0)
    assert 0 < row["memory"]["memory_used"] <= row["memory"]["memory_total"]
    assert tokens == local_greedy(model, "hello world", 10, "cuda:0")
