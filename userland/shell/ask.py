"""``? TEXT``: the model proposes one llmsh command line that does TEXT.

The proposal is constrained by a Lark grammar made from llmsh's own command table (``grammar``):
each builtin's synopsis (``ls [-l] [--ns NS] [PREFIX]``) becomes a rule, its options literals and
its operands terminals of their kind (a PID is digits, a SIGNAL one of the signals, a KEY a word,
TEXT a word or a double-quoted string), so whatever the model says is a command line llmsh parses
and whose words fit a synopsis. The prompt lists the commands with their one-line summaries, and
its few-shot examples are the ``Example:`` lines of the commands' own help (``examples``).

At a terminal the shell shows the proposal with a one-line explanation (the proposed command's
summary) and runs it only after ``y``; ``llmsh -c '? TEXT'`` prints the proposal alone on the first
line (the explanation on the second, as a comment) and runs nothing.

Never: run what the model proposed without the user's yes.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from syscalls.table import RESOURCES, SIGNALS

from .builtin import Builtin

EXAMPLE = re.compile(r"^\s*Example:\s*(?P<line>.+?)\s+#\s+(?P<request>.+?)\s*$")
HEADER = ("llmsh is the shell of llmos, an operating system for language models. Its commands:\n"
          "{commands}\n\nEach request below is answered with the one llmsh command line that does it.\n\n")
REPEAT = 3              # an operand written X... is given at most this many times
OPERAND = 32            # characters of a word
QUOTE = 48              # characters of a quoted text, quotes included

# an operand's kind, by its name in the synopses: (Lark, its longest length in characters)
_NUMBER = (r"/-?[0-9]{1,5}(\.[0-9]{1,2})?/", 9)
_WORD = (rf"/[A-Za-z0-9_.\/:@+=,-]{{1,{OPERAND}}}/", OPERAND)
_TEXT = (rf'(/[A-Za-z0-9_.\/:@+=,-]{{1,{OPERAND}}}/ | /"[^"\\$\n]{{1,{QUOTE - 2}}}"/)', max(OPERAND, QUOTE))
KINDS = {
    "PID": (r"/[1-9][0-9]{0,6}/", 7), "%JOB": (r"/%[1-9][0-9]?/", 3), "%N": (r"/%[1-9][0-9]?/", 3),
    "SIGNAL": ("(" + " | ".join(f'"{s}"' for s in SIGNALS) + ")", max(map(len, SIGNALS))),
    "RESOURCE": ("(" + " | ".join(f'"{r}"' for r in RESOURCES) + ")", max(map(len, RESOURCES))),
    "POLICY": ('("never" | "on-failure" | "always")', 10),
    **{k: _NUMBER for k in ("N", "S", "V", "T", "P", "K", "STATUS", "PRIORITY", "LIMIT", "SECONDS")},
    **{k: _TEXT for k in ("TEXT", "MESSAGE", "PROMPT", "DATA", "VALUE", "STR", "WORD")},
}


def examples(commands: dict[str, Builtin]) -> list[tuple[str, str]]:
    """(request, command line) from every ``Example: LINE  # REQUEST`` of the commands' help."""
    out = []
    for cmd in commands.values():
        for line in cmd.doc.splitlines():
            m = EXAMPLE.match(line)
            if m:
                out.append((m["request"], m["line"]))
    return out


# -- the grammar ----------------------------------------------------------------------------------

def grammar(commands: dict[str, Builtin]) -> tuple[str, int]:
    """The Lark grammar of one llmsh command line made of a builtin and its operands, and the
    longest line it admits, in characters: with at least that many tokens to generate, a
    proposal always ends inside the grammar (a token is at least one byte)."""
    rules, longest = [], 0
    for name, cmd in commands.items():
        rhs, n = _synopsis(cmd.synopsis)
        rules.append(f"c_{_rule_name(name)}: {rhs}")
        longest = max(longest, n)
    names = " | ".join(f"c_{_rule_name(name)}" for name in commands)
    # the line's end is part of it: where the examples put a newline, the model can end the line
    # rather than be left to go on with another operand
    return "\n".join([f'start: ({names}) "\\n"', *rules]) + "\n", longest + 1


