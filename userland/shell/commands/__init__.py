"""The table of llmsh's builtin commands, built from an explicit list of modules, one a section.

Each module defines its commands (``cmd_NAME``, marked with ``builtin.command``) and registers
nothing by being imported; ``help`` lists the commands in the order of ``SECTIONS``. A command
reaches llmos only through ``sh.call`` and writes to ``io.stdout`` (``builtin`` has the rules).
"""

from __future__ import annotations

from ..builtin import command_table
from . import (basics, generation, job_control, messages, models, priorities, processes, storage,
               system, top)

SECTIONS = (processes, system, storage, models, messages, job_control, basics, generation,
            priorities, top)

COMMANDS = command_table(*SECTIONS)
