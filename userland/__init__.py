"""Userland: the llmsh shell, the llmos command, and programs that use nothing but syscalls."""
