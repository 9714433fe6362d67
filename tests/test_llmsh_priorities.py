"""llmsh's nice, renice and ulimit, scripted against a real kernel (issue 5): what they print, their
statuses, what the kernel then holds, and EPERM for a shell without privilege."""

from __future__ import annotations

import sys

from test_llmsh import PY, SLEEPER, errors, sh, statuses

# Waits (polling, up to 10 s) until llmsh has given it the shell's priority and limits, then says them.
INHERITOR = """\
import time
import syscalls
with syscalls.connect() as c:
    want = (int(__import__("sys").argv[1]), int(__import__("sys").argv[2]))
    deadline = time.monotonic() + 10
    while (c.getpriority(), c.getrlimit()["sequences"]) != want and time.monotonic() < deadline:
        time.sleep(0.02)
    print("priority", c.getpriority(), "sequences", c.getrlimit()["sequences"])
"""


def test_nice_runs_a_command_at_a_lower_priority(llmos):
    r = sh(llmos.home, "nice; nice -n 5 nice; nice -n 5 nice -n 3 nice; nice nice; nice -n 30 nice; "
                       "nice -n 4 false; echo s=$?; nice -n x true; echo s=$?; nice -n 2; echo s=$?; "
                       "nice -n -3 nice; nice -n 7 spawn sleep 60")
    lines = r.stdout.splitlines()
    assert lines[:5] == ["0", "5", "8", "10", "19"]         # relative to the shell, clamped at 19
    assert lines[5:8] == ["s=1", "s=2", "s=2"] and lines[8] == "-3"     # llmsh is privileged
    assert errors(r) == ["llmsh: nice: -n must be an integer, not 'x'",
                         "llmsh: nice: missing COMMAND (usage: nice [-n N] [COMMAND [ARG...]])"]
    with llmos.connect() as c:
        assert c.getpriority(int(lines[9])) == 7            # spawn inherited nice's priority


def test_renice_sets_priorities_and_the_shells_own(llmos):
    r = sh(llmos.home, f"spawn {SLEEPER}; renice 5 $!; renice -n 2 $!; renice 30 $!; echo s=$?; "
                       "renice 3 99999 $!; echo s=$?; renice; echo s=$?; renice 4; echo s=$?; "
                       "renice 4 $$; nice; nice | cat; spawn sleep 60")
    lines = r.stdout.splitlines()
    child, me = int(lines[0]), int(lines[8].split(":")[0])
    assert lines[1:11] == [f"{child}: priority 0 -> 5", f"{child}: priority 5 -> 2", "s=2",
                           f"{child}: priority 2 -> 3", "s=1", "s=2", "s=2",
                           f"{me}: priority 0 -> 4", "4", "4"]     # nice | cat: a pipeline's too
    assert errors(r) == ["llmsh: renice: PRIORITY must be between -20 and 19, not 30",
                         "llmsh: renice: no process with pid 99999",
                         "llmsh: renice: missing PRIORITY (usage: renice [-n] PRIORITY PID...)",
                         "llmsh: renice: missing PID (usage: renice [-n] PRIORITY PID...)"]
    with llmos.connect() as c:
        assert c.getpriority(child) == 3
        assert c.getpriority(int(lines[-1])) == 4           # the shell's priority passes to spawn


