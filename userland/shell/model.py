"""The shell's model commands: gen (one prompt) and chat (a conversation, like `ollama run`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .builtin import Failure, Streams, Usage, command, options

if TYPE_CHECKING:
    from .shell import Shell

GEN_OPTIONS = ("model=", "max-tokens=", "temperature=", "top-p=", "top-k=", "seed=", "stop=",
               "ignore-eos", "stats", "raw")
SETTABLE = {"temperature": float, "top_p": float, "top_k": int, "max_tokens": int, "seed": int,
            "min_p": float, "repetition_penalty": float}


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
    conn = sh.conn
    saved, conn.timeout = conn.timeout, None        # a long answer is not a hung call
    stream = conn.stream(call, **args)
    text = []
    try:
        for chunk in stream:
            io.stdout.write(chunk["text"])
            io.stdout.flush()
            text.append(chunk["text"])
    finally:
        stream.close()
        conn.timeout = saved
    if text and not text[-1].endswith("\n"):
        io.stdout.write("\n")
    end = stream.result or {}
    if stats:
        rate = (end.get("generated_tokens", 0) - 1) / end["decode_s"] if end.get("decode_s") else 0
        print(f"[{end.get('finish')}: {end.get('prompt_tokens')} prompt tokens, "
              f"{end.get('generated_tokens')} generated, first token after "
              f"{1000 * (end.get('ttft_s') or 0):.0f} ms, {rate:.1f} tok/s]", file=io.stderr)
    return "".join(text)


@command("[--model M] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S] "
         "[--stop STR]... [--ignore-eos] [--raw] [--stats] [PROMPT]")
def cmd_gen(sh: Shell, io: Streams, args: list[str]) -> None:
    """Answer PROMPT (or standard input), printed as it is produced.

    The prompt goes through the model's chat template as one user message, as `ollama run` does;
    --raw sends it to the model as it is (plain completion). Ctrl-C stops the generation. --stats
    prints the counts (tokens, time to first token, tok/s) on standard error. --ignore-eos goes
    on past the end of the answer, to max-tokens (for load tests).
    Example: gen --max-tokens 64 "Write a haiku about kernels."
    """
    try:
        import getopt
        opts_list, rest = getopt.getopt(args, "", list(GEN_OPTIONS))
    except getopt.GetoptError as e:
        raise Usage(e.msg) from None
    opts = dict(opts_list)
    stop = [v for k, v in opts_list if k == "--stop"]
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
    on. In a conversation:

        /system TEXT       set the system prompt (and start over)
        /set NAME VALUE    temperature, top_p, top_k, min_p, max_tokens, seed, repetition_penalty
        /save NAME         store the conversation in storage under chats/NAME
        /load NAME         continue a stored conversation
        /clear             forget the conversation
        /bye               leave
    """
    opts, rest = options(args, "", ("model=", "system="))
    settings: dict[str, Any] = {"model": opts["--model"]} if "--model" in opts else {}
    system = opts.get("--system")
    history: list[dict] = []

    def messages() -> list[dict]:
        return ([{"role": "system", "content": system}] if system else []) + history

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        try:
            reply = _stream(sh, io, "chat", False, messages=messages(), **settings)
        except BaseException:
            history.pop()                    # an unanswered question leaves no trace
            raise
        history.append({"role": "assistant", "content": reply})

    if rest:
        answer(" ".join(rest))
        return
    interactive = io.stdin.isatty() if hasattr(io.stdin, "isatty") else False
    while True:
        if interactive:
            io.stdout.write(">>> ")
            io.stdout.flush()
        try:
            line = io.stdin.readline()
            if not line:
                return
            line = line.strip()
            if line and not line.startswith("/"):
                answer(line)
                continue
        except KeyboardInterrupt:       # at a terminal Ctrl-C stops an answer or drops a line,
            if not interactive:         # and the conversation goes on (/bye or Ctrl-D leaves)
                raise
            io.stdout.write("\n")
            continue
        if not line:
            continue
        word, _, value = line.partition(" ")
        value = value.strip()
        if word == "/bye":
            return
        elif word == "/clear":
            history.clear()
        elif word == "/system":
            system, history[:] = value or None, []
        elif word == "/set":
            name, _, raw = value.partition(" ")
            kind = SETTABLE.get(name)
            if kind is None:
                print(f"llmsh: chat: /set takes one of {', '.join(SETTABLE)}", file=io.stderr)
                continue
            try:
                settings[name] = kind(raw)
            except ValueError:
                print(f"llmsh: chat: {name} must be {'an integer' if kind is int else 'a number'}",
                      file=io.stderr)
        elif word == "/save" and value:
            sh.call("put", key=f"chats/{value}", value={"system": system, "messages": history})
            print(f"saved as chats/{value}", file=io.stdout)
        elif word == "/load" and value:
            saved = sh.call("get", key=f"chats/{value}")["value"]
            system, history[:] = saved.get("system"), list(saved.get("messages", []))
            print(f"loaded chats/{value} ({len(history)} messages)", file=io.stdout)
        else:
            print(f"llmsh: chat: unknown command {word!r} (/system, /set, /save, /load, /clear, "
                  f"/bye)", file=io.stderr)