def _rule_name(name: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", name.lower())


def _tokens(text: str) -> list[str]:
    return re.findall(r"\.\.\.|[\[\]()|]|[^\s\[\]()|.]+(?:\.(?!\.\.)[^\s\[\]()|.]*)*", text)


def _synopsis(synopsis: str) -> tuple[str, int]:
    """One command's synopsis (alternatives "  |  ", each starting with the command's name) as
    the right-hand side of its rule, and the longest text it admits."""
    alternatives, longest = [], 0
    for alt in re.split(r"\s{2,}\|\s{2,}", synopsis):
        name, _, rest = alt.partition(" ")
        rhs, n = _sequence(_Parser(_tokens(rest)).alternatives())
        alternatives.append(f'("{name}"{rhs})')
        longest = max(longest, len(name) + n)
    return " | ".join(alternatives), longest


class _Parser:
    """A synopsis's operands: [optional], (group), a | b, X... (one or more)."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.i = tokens, 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def alternatives(self) -> list:
        alts = [self.sequence()]
        while self.peek() == "|":
            self.i += 1
            alts.append(self.sequence())
        return alts

    def sequence(self) -> list:
        items = []
        while self.peek() not in (None, "|", "]", ")"):
            tok = self.tokens[self.i]
            self.i += 1
            if tok in ("[", "("):
                inner = self.alternatives()
                self.i += 1                     # the closing ] or )
                item = ("opt" if tok == "[" else "group", inner)
            else:
                item = ("word", tok)
            if self.peek() == "...":
                self.i += 1
                item = ("many", item)
            items.append(item)
        return items


def _sequence(alts: list) -> tuple[str, int]:
    """Alternatives of sequences, each element with the space before it (so an optional part
    left out leaves no space behind), and the longest."""
    parts = []
    for seq in alts:
        elements = [_element(it) for it in seq]
        parts.append(("".join(e for e, _ in elements) or ' ""', sum(n for _, n in elements)))
    longest = max(n for _, n in parts)
    if len(parts) == 1:
        return parts[0][0], longest
    return " (" + " | ".join(p.strip() for p, _ in parts) + ")", longest


def _element(item) -> tuple[str, int]:
    kind, value = item
    if kind == "word":
        lark, n = _word(value)
        return f' " " {lark}', 1 + n
    if kind in ("opt", "group"):
        rhs, n = _sequence(value)
        return f" ({rhs.strip()})" + ("?" if kind == "opt" else ""), n
    inner = value[1] if value[0] == "opt" else [[value]]     # X... or [X]...: up to REPEAT of them
    rhs, n = _sequence(inner)
    first = "" if value[0] == "opt" else f" ({rhs.strip()})"
    optional = REPEAT - (0 if value[0] == "opt" else 1)
    return first + f" ({rhs.strip()})?" * optional, n * REPEAT


def _word(word: str) -> tuple[str, int]:
    if word in KINDS:
        return KINDS[word]
    bare = word.lstrip("-")
    if word.startswith("-") and bare in KINDS and bare.isupper():
        dashes = word[: len(word) - len(bare)]
        lark, n = KINDS[bare]
        return f'"{dashes}" {lark}', len(dashes) + n
    if re.fullmatch(r"[A-Z][A-Z_]*", word.lstrip("%")):
        return _TEXT                              # any other operand: a word, or quoted text
    return json.dumps(word), len(word)


# -- the proposal ---------------------------------------------------------------------------------

def prompt(commands: dict[str, Builtin], text: str) -> str:
    """The completion that asks for a command line: the commands, the help's examples, then TEXT.
    A plain completion rather than a chat: a small model follows a pattern of lines better than
    it follows instructions."""
    listing = "\n".join(f"{cmd.name}: {cmd.summary}" for cmd in commands.values())
    shots = "".join(f"request: {request}\ncommand: {line}\n\n" for request, line in examples(commands))
    return HEADER.format(commands=listing) + shots + f"request: {' '.join(text.split())}\ncommand: "


def propose(sh, text: str) -> tuple[str, str]:
    """(command line, one-line explanation) for TEXT, from the model through the shell's
    connection; greedy, so the same request gets the same proposal."""
    commands = sh.commands
    rules, longest = grammar(commands)
    chunks = sh.conn.generate(prompt=prompt(commands, text), grammar=rules, max_tokens=longest + 1,
                              temperature=0.0)
    line = "".join(ch.text for ch in chunks).strip()
    return line, explain(commands, line)


def explain(commands: dict[str, Builtin], line: str) -> str:
    """What a proposed line does, in the words of its commands' help."""
    cmd = commands.get(line.split(" ", 1)[0])
    return f"{cmd.name}: {cmd.summary}" if cmd is not None else ""


def ask(sh, text: str, interactive: bool, confirm) -> int:
    """``? TEXT``. interactive: show the proposal and its explanation, and run it if confirm()
    says yes; else print the line alone on the first line (the explanation after it) and run
    nothing. Status: the command's, 0 when it is only shown, 1 when nothing was proposed."""
    from .parse import ParseError, parse
    text = text.strip()
    if not text:
        print("llmsh: ?: say what to do, as in: ? list the running processes", file=sh.io.stderr)
        return 2
    from syscalls import errors
    from .builtin import error_text
    try:
        line, why = propose(sh, text)
    except errors.LLMOSError as e:
        print(f"llmsh: ?: {error_text(e)}", file=sh.io.stderr)
        return 1
    try:
        script = parse(line + "\n")
    except ParseError as e:       # the grammar makes this impossible; say so if it ever happens
        print(f"llmsh: ?: the model proposed {line!r}, which does not parse: {e.message}", file=sh.io.stderr)
        return 1
    if not interactive:
        print(line, file=sh.io.stdout)
        print(f"# {why}", file=sh.io.stdout, flush=True)
        return 0
    print(f"{line}\n  # {why}", file=sh.io.stdout, flush=True)
    if not confirm("run it? [y/N] "):
        return 0
    return sh.run(script)
