"""The kernel's tunables, read from LLMOS_HOME/config.toml; every key is optional.

    [kernel]       max_in_flight, mailbox_messages, mailbox_bytes, call_deadline,
                   zombies_per_parent
    [supervisor]   ping_interval, ping_timeout, start_timeout, max_restarts, restart_window,
                   backoff_base, backoff_max
    [storage]      value_limit, quota_bytes
    [services]     enabled = ["storage", ...]

An unknown section or key is an error, so a typo never silently leaves a default in force.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


# The services llmos knows, and the module each runs (``python -m MODULE``).
SERVICE_MODULES = {
    "storage": "services.storage",
    "tokenizer": "services.tokenizer",
}


@dataclass
class KernelConfig:
    max_in_flight: int = 256          # calls one process may have open at once
    mailbox_messages: int = 1024
    mailbox_bytes: int = 16 << 20
    call_deadline: float = 60.0       # how long a call may wait for its service to come back
    zombies_per_parent: int = 256


@dataclass
class SupervisorConfig:
    ping_interval: float = 0.5
    ping_timeout: float = 2.0         # no pong for this long: the service is hung, kill it
    start_timeout: float = 20.0       # no hello (or progress event) for this long after start
    max_restarts: int = 5             # more restarts than this within restart_window: FAILED
    restart_window: float = 60.0
    backoff_base: float = 0.5         # 2nd restart waits this, then doubling...
    backoff_max: float = 30.0         # ...up to this


@dataclass
class StorageConfig:
    value_limit: int = 1 << 20
    quota_bytes: int = 1 << 30


@dataclass
class Config:
    kernel: KernelConfig = field(default_factory=KernelConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    services: list[str] = field(default_factory=lambda: ["storage", "tokenizer"])

    @classmethod
    def load(cls, path: Path) -> "Config":
        cfg = cls()
        if not path.exists():
            return cfg
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config: {path} is not valid TOML: {e}") from None
        sections = ("kernel", "supervisor", "storage", "services")
        for name in raw:
            if name not in sections or not isinstance(raw[name], dict):
                raise ValueError(f"config: unknown section [{name}] (known: {', '.join(sections)})")
        for section in sections[:3]:
            _apply(getattr(cfg, section), raw.get(section, {}), section)
        services = raw.get("services", {})
        for key in services:
            if key != "enabled":
                raise ValueError(f"config: unknown key services.{key} (known: enabled)")
        enabled = services.get("enabled")
        if enabled is not None:
            if not isinstance(enabled, list) or not all(isinstance(x, str) for x in enabled):
                raise ValueError("config: services.enabled must be a list of service names")
            for name in enabled:
                if name not in SERVICE_MODULES:
                    raise ValueError(f"config: services.enabled names unknown service {name!r} "
                                     f"(known: {', '.join(SERVICE_MODULES)})")
            cfg.services = enabled
        return cfg


def _apply(target: Any, values: dict, section: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"config: unknown key {section}.{key} (known: {', '.join(known)})")
        want = type(getattr(target, key))
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not want:
            raise ValueError(f"config: {section}.{key} must be {want.__name__}, got {value!r}")
        setattr(target, key, value)
