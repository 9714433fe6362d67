"""Programs that use nothing but syscalls: run them with `python -m userland.programs.NAME`."""
