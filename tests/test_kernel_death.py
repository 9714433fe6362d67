"""kill -9 of the kernel: every process of llmos goes with it, and the next `llmos boot` recovers
what was acknowledged (storage, a saved context, a registered model) and starts the daemons again
(issue 13, item 7; docs/reliability.md says what survives and what does not)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from conftest import Booted, process_exists, wait_until
from test_contexts import make_home, plain, turn


def llmos_pids(kernel_pid: int, services: list[dict], ps: list[dict]) -> list[int]:
    """The OS pids of the kernel, its services and its programs (not this test's own process, which
    is one of them only by connecting)."""
    return [kernel_pid] + [s["pid"] for s in services if s["pid"]] + [
        p["os_pid"] for p in ps if p.get("os_pid") and p["os_pid"] != os.getpid()]


def test_after_kill_9_of_the_kernel_a_boot_recovers_storage_contexts_models_and_daemons():
    home = make_home()
    with open(home / "config.toml", "a") as f:
        f.write('\n[[daemons]]\nname = "sleeper"\nargv = ["sleep", "600"]\nrestart = "always"\n')
    s = Booted(home).boot()
    try:
        with s.connect(privileged=True) as c:
            c.put("notes/kept", {"acknowledged": True})
            c.model_add(str(home / "tiny.gguf"), "tiny")
            ctx = c.open_context(system="You are terse.")
            first, _ = turn(c, ctx, "hello there")
            c.save_context(ctx, "chats/kept")
            unsaved = c.open_context(system="Gone with the kernel.")
            turn(c, unsaved, "this one is never saved")
            before = llmos_pids(s.kernel_pid, c.services(), c.ps())
            daemon = next(p for p in c.ps() if p["name"] == "sleeper")["os_pid"]
        os.kill(s.kernel_pid, signal.SIGKILL)
        # no orphan: services and programs die with their kernel (PDEATHSIG), the daemon too
        wait_until(lambda: not any(process_exists(pid) for pid in before), 10, "every llmos process to end")
        assert daemon in before and s.paths.kernel_pid() is None
        s.boot()
        with s.connect() as c:
            assert c.get("notes/kept")["value"] == {"acknowledged": True}
            assert "tiny" in {m["name"] for m in c.models()}
            assert next(p for p in c.ps() if p["name"] == "sleeper")["os_pid"] != daemon   # started again
            ctx = c.load_context("chats/kept")
            second, end = turn(c, ctx, "and then?")
            assert end.cached_tokens == 0                  # its KV died with the driver: recomputed
            assert second == plain(c, [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "hello there"},
                                       {"role": "assistant", "content": c.detokenize(first)},
                                       {"role": "user", "content": "and then?"}])
            assert not [x for x in c.contexts() if x["ctx"] == unsaved]   # never saved: gone
        assert Path(s.paths.data / "storage.db").exists()
    finally:
        s.discard()
