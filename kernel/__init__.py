"""The llmos kernel: process table, quotas, scheduler, syscall dispatch and service supervisor."""

__version__ = "0.1.0"
