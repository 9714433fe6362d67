"""The commands of the shell itself: help, exit, echo, true and false."""

from __future__ import annotations

from ..builtin import Shell, ShellExit, Streams, Usage, command, int_arg

SYNTAX = """\
Words are separated by spaces; quote one that has spaces or ;&|<> ('as is', "with $? inside").
  a; b      run a, then b            a && b    run b if a succeeded (status 0)
  # ...     a comment                a || b    run b if a failed
  a | b     b reads a's output; the status is b's
  a &       run a in the background as a job (jobs, fg, bg, wait %N, kill %N)
  a > KEY   store a's output under the storage KEY (a >> KEY adds it as a new line)
  a < FILE  a reads the local FILE as its input
  $?  the status of the last command   $$  this shell's PID
  $!  the last background job (%N), or the PID of the last spawn or run --daemon
  ? TEXT    the model proposes a command line that does TEXT; it runs only if you say y
"""


@command("[CMD...]")
def cmd_help(sh: Shell, io: Streams, args: list[str]) -> int:
    """Show the commands, or how to use the ones named.

    Example: help ls  # how to use ls
    """
    if not args:
        print("llmsh, the llmos shell. Commands:", file=io.stdout)
        width = max(map(len, sh.commands))
        for c in sh.commands.values():
            print(f"  {c.name:<{width}}  {c.summary}", file=io.stdout)
        print(f"\n{SYNTAX}help CMD shows how to use CMD.", file=io.stdout)
        return 0
    status = 0
    for i, name in enumerate(args):
        c = sh.commands.get(name)
        if c is None:
            io.error("help", f"no command named {name!r} (help lists them)")
            status = 1
            continue
        print(("\n" if i else "") + f"usage: {c.synopsis}\n\n{c.doc}", file=io.stdout)
    return status


@command("[STATUS]")
def cmd_exit(sh: Shell, io: Streams, args: list[str]) -> None:
    """Leave the shell with STATUS (0-255), or with the status of the last command."""
    if len(args) > 1:
        raise Usage(f"unexpected argument {args[1]!r}")
    raise ShellExit(int_arg(args[0], "STATUS", 0, 255) if args else sh.status)


@command("[WORD...]")
def cmd_echo(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the words, separated by spaces.

    Example: echo done  # print done
    """
    print(" ".join(args), file=io.stdout)


@command()
def cmd_true(sh: Shell, io: Streams, args: list[str]) -> int:
    """Do nothing, successfully (status 0)."""
    return 0


@command()
def cmd_false(sh: Shell, io: Streams, args: list[str]) -> int:
    """Do nothing, unsuccessfully (status 1)."""
    return 1
