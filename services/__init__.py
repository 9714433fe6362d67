"""Service processes started and supervised by the kernel: storage, tokenizer, inference."""
