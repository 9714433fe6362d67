"""How often llmsh's `? TEXT` proposes the expected command: python bench/ask.py

Runs the default model (SmolLM2-135M-Instruct) in this process, as the inference service and a
driver do, on the very prompt and grammar llmsh builds (userland/shell/ask.py) for each plain
request below; prints each proposal, whether it parses (it must, always) and whether it is one of
the expected command lines. docs/guide.md reports the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from drivers.model import Tokenizer  # noqa: E402
from drivers.model import constraints as C  # noqa: E402
from drivers.runner import ModelRunner  # noqa: E402
from services.inference.engine import Engine, run_in_process  # noqa: E402
from syscalls.runtime.models import default_path  # noqa: E402
from userland.shell import ask  # noqa: E402
from userland.shell.commands import COMMANDS  # noqa: E402
from userland.shell.parse import ParseError, parse  # noqa: E402

# request -> the command lines that do it
REQUESTS = {
    "list the running processes": ["ps"],
    "show the keys under notes": ["ls notes", "ls notes/"],
    "stop job 2": ["kill %2", "kill -TERM %2"],
    "show the value of the key todo": ["get todo", "cat todo"],
    "delete the key old/draft": ["rm old/draft"],
    "show the background jobs": ["jobs"],
    "list the models": ["models"],
    "show the last 5 lines of the kernel log": ["dmesg -n 5"],
    "send hello to process 42": ["send 42 hello", 'send 42 "hello"'],
    "store buy milk under the key shopping": ['put shopping "buy milk"'],
    "show the services": ["services"],
    "bring job 1 to the foreground": ["fg %1", "fg"],
    "pause process 17": ["kill -STOP 17"],
    "make process 99 more urgent": ["renice -5 99", "renice -10 99", "renice -20 99", "renice -1 99"],
    "subscribe to the topic alerts": ["sub alerts"],
    "show how to use kill": ["help kill"],
}


def main() -> None:
    path = default_path()
    runner = ModelRunner.from_gguf(path, num_blocks=1024, dense_copy="never")
    tok = Tokenizer.from_gguf(path)
    grammar, longest = ask.grammar(COMMANDS)
    C.check(C.vocabulary(tok), grammar, "grammar")
    engine = Engine(runner.info(), tok, token_budget=2048)
    # one request after another on a context, so that the prompt they share (the commands and the
    # examples) is computed once; each answer is the one a fresh chat gets (greedy)
    ctx = engine.open_context(0, "bench", [])
    out = {}
    for text in REQUESTS:
        sid = engine.add(ask.prompt(COMMANDS, text), {"temperature": 0.0}, max_tokens=longest + 1,
                         constraint=grammar, ctx=ctx)
        out[text] = run_in_process(engine, runner)[sid]
    hits = parsed = 0
    print(f"{'request':42} {'proposal':32} parses  expected")
    for text, want in REQUESTS.items():
        line = out[text]["text"].strip()
        try:
            parse(line + "\n")
            ok = True
        except ParseError:
            ok = False
        parsed += ok
        hit = line in want
        hits += hit
        print(f"{text:42} {line:32} {'yes' if ok else 'NO':6}  {'yes' if hit else 'no (' + want[0] + ')'}")
    print(f"\n{hits} of {len(REQUESTS)} proposals are the expected command; {parsed} of {len(REQUESTS)} parse")


if __name__ == "__main__":
    main()
