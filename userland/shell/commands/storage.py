"""The storage commands: put, get, cat, ls and rm."""

from __future__ import annotations

from ..builtin import (Shell, Streams, Usage, command, for_each, int_arg, operands, options, show,
                       table)

LS_LIMIT = 1000


@command("[--ns NS] [--if-version V] KEY [VALUE]")
def cmd_put(sh: Shell, io: Streams, args: list[str]) -> None:
    """Store VALUE, a string, under KEY (in your own namespace unless --ns NS).

    Without VALUE, stores what it reads from stdin, less its final newline (cat k | put k2).
    --if-version V stores only if the key is at version V; 0 means only if it does not exist.
    Example: put greeting "hello world"  # store hello world under the key greeting
    """
    opts, rest = options(args, "", ("ns=", "if-version="))
    if len(rest) == 1:
        key, value = rest[0], io.stdin.read().removesuffix("\n")
    else:
        key, value = operands(rest, "KEY", "VALUE")
    kw = {}
    if "--if-version" in opts:
        kw["if_version"] = int_arg(opts["--if-version"], "--if-version", 0)
    sh.call("put", key=key, value=value, ns=opts.get("--ns"), **kw)


@command("[--ns NS] KEY")
def cmd_get(sh: Shell, io: Streams, args: list[str]) -> None:
    """Print the value stored under KEY: a string as it is, any other value as JSON.

    Example: get config/theme  # print what is stored under config/theme
    """
    opts, rest = options(args, "", ("ns=",))
    (key,) = operands(rest, "KEY")
    print(show(sh.call("get", key=key, ns=opts.get("--ns"))["value"]), file=io.stdout)


@command("[--ns NS] [KEY...]")
def cmd_cat(sh: Shell, io: Streams, args: list[str]) -> int:
    """Print the values of keys, one after another (as get does); without KEY, copy stdin.

    Example: cat a b  # print the values of the keys a and b
    """
    opts, rest = options(args, "", ("ns=",))
    if not rest:
        while chunk := io.stdin.read(65536):
            io.stdout.write(chunk)
        return 0
    return for_each(io, "cat", rest, lambda key: print(
        show(sh.call("get", key=key, ns=opts.get("--ns"))["value"]), file=io.stdout))


@command("[-l] [--ns NS] [PREFIX]")
def cmd_ls(sh: Shell, io: Streams, args: list[str]) -> None:
    """List the keys starting with PREFIX, in order; -l adds each one's version and size.

    Example: ls -l drafts/  # list the keys under drafts with their sizes
    """
    opts, rest = options(args, "l", ("ns=",))
    if len(rest) > 1:
        raise Usage(f"unexpected argument {rest[1]!r}")
    items = sh.call("list", prefix=rest[0] if rest else "", ns=opts.get("--ns"), limit=LS_LIMIT)
    if "-l" in opts:
        if items:
            table(io.stdout, ["VERSION", "SIZE", "KEY"],
                  [[str(i["version"]), str(i["size"]), i["key"]] for i in items], right={"VERSION", "SIZE"})
    else:
        for i in items:
            print(i["key"], file=io.stdout)
    if len(items) == LS_LIMIT:
        io.error("ls", f"only the first {LS_LIMIT} keys are shown; give a longer PREFIX")


@command("[--ns NS] KEY...")
def cmd_rm(sh: Shell, io: Streams, args: list[str]) -> int:
    """Delete keys.

    Example: rm tmp/1 tmp/2  # delete the keys tmp/1 and tmp/2
    """
    opts, rest = options(args, "", ("ns=",))
    if not rest:
        raise Usage("missing KEY")
    return for_each(io, "rm", rest, lambda key: sh.call("delete", key=key, ns=opts.get("--ns")))
