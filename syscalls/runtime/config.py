"""llmos's tunables, read from LLMOS_HOME/config.toml by the kernel and by the services; every key is optional.

    [kernel]       max_in_flight, mailbox_messages, mailbox_bytes, max_subscriptions,
                   call_deadline, zombies_per_parent, users_group, processes_per_user
    [supervisor]   ping_interval, ping_timeout, start_timeout, max_restarts, restart_window,
                   backoff_base, backoff_max
    [storage]      value_limit, quota_bytes, max_db_bytes
    [scheduler]    max_running, token_budget, max_queue, band, aging_s, quantum, decode_steps
                   (model work; see services/inference/policy.py)
    [driver]       device, model, kv_blocks, block_size, threads, kv_dtype, dense_copy,
                   dense_copy_budget, native, engine (drivers)
    [models]       memory_budget, keep_alive, load_timeout: which models stay resident
                   (services/inference/pager.py)
    [services]     enabled = ["storage", ...]; modules = {name = "python.module"} adds services
    [[daemons]]    name, argv, restart (never|on-failure|always), priority, env, cwd, privileged:
                   programs the kernel starts at boot and keeps running by their restart policy
    [gateway]      enabled, listen, require_key, contexts_per_key: the HTTP gateway
                   (userland/gateway), a daemon like the others (``Config.load`` adds it to
                   ``daemons``), on by default

An unknown section or key is an error, so a typo never silently leaves a default in force.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


# The services llmos knows, and the module each runs (``python -m MODULE``).
SERVICE_MODULES = {
    "storage": "services.storage",
    "tokenizer": "services.tokenizer",
    "cpu": "drivers.cpu",
    "inference": "services.inference",
}
# In services.enabled, the model's driver: the kernel puts the driver services [driver] device
# means in its place (kernel/devices.py). Configs written before it had a name of its own said "cpu".
MODEL_DRIVER = "driver"


@dataclass
class KernelConfig:
    max_in_flight: int = 256          # calls one process may have open at once
    mailbox_messages: int = 1024
    mailbox_bytes: int = 16 << 20
    max_subscriptions: int = 256      # topic prefixes one process may subscribe to
    call_deadline: float = 60.0       # how long a call may wait for its service to come back
    zombies_per_parent: int = 256
    users_group: str = ""             # an OS group whose members may connect too (kernel/users.py)
    processes_per_user: int = 256     # live processes one uid may have, beside root and the kernel's

    def check(self) -> None:
        if self.users_group:
            try:
                gid = grp.getgrnam(self.users_group).gr_gid
            except KeyError:
                raise ValueError(f"config: kernel.users_group names no OS group: "
                                 f"{self.users_group!r}") from None
            if os.geteuid() != 0 and gid not in os.getgroups():     # it could not chgrp its socket
                raise ValueError(f"config: kernel.users_group: the kernel's user (uid {os.geteuid()}) "
                                 f"must be root or a member of group {self.users_group!r}")
        if self.processes_per_user < 1:
            raise ValueError("config: kernel.processes_per_user must be >= 1")
        if self.max_subscriptions < 0:
            raise ValueError("config: kernel.max_subscriptions must be >= 0")


@dataclass
class SupervisorConfig:
    ping_interval: float = 0.5
    ping_timeout: float = 2.0         # no pong for this long: the service is hung, kill it
    start_timeout: float = 20.0       # no hello (or progress event) for this long after start
    max_restarts: int = 5             # more restarts than this within restart_window: FAILED
    restart_window: float = 60.0
    backoff_base: float = 0.5         # 2nd restart waits this, then doubling...
    backoff_max: float = 30.0         # ...up to this
    spare_drivers: bool = True        # each boot driver keeps a spare process with its imports done
                                      # (torch's: ~160 MB), so a driver that dies is back in the
                                      # time of its model's load (kernel/supervisor.py, rule 4)


@dataclass
class StorageConfig:
    value_limit: int = 1 << 20
    quota_bytes: int = 1 << 30
    # the database's size for puts (0: as large as the disk allows); past it a put is ENOSPC,
    # while deletes may still use a reserve above it (services/storage.py, DELETE_RESERVE)
    max_db_bytes: int = 0

    def check(self) -> None:
        if self.max_db_bytes and self.max_db_bytes < 1 << 20:
            raise ValueError(f"config: storage.max_db_bytes must be 0 (no limit) or at least "
                             f"1048576 (1 MiB), got {self.max_db_bytes}")


@dataclass
class SchedulerConfig:
    max_running: int = 32           # requests in one batch step
    token_budget: int = 256         # tokens fed in one step (prompt chunks fill what decoders leave)
    max_queue: int = 1024           # requests waiting beyond the batch; more is EAGAIN
    band: int = 5                   # nice levels: requests less urgent than the most urgent by more sit out
    aging_s: float = 2.0            # a waiting request gains one level of urgency per this many seconds
    quantum: float = 16.0           # tokens a running request is ahead before a fairer one swaps in
    decode_steps: int = 4           # tokens a decoder may get per driver step while nobody waits

    def check(self) -> None:
        for name in ("max_running", "token_budget", "max_queue", "decode_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: scheduler.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.band <= 39 or self.aging_s <= 0 or self.quantum < 0:
            raise ValueError("config: scheduler.band must be in 0..39, aging_s > 0 and quantum >= 0")


@dataclass
class DriverConfig:
    device: str = "auto"            # auto | cpu | cuda: where the model's driver runs (kernel/devices.py)
    model: str = ""                 # a registered model name or an absolute path; "": the default
    kv_blocks: int = 1024           # KV cache blocks of block_size tokens each
    block_size: int = 16
    threads: int = 0                # torch threads; 0: torch's choice
    kv_dtype: str = "auto"          # auto | bf16 | fp16 | fp32; auto: the model's compute type (bf16
                                    # for quantised weights, fp32 for an all-F32 file)
    dense_copy: str = "auto"        # auto | never | always: a bf16 copy of the weights for batched steps
                                    # (drivers/model/kernels.py); auto keeps it where it measured faster
    dense_copy_budget: str = "20%"  # at most this much memory for those copies: "20%" of RAM, or
                                    # bytes ("2GiB", "512MB", "1073741824"); a 7B on 24 GiB gets none
    native: str = "auto"            # auto | never | always: llmos's compiled kernels (drivers/model/native.c,
                                    # built with the machine's C compiler); auto uses them where measured faster
    engine: str = "auto"            # auto | torch | lean: lean runs the whole model on native.c without
                                    # torch (~250 MB less memory); auto: lean when dense_copy is "never"
                                    # and native.c multiplies every matrix (drivers/model/lean.py)

    def check(self) -> None:
        if self.engine not in ("auto", "torch", "lean"):
            raise ValueError(f"config: driver.engine must be auto, torch or lean, got {self.engine!r}")
        if self.kv_dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"config: driver.kv_dtype must be auto, bf16, fp16 or fp32, got {self.kv_dtype!r}")
        if self.dense_copy not in ("auto", "never", "always"):
            raise ValueError(f"config: driver.dense_copy must be auto, never or always, got {self.dense_copy!r}")
        parse_budget(self.dense_copy_budget, 1)
        if self.native not in ("auto", "never", "always"):
            raise ValueError(f"config: driver.native must be auto, never or always, got {self.native!r}")

    def budget_bytes(self, total: int) -> int:
        """dense_copy_budget in bytes, given the memory of the device (RAM for the CPU)."""
        return parse_budget(self.dense_copy_budget, total)


@dataclass
class ModelsConfig:
    memory_budget: str = "50%"      # what resident models may hold (weights + KV): a share of the
                                    # device's memory (RAM, or the GPU's) or bytes ("8GiB", 8000000000)
    keep_alive: float = 300.0       # seconds an idle model stays loaded; -1: until evicted; 0: unload when idle
    load_timeout: float = 60.0      # how long a request waits for room in the budget, then EAGAIN

    def check(self) -> None:
        parse_budget(self.memory_budget, 1, "models.memory_budget")
        if self.load_timeout <= 0:
            raise ValueError(f"config: models.load_timeout must be > 0 seconds, got {self.load_timeout}")
        parse_keep_alive(self.keep_alive, "config: models.keep_alive")

    def budget_bytes(self, total: int) -> int:
        """memory_budget in bytes, given the memory of the device (RAM for the CPU)."""
        return parse_budget(self.memory_budget, total, "models.memory_budget")


_DURATION = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_keep_alive(value: object, what: str = "keep_alive") -> float:
    """Seconds from a keep_alive as Ollama takes it: a number of seconds, or a duration such as
    "5m", "1h", "30s", "-1"; any negative means for ever (-1.0 is returned)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{what} must be seconds or a duration like \"5m\", got {value!r}")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*", value)
        if m is None:
            raise ValueError(f"{what} must be seconds or a duration like \"5m\", \"1h\", \"-1\", "
                             f"got {value!r}")
        seconds = float(m[1]) * _DURATION[m[2]]
    else:
        seconds = float(value)
    if seconds != seconds or seconds in (float("inf"),):
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    return -1.0 if seconds < 0 else seconds


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_budget(text: str, total: int, what: str = "driver.dense_copy_budget") -> int:
    """ "20%" of total, or a size such as "2GiB", "512MB", "1073741824", as bytes."""
    t = text.strip().lower().replace(" ", "")
    try:
        if t.endswith("%"):
            share = float(t[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(total * share / 100)
        digits = t.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = t[len(digits):]
        if unit not in _UNITS or float(digits) < 0:
            raise ValueError
        return int(float(digits) * _UNITS[unit])
    except ValueError:
        raise ValueError(f"config: {what} must be a share like \"20%\" or a size like"
                         f" \"2GiB\", got {text!r}") from None


@dataclass
class DaemonConfig:
    name: str
    argv: list[str]
    restart: str = "on-failure"
    priority: int = 0
    env: dict = field(default_factory=dict)
    cwd: str | None = None
    privileged: bool = False


GATEWAY_MODULE = "userland.gateway"
MAX_CONTEXTS = 256       # contexts a process may hold (services/inference/contexts.py, MAX_PER_PROCESS)


def split_listen(text: str) -> tuple[str, int]:
    """ "127.0.0.1:8790" or "[::1]:8790" as (host, port); ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"config: gateway.listen must be HOST:PORT (port 0..65535; 0: any free "
                         f"port), e.g. \"127.0.0.1:8790\" or \"[::1]:8790\", got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether host names this machine only: 127.0.0.0/8, ::1 or localhost. A name that needs
    resolving (other than localhost) is not taken for loopback."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class GatewayConfig:
    enabled: bool = True              # the OpenAI/Ollama HTTP gateway, started at boot
    listen: str = "127.0.0.1:8790"    # HOST:PORT; port 0 takes a free one (ps shows which)
    require_key: bool = False         # off a loopback address the gateway refuses to run without
    contexts_per_key: int = 16        # chats resent whole: contexts kept per key (and keyless), LRU

    def check(self) -> None:
        split_listen(self.listen)
        if not 0 <= self.contexts_per_key <= MAX_CONTEXTS:
            raise ValueError(f"config: gateway.contexts_per_key must be an integer in 0..{MAX_CONTEXTS} "
                             f"(0: no chat's KV is kept), got {self.contexts_per_key!r}")

    def daemon(self) -> DaemonConfig:
        """The gateway as a daemon: restarted whenever it exits, until llmos's kill; privileged,
        to give each API key's process the priority and limits the key says."""
        argv = [sys.executable, "-m", GATEWAY_MODULE, "--listen", self.listen]
        if self.contexts_per_key != GatewayConfig.contexts_per_key:
            argv += ["--contexts", str(self.contexts_per_key)]
        return DaemonConfig(name="gateway", argv=argv + ["--require-key"] * self.require_key,
                            restart="always", privileged=True)


@dataclass
class Config:
    kernel: KernelConfig = field(default_factory=KernelConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    driver: DriverConfig = field(default_factory=DriverConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    services: list[str] = field(default_factory=lambda: ["storage", "tokenizer", MODEL_DRIVER,
                                                         "inference"])
    daemons: list[DaemonConfig] = field(default_factory=list)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    modules: dict[str, str] = field(default_factory=lambda: dict(SERVICE_MODULES))

    @classmethod
    def load(cls, path: Path) -> "Config":
        cfg = cls()
        try:
            raw = tomllib.loads(path.read_text()) if path.exists() else {}
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML: {e}") from None
        sections = ("kernel", "supervisor", "storage", "scheduler", "driver", "gateway", "models",
                    "services", "daemons")
        for name in raw:
            if name not in sections or not isinstance(raw[name], list if name == "daemons" else dict):
                raise ValueError(f"config: unknown section [{name}] (known: {', '.join(sections)})")
        budget = raw.get("models", {}).get("memory_budget")
        if isinstance(budget, int) and not isinstance(budget, bool):       # bytes, as a TOML integer
            raw["models"]["memory_budget"] = str(budget)
        for section in sections[:7]:
            _apply(getattr(cfg, section), raw.get(section, {}), section)
        cfg.kernel.check()
        cfg.storage.check()
        cfg.scheduler.check()
        cfg.driver.check()
        cfg.models.check()
        cfg.gateway.check()
        services = raw.get("services", {})
        for key in services:
            if key not in ("enabled", "modules"):
                raise ValueError(f"config: unknown key services.{key} (known: enabled, modules)")
        extra = services.get("modules", {})
        if not isinstance(extra, dict) or not all(
                isinstance(k, str) and k.isidentifier() and isinstance(v, str) and
                all(part.isidentifier() for part in v.split(".")) for k, v in extra.items()):
            raise ValueError("config: services.modules must map service names to Python module "
                             "names, e.g. {relay = \"mypackage.relay\"}")
        cfg.modules.update(extra)
        enabled = services.get("enabled")
        if enabled is not None:
            if not isinstance(enabled, list) or not all(isinstance(x, str) for x in enabled):
                raise ValueError("config: services.enabled must be a list of service names")
            enabled = [MODEL_DRIVER if name == "cpu" else name for name in enabled]
            for name in enabled:
                if name not in cfg.modules and name != MODEL_DRIVER:
                    raise ValueError(f"config: services.enabled names unknown service {name!r} "
                                     f"(known: {', '.join([MODEL_DRIVER, *cfg.modules])})")
            cfg.services = enabled
        cfg.services += [name for name in extra if name not in cfg.services]
        cfg.daemons = [_daemon(i, d) for i, d in enumerate(raw.get("daemons", []))]
        if cfg.gateway.enabled:
            if any(d.name == "gateway" for d in cfg.daemons):
                raise ValueError("config: a daemon named 'gateway' clashes with the gateway "
                                 "([gateway] enabled = false to run one of your own)")
            cfg.daemons.append(cfg.gateway.daemon())
        return cfg


def _daemon(i: int, raw: object) -> DaemonConfig:
    where = f"config: daemons[{i}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a table")
    if not isinstance(raw.get("name"), str) or not raw["name"]:
        raise ValueError(f"{where} needs a name (a string)")
    d = DaemonConfig(name=raw["name"], argv=[])
    where = f"config: daemon {d.name!r}"
    _apply(d, raw, f"daemons.{d.name}")
    if not d.argv or not all(isinstance(a, str) for a in d.argv):
        raise ValueError(f"{where}: argv must be a non-empty list of strings")
    if d.restart not in ("never", "on-failure", "always"):
        raise ValueError(f"{where}: restart must be never, on-failure or always, not {d.restart!r}")
    if not -20 <= d.priority <= 19:
        raise ValueError(f"{where}: priority must be in -20..19, got {d.priority}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in d.env.items()):
        raise ValueError(f"{where}: env must map strings to strings")
    return d


def _apply(target: Any, values: dict, section: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"config: unknown key {section}.{key} (known: {', '.join(known)})")
        want = type(getattr(target, key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if want is type(None):      # optional strings (a daemon's cwd)
            want = str
        if type(value) is not want:
            raise ValueError(f"config: {section}.{key} must be {want.__name__}, got {value!r}")
        setattr(target, key, value)
