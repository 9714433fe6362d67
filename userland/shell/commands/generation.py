"""The shell's model commands: gen (one prompt) and chat (a conversation, like `ollama run`)."""

from __future__ import annotations

from typing import Any

from userland.programs.chat import Conversation, stream

from ..builtin import Failure, Shell, Streams, Usage, command, options

GEN_OPTIONS = ("model=", "max-tokens=", "temperature=", "top-p=", "top-k=", "seed=", "stop=",
               "ignore-eos", "stats", "raw")


def _sampling(opts: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for opt, (key, kind) in {"--max-tokens": ("max_tokens", int), "--temperature": ("temperature", float),
                             "--top-p": ("top_p", float), "--top-k": ("top_k", int),
                             "--seed": ("seed", int)}.items():
        if opt in opts:
            try:
                out[key] = kind(opts[opt])
            except ValueError:
                raise Failure(f"{opt} must be {'an integer' if kind is int else 'a number'}, "
                              f"not {opts[opt]!r}", 2) from None
    if "--model" in opts:
        out["model"] = opts["--model"]
    if "--ignore-eos" in opts:
        out["ignore_eos"] = True
    return out


def _stream(sh: Shell, io: Streams, call: str, stats: bool, **args: Any) -> str:
    """Run a generate/chat call, printing text as it arrives; Ctrl-C cancels it. Returns the text."""
    return stream(sh.conn, io.stdout, io.stderr, call, stats, **args)


@command("[--model M] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] "
         "[--stop STR]... [--ignore-eos] [--raw] [--stats] [PROMPT]")
def cmd_gen(sh: Shell, io: Streams, args: list[str]) -> None:
    """Answer PROMPT (or standard input), printed as it is produced.

    The prompt goes through the model's chat template as one user message, as `ollama run` does;
    --raw sends it to the model as it is (plain completion). Ctrl-C stops the generation. --stats
    prints the counts (tokens, time to first token, tok/s) on standard error. --ignore-eos goes
    on past the end of the answer, to max-tokens (for load tests).
    Example: gen --max-tokens 64 "Write a haiku about kernels."  # ask the model for a haiku
    """
    opts, rest = options(args, "", GEN_OPTIONS, repeated=("--stop",))
    stop = opts.get("--stop", [])
    prompt = " ".join(rest) if rest else io.stdin.read()
    if not prompt.strip():
        raise Usage("missing PROMPT (give it as an argument or on standard input)")
    if "--raw" in opts:
        _stream(sh, io, "generate", "--stats" in opts, prompt=prompt, stop=stop or None,
                **_sampling(opts))
    else:
        _stream(sh, io, "chat", "--stats" in opts, messages=[{"role": "user", "content": prompt}],
                stop=stop or None, **_sampling(opts))


@command("[--model M] [--system TEXT] [MESSAGE]")
def cmd_chat(sh: Shell, io: Streams, args: list[str]) -> None:
    """Talk with the model. With MESSAGE: one answer. Without: a conversation, line by line, until
    /bye or end of input (Ctrl-D); at a terminal Ctrl-C stops an answer and the conversation goes
    on. The conversation is a kernel context (open_context): each turn reuses the KV cache of
    the ones before, so a long conversation does not slow down. It is the chat program's loop
    (userland/programs/chat.py), with its commands: /system TEXT (start over with a system
    prompt), /set NAME VALUE (temperature, top_p, top_k, min_p, max_tokens, seed,
    repetition_penalty), /save NAME and /load NAME (chats/NAME in storage), /clear, /bye.
    Example: chat "What is a microkernel?"  # ask the model one question
    """
    opts, rest = options(args, "", ("model=", "system="))
    settings: dict[str, Any] = {"model": opts["--model"]} if "--model" in opts else {}
    if rest:
        system = opts.get("--system")
        messages = [{"role": "system", "content": system}] if system else []
        _stream(sh, io, "chat", False, messages=messages + [{"role": "user", "content": " ".join(rest)}],
                **settings)
        return
    conversation = Conversation(sh.conn, opts.get("--system"), settings)
    try:
        conversation.converse(io.stdin, io.stdout, io.stderr, name="llmsh: chat")
    finally:
        conversation.close()
