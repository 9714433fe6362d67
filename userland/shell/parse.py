"""The llmsh command language: words, quotes, ``;``, ``&``, ``&&``, ``||``, ``|``, redirections,
``$?``, ``#`` comments.

    script    := and_or ((';' | '&' | NEWLINE) and_or)* [';' | '&']
    and_or    := pipeline (('&&' | '||') NEWLINE* pipeline)*      -- '&' after it: a background job
    pipeline  := command ('|' NEWLINE* command)*
    command   := (WORD | redirect)+ with at least one WORD
    redirect  := ('>' | '>>' | '<') WORD

Words are quoted as in sh: '...' is literal, "..." keeps $?, $! and $$ live and lets \\ escape
" \\ $ and a newline, a bare \\ escapes the next character. Expansion happens when a command runs,
not here, so a word keeps its parameters as ``Param`` parts.

``|``, ``&``, ``>``, ``>>`` and ``<`` are operators wherever they appear; quote them to use them
as text. What ``>`` and ``<`` name (a storage key, a local file) is the executor's business.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

OPERATORS = ("&&", "||", ">>", ";", "|", "&", ">", "<")     # longest first
PARAMS = "?!$"              # $? last status, $! last spawned pid, $$ the shell's own pid


class ParseError(Exception):
    """The text is not a valid command line; ``pos`` is the offset of the fault."""

    def __init__(self, message: str, pos: int):
        super().__init__(message)
        self.message, self.pos = message, pos


class Incomplete(ParseError):
    """The text ends too early (an open quote, a trailing && or \\): more input may complete it."""


@dataclass(frozen=True)
class Param:
    name: str


@dataclass(frozen=True)
class Word:
    parts: tuple[str | Param, ...]
    pos: int


@dataclass(frozen=True)
class Redirect:
    op: str             # ">" (to a key), ">>" (append to a key), "<" (from a local file)
    target: Word


@dataclass(frozen=True)
class Command:
    words: tuple[Word, ...]
    redirects: tuple[Redirect, ...] = ()


@dataclass(frozen=True)
class Pipeline:
    commands: tuple[Command, ...]


@dataclass(frozen=True)
class AndOr:
    first: Pipeline
    rest: tuple[tuple[str, Pipeline], ...]      # ("&&" | "||", pipeline)
    background: bool = False                    # ended by '&'
    text: str = ""                              # its source, as jobs shows it


@dataclass(frozen=True)
class Token:
    kind: str           # "word", "op", "newline", "eof"
    value: object       # a Word, or the operator's text
    pos: int
    end: int            # just after it


# -- tokens ---------------------------------------------------------------------------------------
def tokenize(text: str) -> list[Token]:
    tokens, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\n":
            tokens.append(Token("newline", "\n", i, i + 1))
            i += 1
        elif c == "#":                              # only at the start of a word: a#b is a word
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("\\\n", i):
            _continuation(text, i)
            i += 2
        elif op := _operator(text, i):
            tokens.append(Token("op", op, i, i + len(op)))
            i += len(op)
        else:
            word, i = _word(text, i)
            tokens.append(Token("word", word, word.pos, i))
    tokens.append(Token("eof", "", n, n))
    return tokens


def _operator(text: str, i: int) -> str | None:
    return next((op for op in OPERATORS if text.startswith(op, i)), None)


def _continuation(text: str, i: int) -> None:
    if i + 2 >= len(text):
        raise Incomplete("the line ends with \\ (continued on the next line)", i)


def _word(text: str, start: int) -> tuple[Word, int]:
    parts: list[str | Param] = []
    buf: list[str] = []
    i, n = start, len(text)

    def param(name: str) -> None:
        if buf:
            parts.append("".join(buf))
            buf.clear()
        parts.append(Param(name))

    while i < n:
        c = text[i]
        if c in " \t\r\n" or _operator(text, i):
            break
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise Incomplete("unterminated ' quote", i)
            buf.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            i = _double_quoted(text, i, buf, param)
        elif c == "\\":
            if i + 1 >= n:
                raise Incomplete("the line ends with \\ (continued on the next line)", i)
            if text[i + 1] == "\n":
                _continuation(text, i)
            else:
                buf.append(text[i + 1])
            i += 2
        elif c == "$" and i + 1 < n and text[i + 1] in PARAMS:
            param(text[i + 1])
            i += 2
        else:
            buf.append(c)
            i += 1
    if buf or not parts:
        parts.append("".join(buf))      # '' is a word too: the empty string
    return Word(tuple(parts), start), i


def _double_quoted(text: str, start: int, buf: list[str], param) -> int:
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            buf.append("")              # so that "" alone still makes a word
            return i + 1
        if c == "\\" and i + 1 < n and text[i + 1] in '"\\$\n':
            if text[i + 1] != "\n":
                buf.append(text[i + 1])
            i += 2
        elif c == "$" and i + 1 < n and text[i + 1] in PARAMS:
            param(text[i + 1])
            i += 2
        else:
            buf.append(c)
            i += 1
    raise Incomplete('unterminated " quote', start)


# -- grammar --------------------------------------------------------------------------------------
def parse(text: str) -> list[AndOr]:
    """The command lists in text, in order; raises ParseError, or Incomplete if text ends early."""
    return _Parser(tokenize(text), text).script()


class _Parser:
    def __init__(self, tokens: list[Token], text: str):
        self.tokens, self.i, self.text = tokens, 0, text

    @property
    def peek(self) -> Token:
        return self.tokens[self.i]

    def _is_op(self, *ops: str) -> bool:
        return self.peek.kind == "op" and self.peek.value in ops

    def _skip_newlines(self) -> None:
        while self.peek.kind == "newline":
            self.i += 1

    def script(self) -> list[AndOr]:
        items = []
        while True:
            self._skip_newlines()
            if self.peek.kind == "eof":
                return items
            items.append(self.and_or())
            if self._is_op("&"):
                items[-1] = replace(items[-1], background=True)
            elif self.peek.kind == "eof":
                return items
            elif self.peek.kind != "newline" and not self._is_op(";"):
                raise self._unexpected()
            self.i += 1

    def and_or(self) -> AndOr:
        start = self.peek.pos
        first, rest = self.pipeline(), []
        while self._is_op("&&", "||"):
            op = self.tokens[self.i].value
            self.i += 1
            self._skip_newlines()
            if self.peek.kind == "eof":
                raise Incomplete(f"a command must follow {op}", self.peek.pos)
            rest.append((op, self.pipeline()))
        return AndOr(first, tuple(rest), text=self.text[start:self.tokens[self.i - 1].end])

    def pipeline(self) -> Pipeline:
        commands = [self.command()]
        while self._is_op("|"):
            self.i += 1
            self._skip_newlines()
            if self.peek.kind == "eof":
                raise Incomplete("a command must follow |", self.peek.pos)
            commands.append(self.command())
        return Pipeline(tuple(commands))

    def command(self) -> Command:
        words, redirects = [], []
        while True:
            if self.peek.kind == "word":
                words.append(self.peek.value)
                self.i += 1
            elif self._is_op(">", ">>", "<"):
                op = self.peek.value
                self.i += 1
                if self.peek.kind != "word":
                    what = "a key" if op != "<" else "a file"
                    raise ParseError(f"{op} needs {what} after it", self.peek.pos)
                redirects.append(Redirect(op, self.peek.value))
                self.i += 1
            else:
                break
        if not words:
            raise self._unexpected()
        return Command(tuple(words), tuple(redirects))

    def _unexpected(self) -> ParseError:
        t = self.peek
        what = {"eof": "end of input", "newline": "newline"}.get(t.kind, repr(t.value))
        return ParseError(f"unexpected {what}", t.pos)