def test_ulimit_shows_and_sets_limits_that_bind(llmos):
    r = sh(llmos.home, "ulimit -a; ulimit kv_blocks 64; ulimit kv_blocks; ulimit sequences; "
                       "ulimit storage_bytes 20; put small 12345; put big 'more than ten bytes'; "
                       "echo s=$?; echo 'more than ten bytes' | put big; echo s=$?; "
                       "ulimit storage_bytes unlimited; put big 'more than ten bytes'; echo s=$?; "
                       f"spawn {SLEEPER}; ulimit -p $! sequences 2; ulimit -p $! -a")
    lines = r.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [
        ["kv_blocks", "unlimited"], ["sequences", "unlimited"], ["tokens_per_minute", "unlimited"],
        ["storage_bytes", "unlimited"]]
    assert "KV-cache blocks" in lines[0]
    assert lines[4:9] == ["64", "unlimited", "s=1", "s=1", "s=0"]
    child = int(lines[9])
    assert [line.split()[:2] for line in lines[10:]] == [
        ["kv_blocks", "64"], ["sequences", "2"], ["tokens_per_minute", "unlimited"],
        ["storage_bytes", "unlimited"]]                     # kv_blocks came from the shell at spawn
    quota = errors(r)
    assert len(quota) == 2 and all(line.startswith("llmsh: put: ") and "storage_bytes" in line
                                   for line in quota)       # the pipeline's put was bound too
    with llmos.connect() as c:
        assert c.get("small")["value"] == "12345"
        assert c.get("big")["version"] == 1                 # stored once, after the limit went
        assert c.getrlimit(child)["sequences"] == 2
    r = sh(llmos.home, "ulimit bogus; echo s=$?; ulimit kv_blocks -3; echo s=$?; "
                       "ulimit kv_blocks 1 2; echo s=$?; ulimit -p 99999 -a; echo s=$?; "
                       "ulimit -a kv_blocks; echo s=$?")
    assert statuses(r) == [2, 2, 2, 1, 2]
    assert errors(r) == [
        "llmsh: ulimit: unknown resource 'bogus' (resources: kv_blocks, sequences, "
        "tokens_per_minute, storage_bytes)",
        "llmsh: ulimit: kv_blocks must be >= 0, not -3",
        "llmsh: ulimit: unexpected argument '2' (usage: ulimit [-p PID] [-a | RESOURCE [LIMIT | "
        "unlimited]])",
        "llmsh: ulimit: no process with pid 99999",
        "llmsh: ulimit: unexpected argument 'kv_blocks' (-a shows every limit) (usage: ulimit "
        "[-p PID] [-a | RESOURCE [LIMIT | unlimited]])"]


def test_without_privilege_nothing_is_made_more_urgent_or_raised(llmos):
    script = ("echo me=$$; nice -n -5 true; echo s=$?; nice -n 3 nice; renice 2 $$; renice 1 $$; "
              "echo s=$?; ulimit sequences 4; ulimit sequences 8; echo s=$?; "
              "ulimit sequences unlimited; echo s=$?; ulimit -p 1 sequences 3; echo s=$?; ulimit sequences")
    with llmos.connect() as c:          # not privileged, so neither is the llmsh it spawns
        pid = c.spawn([sys.executable, "-m", "userland.llmsh", "-c", script], cwd=str(llmos.paths.home))
        assert c.wait(pid, timeout=30)["status"] == 0
    out = (llmos.paths.logs / f"proc-{pid}.log").read_text().splitlines()
    assert out[0] == f"me={pid}"                            # its own spawned entry, not another
    assert out[1:] == [
        "llmsh: nice: -n -5 would make true more urgent than this shell (priority 0); that needs "
        "privilege",
        "s=1", "3", f"{pid}: priority 0 -> 2",
        f"llmsh: renice: making pid {pid} more urgent (2 -> 1) needs privilege", "s=1",
        f"llmsh: ulimit: raising sequences of pid {pid} from 4 to 8 needs privilege", "s=1",
        f"llmsh: ulimit: raising sequences of pid {pid} from 4 to unlimited needs privilege", "s=1",
        "llmsh: ulimit: pid 1 is neither the caller nor one of its descendants; that needs privilege",
        "s=1", "4"]


def test_programs_run_by_the_shell_get_its_priority_and_limits(llmos, tmp_path):
    prog = tmp_path / "inheritor.py"
    prog.write_text(INHERITOR)
    r = sh(llmos.home, f"ulimit sequences 3; nice -n 6 run {PY} {prog} 6 3; echo s=$?; "
                       f"renice 2 $$; run {PY} {prog} 2 3; run {PY} {prog} 2 3 | cat")
    lines = r.stdout.splitlines()
    assert lines[:2] == ["priority 6 sequences 3", "s=0"] and lines[2].endswith("priority 0 -> 2")
    assert lines[3:] == ["priority 2 sequences 3", "priority 2 sequences 3"]
    assert r.stderr == ""
