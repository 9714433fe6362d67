"""chat: talk with the model, like `ollama run`; a program that uses nothing but syscalls.

    python -m userland.programs.chat [--system TEXT] [--model M]      (llmsh: `run chat`)

Reads lines and answers each, streaming the answer as it is produced; /bye or end of input
leaves. The conversation is a kernel context (open_context): every turn reuses the KV cache of
the turns before it, so a long conversation does not slow down. At a terminal Ctrl-C stops an
answer and the conversation goes on. llmsh's `chat` builtin is this same loop.

    /system TEXT       set the system prompt (and start over)
    /set NAME VALUE    temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty
    /save NAME         store the conversation in storage under chats/NAME (save_context)
    /load NAME         continue a stored conversation (load_context)
    /clear             forget the conversation
    /bye               leave
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from syscalls import errors
from userland.programs import connected

SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
            "min_p": float, "repetition_penalty": float}


def stream(conn, out: TextIO, err: TextIO, call: str, stats: bool, **args: Any) -> str:
    """Run a generate/chat call on conn, printing text as it arrives; Ctrl-C cancels it. Returns
    the text; with stats, the counts go to err."""
    saved, conn.timeout = conn.timeout, None        # a long answer is not a hung call
    chunks = conn.stream(call, **args)
    text = []
    try:
        for chunk in chunks:
            out.write(chunk["text"])
            out.flush()
            text.append(chunk["text"])
    finally:
        chunks.close()
        conn.timeout = saved
    if text and not text[-1].endswith("\n"):
        out.write("\n")
    end = chunks.result or {}
    if stats:
        rate = (end.get("generated_tokens", 0) - 1) / end["decode_s"] if end.get("decode_s") else 0
        print(f"[{end.get('finish')}: {end.get('prompt_tokens')} prompt tokens, "
              f"{end.get('generated_tokens')} generated, first token after "
              f"{1000 * (end.get('ttft_s') or 0):.0f} ms, {rate:.1f} tok/s]", file=err)
    return "".join(text)


class Conversation:
    """A conversation's context, opened at its first turn and replaced by /system, /clear, /load."""

    def __init__(self, conn, system: str | None = None, settings: dict[str, Any] | None = None):
        self.conn, self.system, self.ctx = conn, system, None
        self.settings: dict[str, Any] = dict(settings or {})

    def handle(self) -> int:
        if self.ctx is None:
            self.ctx = self.conn.call("open_context", system=self.system, model=self.settings.get("model"))
        return self.ctx

    def restart(self, system: str | None) -> None:
        self.close()
        self.system = system

    def load(self, key: str) -> int:
        """Continue the conversation stored under key; how many messages it has (system included)."""
        ctx = self.conn.call("load_context", key=key)
        self.close()
        self.ctx = ctx
        return next(c["messages"] for c in self.conn.call("contexts") if c["ctx"] == ctx)

    def close(self) -> None:
        if self.ctx is not None:
            ctx, self.ctx = self.ctx, None
            try:
                self.conn.call("close_context", ctx=ctx)
            except errors.LLMOSError:
                pass                # llmos went away, or closed it with the process

    def converse(self, stdin: TextIO, out: TextIO, err: TextIO, name: str = "chat") -> None:
        """Answer line after line until /bye or end of input."""
        interactive = stdin.isatty() if hasattr(stdin, "isatty") else False
        while True:
            if interactive:
                out.write(">>> ")
                out.flush()
            try:
                line = stdin.readline()
                if not line:
                    return
                line = line.strip()
                if line and not line.startswith("/"):
                    # an answer stopped half-way leaves no trace: the context keeps whole turns only
                    stream(self.conn, out, err, "chat", False, messages=[{"role": "user", "content": line}],
                           ctx=self.handle(), **self.settings)
                    continue
            except KeyboardInterrupt:       # at a terminal Ctrl-C stops an answer or drops a line,
                if not interactive:         # and the conversation goes on (/bye or Ctrl-D leaves)
                    raise
                out.write("\n")
                continue
            if line and self.command(line, out, err, name):
                return

    def command(self, line: str, out: TextIO, err: TextIO, name: str) -> bool:
        """Do one /command; True for /bye."""
        word, _, value = line.partition(" ")
        value = value.strip()
        if word == "/bye":
            return True
        if word == "/clear":
            self.restart(self.system)
        elif word == "/system":
            self.restart(value or None)
        elif word == "/set":
            setting, _, raw = value.partition(" ")
            kind = SETTABLE.get(setting)
            if kind is None:
                print(f"{name}: /set takes one of {', '.join(SETTABLE)}", file=err)
                return False
            try:
                self.settings[setting] = kind(raw)
            except ValueError:
                print(f"{name}: {setting} must be {'an integer' if kind is int else 'a number'}", file=err)
        elif word == "/save" and value:
            self.conn.call("save_context", ctx=self.handle(), key=f"chats/{value}")
            print(f"saved as chats/{value}", file=out)
        elif word == "/load" and value:
            print(f"loaded chats/{value} ({self.load(f'chats/{value}')} messages)", file=out)
        else:
            print(f"{name}: unknown command {word!r} (/system, /set, /save, /load, /clear, /bye)", file=err)
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="chat", description="Talk with the model (a kernel context).")
    ap.add_argument("--system", help="the system prompt")
    ap.add_argument("--model", help="the model (default: the loaded one)")
    args = ap.parse_args(argv)
    def body(conn) -> None:
        conversation = Conversation(conn, args.system, {"model": args.model} if args.model else {})
        try:
            conversation.converse(sys.stdin, sys.stdout, sys.stderr)
        finally:
            conversation.close()
    return connected("chat", body)


if __name__ == "__main__":
    sys.exit(main())
