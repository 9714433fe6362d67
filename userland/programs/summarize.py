"""summarize: standard input to a summary on standard output, through the model.

    cat notes | run summarize | put notes/summary             (in llmsh)
    python -m userland.programs.summarize < notes.txt

A text that fits the model's context is summarised by one chat call, streamed as it comes. A
longer one is cut into parts of at most --chunk-tokens tokens (by the model's own tokenizer, so a
part always fits), each part is summarised, and the summaries are combined, cut again while they
are still too long; progress goes to standard error. It uses nothing but syscalls.
"""

from __future__ import annotations

import argparse
import sys

import syscalls
from syscalls import errors
from userland.programs import connected

TEMPLATE_ROOM = 64      # tokens for the instruction and the chat template around a text
WHOLE = "Summarize the following text in a few sentences.\n\n{text}"
PART = "Summarize this part of a longer text in a few sentences.\n\n{text}"
COMBINE = ("These are summaries of consecutive parts of one text. Combine them into one summary "
           "of a few sentences.\n\n{text}")


class Summarizer:
    def __init__(self, os_: syscalls.Connection, args: argparse.Namespace):
        self.os, self.args = os_, args
        model = self._model(args.model)
        self.model = model["name"]               # whose tokenizer counts the tokens
        context = model.get("context_length") or 2048
        room = context - args.max_tokens - TEMPLATE_ROOM
        self.chunk = min(args.chunk_tokens or room, room)
        if self.chunk < 16:
            raise errors.EINVAL(f"the model's context ({context} tokens) leaves no room for a text "
                                f"beside {args.max_tokens} tokens of summary; lower --max-tokens")

    def _model(self, name: str | None) -> dict:
        """The named model, else the one a driver runs, else the default."""
        models = self.os.models()
        for test in ((lambda m: m["name"] == name) if name else (lambda m: m.get("device")),
                     lambda m: not name and m["default"]):
            found = next((m for m in models if test(m)), None)
            if found:
                return found
        raise errors.ENOENT(f"no model named {name!r} (models: {', '.join(m['name'] for m in models)})")

    def run(self, text: str) -> None:
        ids = self._tokens(text)
        depth = 0
        while len(ids) > self.chunk:
            depth += 1
            parts = [ids[i:i + self.chunk] for i in range(0, len(ids), self.chunk)]
            note(f"{'' if depth == 1 else 'summaries: '}{len(ids)} tokens, in {len(parts)} parts "
                 f"of up to {self.chunk}")
            # a part's summary is at most half a part, so every round shortens the text
            limit = min(self.args.max_tokens, self.chunk // 2)
            summaries = []
            for n, part in enumerate(parts, 1):
                summaries.append(self._answer(PART if depth == 1 else COMBINE,
                                              self.os.detokenize(part, model=self.model), limit).strip())
                note(f"part {n}/{len(parts)} done")
            text = "\n\n".join(summaries)
            ids = self._tokens(text)
        if depth:
            note(f"combining {len(summaries)} summaries")
        self._answer(COMBINE if depth else WHOLE, text, self.args.max_tokens, out=sys.stdout)

    def _tokens(self, text: str) -> list[int]:
        return self.os.tokenize(text, model=self.model, add_bos=False, special=False)

    def _answer(self, template: str, text: str, max_tokens: int, out=None) -> str:
        stream = self.os.chat([{"role": "user", "content": template.format(text=text)}],
                              model=self.args.model, max_tokens=max_tokens,
                              temperature=self.args.temperature, seed=self.args.seed)
        pieces = []
        for chunk in stream:
            pieces.append(chunk.text)
            if out is not None:
                out.write(chunk.text)
                out.flush()
        if out is not None and pieces and not pieces[-1].endswith("\n"):
            out.write("\n")
        return "".join(pieces)


def note(message: str) -> None:
    print(f"summarize: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="summarize", description="Summarize standard input.")
    ap.add_argument("--max-tokens", type=int, default=200, help="length of the summary (default 200)")
    ap.add_argument("--chunk-tokens", type=int, help="tokens per part of a long text "
                                                     "(default: what the model's context allows)")
    ap.add_argument("--model", help="a model's name (default: the loaded one)")
    ap.add_argument("--temperature", type=float, default=0.3)
    ap.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    if args.max_tokens < 1 or (args.chunk_tokens is not None and args.chunk_tokens < 16):
        ap.error("--max-tokens must be >= 1 and --chunk-tokens >= 16")
    text = sys.stdin.read()
    if not text.strip():
        print("summarize: nothing to summarize: standard input is empty", file=sys.stderr)
        return 1
    return connected("summarize", lambda os_: Summarizer(os_, args).run(text))


if __name__ == "__main__":
    sys.exit(main())
