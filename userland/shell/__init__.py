"""llmsh's insides: ``parse`` (the language), ``shell`` (running it over one connection to llmos),
``builtin`` (what a command is) and ``commands`` (the commands), ``repl`` (the interactive prompt).
The entry point is ``userland.llmsh:main``."""
