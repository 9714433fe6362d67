"""echo-daemon: answers every message published on a topic, to show a daemon built on syscalls.

    python -m userland.programs.echo_daemon [--topic echo]

It subscribes to TOPIC and, for each message published there, sends ``{"echo": data, "by": PID}``
back to the mailbox of the process that published it. Run it under the kernel with a restart
policy, e.g. ``[[daemons]] name = "echo" argv = ["python3", "-m", "userland.programs.echo_daemon"]``
in config.toml, and it survives its own crashes.
"""

from __future__ import annotations

import argparse
import signal
import sys

import syscalls
from syscalls import errors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="echo-daemon", description=__doc__.splitlines()[0])
    ap.add_argument("--topic", default="echo")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with syscalls.connect(name="echo-daemon") as os_:
        os_.subscribe(args.topic)
        print(f"echo-daemon: pid {os_.getpid()} answering topic {args.topic!r}", flush=True)
        while True:
            message = os_.recv()
            if message["topic"] is None:
                continue                       # direct mail is not for us
            try:
                os_.send(message["from"], {"echo": message["data"], "by": os_.getpid()})
            except (errors.ESRCH, errors.EAGAIN) as e:
                print(f"echo-daemon: could not answer pid {message['from']}: {e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
