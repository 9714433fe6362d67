"""The HTTP gateway: llmos spoken as the OpenAI API (/v1) and Ollama's (/api), by a daemon,
with Prometheus metrics (/metrics).

    python -m userland.gateway --listen 127.0.0.1:8790 [--require-key]

The kernel starts it at boot as a daemon ([gateway] in config.toml, on by default; restarted
whenever it exits) and it is a program like any other: it reaches llmos through syscalls only,
as one process that ps shows with what it advertises ({state, url}), and one more per API key
in use, with the key's priority and limits. A client that goes away cancels its syscall, so the
kernel frees the request's KV at once.

    __main__.py       the daemon: connect, refuse or bind, advertise, serve, stop
    app.py            the ASGI app: routes, shared errors, the process a request runs as
    keys.py           API keys: stored as hashes, each used key a process of its own
    metrics.py        /metrics: the gateway's counters and histograms, and llmos's at each scrape
    openai_api.py     /v1/models, /v1/chat/completions, /v1/completions
    ollama_api.py     /api/chat, /api/generate, /api/tags, /api/ps, /api/show, /api/version
    params.py         request bodies checked and read into syscall arguments
    generation.py     a generate or chat call as both APIs start and read it
    responses.py      error bodies and statuses, bodies within a limit, answers that watch the client

Never: import the kernel or a service, or answer 500 for anything a client sent.
"""
