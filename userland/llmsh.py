"""llmsh, the llmos shell: the operator's way to look at and drive a running llmos.

    llmsh                       interactive when stdin is a terminal, else reads commands from it
    llmsh -c 'ps; get k'        run commands from the argument
    llmsh script.llsh           run a file

It exits with the status of the last command. The language is in ``userland.shell.parse``, the
commands in ``userland.shell.commands``; llmsh reaches llmos only through the syscalls library,
as a privileged process named "llmsh".
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from syscalls.paths import Paths
from userland.shell.builtin import ShellExit
from userland.shell.shell import Shell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmsh", description="The llmos shell.")
    parser.add_argument("--home", help="LLMOS_HOME (default: $LLMOS_HOME or ~/.llmos)")
    parser.add_argument("-c", dest="commands", metavar="COMMANDS", help="run these commands and exit")
    parser.add_argument("script", nargs="?", help="a file of commands to run")
    args = parser.parse_args(argv)
    if args.commands is not None and args.script is not None:
        parser.error("give -c COMMANDS or a SCRIPT, not both")
    if args.commands is None and args.script is None and sys.stdin.isatty():
        # an interactive shell takes Ctrl-C whatever it inherited: Python leaves SIGINT alone when it
        # starts ignored (as under a parent that ignores it), and Ctrl-C would then do nothing
        signal.signal(signal.SIGINT, signal.default_int_handler)
    sh = Shell(Paths.from_env(args.home))
    status = 0
    try:
        if args.commands is not None:
            status = sh.run_lines(args.commands.splitlines(), None)
        elif args.script is not None:
            try:
                script = open(args.script, encoding="utf-8", errors="replace")
            except OSError as e:
                print(f"llmsh: {args.script}: {e.strerror}", file=sys.stderr)
                status = 127
                return status
            with script:
                status = sh.run_lines(script, args.script)
        elif sys.stdin.isatty():
            from userland.shell.repl import repl     # prompt_toolkit only when interactive
            status = repl(sh)
        else:
            status = sh.run_lines(sys.stdin, None)
    except ShellExit as e:
        status = e.status
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:     # our reader went away (llmsh -c ps | head -1)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 1
    finally:
        try:
            sh.close(status)
        except (Exception, KeyboardInterrupt):
            pass                # leaving anyway; the kernel notices the disconnect
    return status


if __name__ == "__main__":
    sys.exit(main())
