"""The ``llmos`` command: boot, status, shutdown and logs of the llmos in LLMOS_HOME, its models,
and the HTTP gateway's API keys."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

import syscalls
from syscalls.runtime.logs import render_lines
from syscalls import errors
from syscalls.paths import Paths

BOOT_TIMEOUT = 600.0    # loading a large model can take minutes; progress is shown meanwhile
GATEWAY_WAIT = 10.0     # after the services are ready, how long boot waits to say the gateway's URL


def _fmt_uptime(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cmd_boot(paths: Paths, args) -> int:
    pid = paths.kernel_pid()
    if pid:
        print(f"llmos: already running in {paths.home} (kernel pid {pid})", file=sys.stderr)
        return 1
    paths.ensure()
    with open(paths.log_file("kernel.out"), "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "kernel", "--home", str(paths.home)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, env=dict(os.environ, LLMOS_HOME=str(paths.home)))
    deadline = time.monotonic() + args.timeout
    shown = ""
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if code == 3:
                print(f"llmos: already running in {paths.home}", file=sys.stderr)
            else:
                said = paths.log_file("kernel.out").read_text(errors="replace").strip()
                last = said.splitlines()[-1] if said else "see `llmos logs kernel`"
                print(f"llmos: the kernel exited with status {code} while booting: {last}",
                      file=sys.stderr)
            return 1
        if paths.programs_sock.exists():
            try:
                with syscalls.connect(paths.home, name="llmos-boot", timeout=5) as os_:
                    services = os_.services()
            except errors.LLMOSError:
                services = None
            if services is not None:
                failed = [s["name"] for s in services if s["state"] == "FAILED"]
                if failed:
                    print(f"llmos: service(s) failed to start: {', '.join(failed)}; see "
                          f"`llmos logs {failed[0]}`", file=sys.stderr)
                    return 1
                if all(s["state"] == "READY" for s in services):
                    print(f"llmos: booted in {paths.home} (kernel pid {proc.pid}, "
                          f"{len(services)} services ready)")
                    _show_gateway(paths, deadline)
                    return 0
                line = "; ".join(_progress(s) for s in services if s["state"] != "READY")
                if line != shown and sys.stderr.isatty():
                    print(f"\rllmos: waiting for {line}\x1b[K", end="", file=sys.stderr, flush=True)
                shown = line
        time.sleep(0.05)
    print(f"\nllmos: not ready after {args.timeout:.0f}s; see `llmos status` and `llmos logs`",
          file=sys.stderr)
    return 1


def _show_gateway(paths: Paths, deadline: float) -> None:
    """Where the gateway listens, once it says (it starts beside the services, within a second)."""
    until = min(deadline, time.monotonic() + GATEWAY_WAIT)
    with syscalls.connect(paths.home, name="llmos-boot", timeout=5) as os_:
        while True:
            gateway = next((p for p in os_.ps() if p["daemon"] and p["name"] == "gateway"), None)
            if gateway is None or gateway["advertised"] or time.monotonic() > until:
                break
            time.sleep(0.05)
    if gateway is not None:
        print(f"llmos: gateway {_advertised(gateway['advertised'])}")


def _advertised(info: dict) -> str:
    """What a daemon advertised, in a line: its state, then its url or error."""
    if not info:
        return "(starting)"
    return " ".join(v for v in (info.get("state"), info.get("url"), info.get("error")) if v)


def _progress(svc: dict) -> str:
    p = svc.get("progress") or {}
    if "done" in p and "total" in p and p["total"]:
        return f"{svc['name']} {p.get('what', '')} {100 * p['done'] / p['total']:.0f}%"
    return f"{svc['name']} ({svc['state'].lower()})"


def cmd_status(paths: Paths, args) -> int:
    pid = paths.kernel_pid()
    if not pid:
        print(f"llmos: not running in {paths.home}")
        return 1
    with syscalls.connect(paths.home, name="llmos-status", timeout=10) as os_:
        u = os_.uname()
        services = os_.services()
        procs = os_.ps()
        try:            # a light llmos (no tokenizer service) has no models to show
            models = [m for m in os_.models() if m.get("state") not in (None, "absent")]
        except errors.LLMOSError:
            models = []
    print(f"llmos {u['version']} (abi {u['abi']}) in {u['home']}")
    print(f"kernel  pid {u['kernel_pid']}  up {_fmt_uptime(time.time() - u['boot_time'])}  "
          f"processes {len(procs)}")
    print(f"{'SERVICE':<12} {'PID':>7} {'STATE':<9} {'RESTARTS':>8} {'UPTIME':>8}  LAST EXIT")
    for s in services:
        print(f"{s['name']:<12} {s['pid'] or '-':>7} {s['state']:<9} {s['restarts']:>8} "
              f"{_fmt_uptime(s['uptime']):>8}  {s['last_exit'] or ''}")
    if models:
        from userland.shell.builtin import size
        from userland.shell.commands.models import expires, held, model_state, used
        budget = models[0].get("budget")
        total = sum(m.get("memory_bytes") or 0 for m in models if m.get("state") != "failed")
        print(f"{'MODEL':<24} {'STATE':<12} {'DRIVER':<16} {'MEM':>8} {'USED':>10} {'EXPIRES':>10}"
              + (f"  (memory budget {size(budget)}, {size(total)} held)" if budget else ""))
    for m in models:
        print(f"{m['name']:<24} {model_state(m):<12} {m.get('driver') or '-':<16} {held(m):>8} "
              f"{used(m):>10} {expires(m):>10}" + (f"  {m['error']}" if m.get("error") else ""))
    daemons = [p for p in procs if p["daemon"]]
    if daemons:
        print(f"{'DAEMON':<12} {'PID':>7} {'STATE':<10} {'RESTARTS':>8}  ADVERTISED")
    for p in daemons:
        print(f"{p['name']:<12} {p['pid']:>7} {p['state']:<10} {p['restarts']:>8}  "
              f"{_advertised(p['advertised'])}")
    return 0


def cmd_shutdown(paths: Paths, args) -> int:
    pid = paths.kernel_pid()
    if not pid:
        print(f"llmos: not running in {paths.home}", file=sys.stderr)
        return 1
    try:
        with syscalls.connect(paths.home, name="llmos-shutdown", privileged=True, timeout=5) as os_:
            os_.shutdown()
    except errors.LLMOSError as e:
        print(f"llmos: shutdown call failed ({e}); sending SIGTERM to the kernel", file=sys.stderr)
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if paths.kernel_pid() is None:
            print("llmos: stopped")
            return 0
        time.sleep(0.05)
    print(f"llmos: the kernel did not stop within {args.timeout:.0f}s; killing it", file=sys.stderr)
    os.kill(pid, signal.SIGKILL)
    return 1


def cmd_logs(paths: Paths, args) -> int:
    names = [args.name] if args.name else sorted(p.stem for p in paths.logs.glob("*.log"))
    if not names:
        print(f"llmos: no logs in {paths.logs}", file=sys.stderr)
        return 1
    for name in names:
        path = paths.log_file(name)
        if not path.exists():
            known = ", ".join(sorted(p.stem for p in paths.logs.glob("*.log")))
            print(f"llmos: no log named {name!r} (logs: {known})", file=sys.stderr)
            return 1
        lines = path.read_text(errors="replace").splitlines()[-args.lines:]
        if len(names) > 1:
            print(f"==> {name} <==")
        for line in render_lines(lines):
            print(line)
    return 0


def cmd_models(paths: Paths, args) -> int:
    from userland.shell.commands.models import show_models
    with syscalls.connect(paths.home, name="llmos-models", timeout=30) as os_:
        show_models(sys.stdout, os_.models())
    return 0


def cmd_model(paths: Paths, args) -> int:
    if args.action == "clean":          # files of this home, like logs: no kernel needed
        from syscalls.runtime.models import Registry
        registry = Registry(paths)
        freed = registry.clean_cache()
        print(f"llmos: model cache {registry.cache_dir}: freed {freed} bytes, {registry.cache_bytes()} left"
              " (kernel measurements)")
        return 0
    with syscalls.connect(paths.home, name="llmos-model", timeout=60) as os_:
        if args.action == "show":
            from userland.shell.commands.models import find_model, show_model
            show_model(sys.stdout, find_model(os_.models(), args.name))
        elif args.action in ("add", "update"):
            replace = args.action == "update" or args.replace
            m = os_.model_add(os.path.abspath(args.path), args.name, replace=replace)
            print(f"llmos: {'updated' if replace else 'added'} model {m['name']}: {m['path']}")
        elif args.action == "load":
            from syscalls.runtime.config import parse_keep_alive
            try:
                keep = None if args.keep_alive is None else parse_keep_alive(args.keep_alive, "--keep-alive")
            except ValueError as e:
                print(f"llmos: model load: {e}", file=sys.stderr)
                return 2
            m = os_.model_load(args.name, keep_alive=keep)
            print(f"llmos: model {m['model']} is {m['state']} ({m['driver']})")
        elif args.action == "unload":
            m = os_.model_load(args.name, keep_alive=0)
            print(f"llmos: model {m['model']} unloads once idle" if m["state"] != "absent"
                  else f"llmos: model {m['model']} is not loaded")
        else:
            os_.model_remove(args.name, force=args.force)
            print(f"llmos: removed model {args.name}")
    return 0


def cmd_keys(paths: Paths, args) -> int:
    from userland.gateway import keys
    with syscalls.connect(paths.home, name="llmos-keys", privileged=True, timeout=30) as os_:
        try:
            if args.action == "add":
                limits = dict(_limit(text) for text in args.limit)
                key = keys.add(os_, args.name, args.priority, limits)
                shown = ", ".join(f"{r}={n}" for r, n in limits.items()) or "none"
                print(f"llmos: added key {args.name} (priority {args.priority}, limits {shown}); "
                      f"it is shown this once:")
                print(key)
            elif args.action == "rm":
                keys.remove(os_, args.name)
                print(f"llmos: removed key {args.name}")
            else:
                print(f"{'NAME':<24} {'PRIORITY':>8}  {'CREATED':<20} LIMITS")
                for k in keys.listing(os_):
                    made = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(k["created"]))
                    limits = ", ".join(f"{r}={n}" for r, n in k["limits"].items())
                    print(f"{k['name']:<24} {k['priority']:>8}  {made:<20} {limits}")
        except ValueError as e:
            print(f"llmos: keys {args.action}: {e}", file=sys.stderr)
            return 1
    return 0


def _limit(text: str) -> tuple[str, int]:
    resource, _, n = text.partition("=")
    if not n.isdigit():
        raise ValueError(f"--limit {text!r}: write RESOURCE=N, e.g. tokens_per_minute=2000")
    return resource, int(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmos", description="Boot and manage llmos.")
    parser.add_argument("--home", help="LLMOS_HOME (default: $LLMOS_HOME or ~/.llmos)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("boot", help="start the kernel as a daemon and wait until it is ready")
    p.add_argument("--timeout", type=float, default=BOOT_TIMEOUT)
    sub.add_parser("status", help="kernel and services: pids, states, restarts, uptimes")
    p = sub.add_parser("shutdown", help="stop every program, service and the kernel")
    p.add_argument("--timeout", type=float, default=8.0)
    p = sub.add_parser("logs", help="show the logs (of one process, or all)")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--lines", type=int, default=50)
    sub.add_parser("models", help="the models llmos knows (* marks the default)")
    p = sub.add_parser("model", help="add, remove or show a model (a GGUF file); clean the model cache")
    action = p.add_subparsers(dest="action", required=True)
    a = action.add_parser("add", help="check a Llama GGUF file and add it under a name")
    a.add_argument("path")
    a.add_argument("--name", help="default: the file's name without .gguf, lowercased")
    a.add_argument("--replace", action="store_true",
                   help="the name exists: point it at this file live (as model update)")
    a = action.add_parser("update", help="point an added model at a new file (or its file, "
                                         "rewritten) live: requests in flight finish on the old one")
    a.add_argument("name")
    a.add_argument("path")
    a = action.add_parser("load", help="load a model now, ahead of its requests")
    a.add_argument("name")
    a.add_argument("--keep-alive", help="how long it stays loaded once idle: seconds, or 5m, 1h; -1: "
                                        "until evicted (default: [models] keep_alive)")
    a = action.add_parser("unload", help="unload a model as soon as it is idle")
    a.add_argument("name")
    a = action.add_parser("rm", help="forget an added model (the file stays)")
    a.add_argument("name")
    a.add_argument("--force", action="store_true",
                   help="even in use: its requests end with an error and its contexts close")
    a = action.add_parser("show", help="how a model's weights are held: types, bytes, kernels")
    a.add_argument("name")
    action.add_parser("clean", help="remove what the model cache holds that nothing uses")
    p = sub.add_parser("keys", help="API keys of the HTTP gateway: each a process with its limits")
    action = p.add_subparsers(dest="action", required=True)
    a = action.add_parser("add", help="make a key; it is printed once, alone on the last line")
    a.add_argument("name")
    a.add_argument("--priority", type=int, default=0, help="nice-style, -20 (most urgent) .. 19")
    a.add_argument("--limit", action="append", default=[], metavar="RESOURCE=N",
                   help="kv_blocks, sequences or tokens_per_minute (repeatable)")
    action.add_parser("list", help="the keys: name, priority, limits (never the key)")
    a = action.add_parser("rm", help="remove a key: its requests end, it no longer works")
    a.add_argument("name")
    args = parser.parse_args(argv)
    paths = Paths.from_env(args.home)
    handler = {"boot": cmd_boot, "status": cmd_status, "shutdown": cmd_shutdown,
               "logs": cmd_logs, "models": cmd_models, "model": cmd_model,
               "keys": cmd_keys}[args.command]
    try:
        return handler(paths, args)
    except errors.LLMOSError as e:
        print(f"llmos: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
