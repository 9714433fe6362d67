"""The message commands: send and recv (mailboxes), pub, sub and unsub (topics)."""

from __future__ import annotations

from ..builtin import Shell, Streams, Usage, command, for_each, operands, options, pid_arg, \
    seconds_arg, show


@command("PID DATA")
def cmd_send(sh: Shell, io: Streams, args: list[str]) -> None:
    """Put DATA, a string, in the mailbox of process PID (it gets it with recv).

    Example: send 7 ping  # send ping to process 7
    """
    pid, data = operands(args, "PID", "DATA")
    sh.call("send", pid=pid_arg(pid), data=data)


@command("[--timeout S]")
def cmd_recv(sh: Shell, io: Streams, args: list[str]) -> None:
    """Take the oldest message from this shell's mailbox and print it, waiting for one if none.

    Prints `from PID: DATA`, or `from PID [TOPIC]: DATA` for a message published to a topic
    this shell subscribed to. --timeout S gives up after S seconds (status 1); Ctrl-C stops
    waiting.
    Example: recv --timeout 5  # wait up to 5 seconds for a message
    """
    opts, rest = options(args, "", ("timeout=",))
    operands(rest)
    timeout = seconds_arg(opts["--timeout"]) if "--timeout" in opts else None
    m = sh.call("recv", blocking=True, timeout=timeout)
    topic = "" if m["topic"] is None else f" [{m['topic']}]"
    print(f"from {m['from']}{topic}: {show(m['data'])}", file=io.stdout)


@command("TOPIC DATA")
def cmd_pub(sh: Shell, io: Streams, args: list[str]) -> None:
    """Publish DATA, a string, to the processes subscribed to TOPIC (or a prefix of it).

    Example: pub news/today "all good"  # publish all good on the topic news/today
    """
    topic, data = operands(args, "TOPIC", "DATA")
    n = sh.call("publish", topic=topic, data=data)
    print(f"delivered to {n} process{'' if n == 1 else 'es'}", file=io.stdout)


@command("TOPIC...")
def cmd_sub(sh: Shell, io: Streams, args: list[str]) -> None:
    """Subscribe this shell to every topic starting with TOPIC; recv then gets what is published.

    Example: sub news/  # receive what is published under news/
    """
    if not args:
        raise Usage("missing TOPIC")
    for topic in args:
        sh.call("subscribe", topic=topic)


@command("TOPIC...")
def cmd_unsub(sh: Shell, io: Streams, args: list[str]) -> int:
    """Undo sub TOPIC."""
    if not args:
        raise Usage("missing TOPIC")
    return for_each(io, "unsub", args, lambda topic: sh.call("unsubscribe", topic=topic))
