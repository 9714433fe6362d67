"""batch: a low-priority bulk job over storage keys that resumes where it stopped.

    run batch [--prompt TEMPLATE] [--max-tokens N] [--nice N] IN_PREFIX OUT_PREFIX   (in llmsh)
    spawn batch docs/ summaries/        (in the background; its output in logs/proc-PID.log)

For every key under IN_PREFIX, in order, it asks the model TEMPLATE with {text} replaced by the
key's value (by default: summarize it) and stores the answer under OUT_PREFIX followed by the
rest of the key. First it makes itself less urgent (nice 10 unless --nice), so that interactive
use of the model comes first. It keeps its progress in storage, under .batch/OUT_PREFIX, and
writes it after each answer is stored: run again after a crash or a kill, it goes on after the
last key it recorded, and skips a key whose answer is already stored, so no key is done twice.
It uses nothing but syscalls.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import syscalls
from syscalls import errors
from userland.programs import connected

DEFAULT_PROMPT = "Summarize the following text in a few sentences.\n\n{text}"
MAX_KEYS = 100000       # the most one list call returns


def state_key(out_prefix: str) -> str:
    return f".batch/{out_prefix}"


class Batch:
    def __init__(self, os_: syscalls.Connection, args: argparse.Namespace):
        self.os, self.args = os_, args
        self.state_key = state_key(args.out_prefix)

    def run(self) -> int:
        a = self.args
        state = self._state()
        keys = [k["key"] for k in self.os.list(prefix=a.in_prefix, limit=MAX_KEYS)]
        last = state["last"] if state else None
        todo = [k for k in keys if last is None or k > last]
        done = len(keys) - len(todo)
        if state:
            say(f"resuming after {last!r}: {done} of {len(keys)} keys were done")
        self._record(done, len(keys), last)
        made = 0
        for key in todo:
            out = a.out_prefix + key[len(a.in_prefix):]
            if self._exists(out):       # stored, but killed before the progress was recorded
                say(f"{key} -> {out}: already stored")
            else:
                value = self.os.get(key)["value"]
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                answer = self.os.chat([{"role": "user", "content": a.prompt.replace("{text}", text)}],
                                      max_tokens=a.max_tokens, temperature=a.temperature,
                                      seed=a.seed, model=a.model)
                self.os.put(out, answer.text.strip())
                made += 1
                say(f"{key} -> {out} ({answer.result.generated_tokens} tokens)")
            done += 1
            self._record(done, len(keys), key)
        self._record(done, len(keys), todo[-1] if todo else last, finished=True)
        say(f"finished: {len(keys)} keys, {made} answered in this run")
        return 0

    def _state(self) -> dict | None:
        try:
            state = self.os.get(self.state_key)["value"]
        except errors.ENOENT:
            return None
        if state.get("input") != self.args.in_prefix:
            raise errors.EEXIST(f"{self.args.out_prefix!r} is the output of a batch over "
                                f"{state.get('input')!r}; choose another OUT_PREFIX, or rm "
                                f"{self.state_key} to start over")
        return state

    def _exists(self, key: str) -> bool:
        try:
            self.os.get(key)
        except errors.ENOENT:
            return False
        return True

    def _record(self, done: int, total: int, last: str | None, finished: bool = False) -> None:
        self.os.put(self.state_key, {"input": self.args.in_prefix, "done": done, "total": total,
                                     "last": last, "finished": finished, "pid": self.os.pid,
                                     "updated": time.time()})


def say(message: str) -> None:
    print(f"batch: {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="batch", description="Answer a prompt for every key under a "
                                 "prefix, at low priority, resuming where it stopped.")
    ap.add_argument("in_prefix", metavar="IN_PREFIX")
    ap.add_argument("out_prefix", metavar="OUT_PREFIX")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="{text} stands for a key's value")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--model", help="a model's name (default: the loaded one)")
    ap.add_argument("--nice", type=int, default=10, help="how much less urgent to become (default 10)")
    args = ap.parse_args(argv)
    if args.out_prefix.startswith(args.in_prefix) or args.in_prefix.startswith(args.out_prefix):
        ap.error("IN_PREFIX and OUT_PREFIX must not contain one another")
    def body(os_) -> int:
        if args.nice:
            say(f"pid {os_.pid} at priority {os_.nice(args.nice)}")
        return Batch(os_, args).run()
    return connected("batch", body)


if __name__ == "__main__":
    sys.exit(main())
