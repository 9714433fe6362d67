"""The HTTP gateway against a booted llmos (the tiny model), through the real openai and ollama
client packages, and raw HTTP (httpx, sockets) for the error paths and for clients that go away.

The gateway listens on port 0 (a free port) and the tests learn its URL from what it advertises
in ps, so that boots never fight over a port.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from conftest import FAST_SUPERVISION, LIGHT_SERVICES, Booted, run_cli, wait_until
from model.tiny_gguf import write_tiny_gguf

MODEL_SERVICES = '[services]\nenabled = ["storage", "tokenizer", "cpu", "inference"]\n'
CHAT = [{"role": "user", "content": "Hello there"}]
LONG = 4000          # tokens: ~10 s of the tiny model, far longer than any wait below


def gateway_entry(conn) -> dict | None:
    return next((p for p in conn.ps() if p["name"] == "gateway" and p["daemon"]), None)


def advertised(system: Booted, state: str = "listening", old_os_pid: int | None = None) -> dict:
    """The gateway's ps entry once it advertises state (from an OS process other than old_os_pid)."""
    with system.connect() as c:
        return wait_until(lambda: (g := gateway_entry(c)) and g["advertised"].get("state") == state
                          and g["os_pid"] != old_os_pid and g, 20, f"the gateway to be {state}")


def boot(services: str, listen: str = "127.0.0.1:0", extra: str = "", **model) -> Booted:
    """llmos with the tiny model (write_tiny_gguf's options in model) and extra lines in [gateway]."""
    home = Path(tempfile.mkdtemp(prefix="llmos-", dir="/tmp"))
    model = write_tiny_gguf(home / "tiny.gguf", context=LONG + 96, **model)
    (home / "config.toml").write_text(
        FAST_SUPERVISION + f'\n[driver]\nmodel = "{model}"\nkv_blocks = 1024\n' + services +
        f'\n[gateway]\nlisten = "{listen}"\n' + extra)
    system = Booted(home).boot()
    system.model = model
    return system


def start_tiny(extra: str = "", **model) -> Booted:
    """The tiny model registered as "tiny", and where the gateway listens (url, gateway_pid)."""
    system = boot(MODEL_SERVICES, extra=extra, **model)
    with system.connect(privileged=True) as c:
        c.model_add(str(system.model), "tiny")
    entry = advertised(system)
    system.url, system.gateway_pid = entry["advertised"]["url"], entry["pid"]
    return system


@pytest.fixture(scope="module")
def gw():
    system = start_tiny()
    try:
        yield system
    finally:
        system.discard()


def client(system: Booted, key: str = "unused") -> openai.OpenAI:
    """The openai package's client of the gateway, with a key (a placeholder is no llmos key)."""
    return openai.OpenAI(base_url=system.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture
def oai(gw):
    return client(gw)


def requests_of(system: Booted, pid: int) -> list[dict]:
    with system.connect() as c:
        return c.runqueue(pid=pid)["requests"]


@pytest.fixture
def idle(gw):
    """The gateway has no request left in the run queue (one cancelled by the test before may
    still be leaving it)."""
    wait_until(lambda: not requests_of(gw, gw.gateway_pid), 5, "the gateway's requests to end")


def post(gw, path: str, body, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(gw.url + path, content=content, headers={"content-type": "application/json"},
                      timeout=60, **kw)


# -- the daemon ---------------------------------------------------------------------------------------
def test_status_shows_the_gateway_url_and_state(gw):
    r = run_cli(gw.home, "status")
    line = next(line for line in r.stdout.splitlines() if line.startswith("gateway "))
    assert "RUNNING" in line and f"listening {gw.url}" in line
    assert httpx.get(gw.url + "/").status_code == 200


def test_the_daemon_waits_for_a_taken_port_and_comes_back_when_killed(home):
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    (home / "config.toml").write_text(FAST_SUPERVISION + LIGHT_SERVICES +
                                      f'[gateway]\nlisten = "127.0.0.1:{port}"\n')
    system = Booted(home).boot()
    try:
        waiting = advertised(system, "waiting")
        assert f"cannot listen on 127.0.0.1:{port}" in waiting["advertised"]["error"]
        holder.close()
        first = advertised(system)
        assert first["advertised"]["url"] == f"http://127.0.0.1:{port}" and first["restarts"] == 0
        listed = httpx.get(first["advertised"]["url"] + "/v1/models").json()   # registered, none loaded
        assert [m["id"] for m in listed["data"]] == ["smollm2-135m-instruct"]
        os.kill(first["os_pid"], signal.SIGKILL)
        again = advertised(system, old_os_pid=first["os_pid"])
        assert again["pid"] == first["pid"] and again["restarts"] == 1 and again["restart"] == "always"
        assert httpx.get(again["advertised"]["url"] + "/api/version").json()["version"]
    finally:
        holder.close()
        system.shutdown()


def test_off_loopback_without_keys_it_refuses_and_says_why(home):
    (home / "config.toml").write_text(FAST_SUPERVISION + LIGHT_SERVICES + '[gateway]\nlisten = "0.0.0.0:0"\n')
    system = Booted(home).boot()
    try:
        entry = advertised(system, "refused")
        assert "0.0.0.0 is not a loopback address and require_key is false" in entry["advertised"]["error"]
        assert "url" not in entry["advertised"] and entry["restarts"] == 0    # no crash loop
        status = run_cli(home, "status").stdout
        assert "refused listen address 0.0.0.0 is not a loopback address" in status
        assert "gateway_refused" in system.paths.log_file("gateway").read_text()
    finally:
        system.shutdown()


def test_config_makes_the_gateway_a_daemon_unless_disabled(tmp_path):
    from syscalls.runtime.config import Config
    (daemon,) = Config.load(tmp_path / "absent.toml").daemons
    assert daemon.name == "gateway" and daemon.restart == "always" and daemon.privileged
    assert daemon.argv[1:] == ["-m", "userland.gateway", "--listen", "127.0.0.1:8790"]
    (tmp_path / "off.toml").write_text("[gateway]\nenabled = false\n")
    assert Config.load(tmp_path / "off.toml").daemons == []
    (tmp_path / "keys.toml").write_text('[gateway]\nlisten = "[::]:9000"\nrequire_key = true\n')
    assert Config.load(tmp_path / "keys.toml").daemons[0].argv[-3:] == ["--listen", "[::]:9000", "--require-key"]
    (tmp_path / "clash.toml").write_text('[[daemons]]\nname = "gateway"\nargv = ["sleep", "9"]\n')
    with pytest.raises(ValueError, match="clashes with the gateway"):
        Config.load(tmp_path / "clash.toml")
    for listen in ("localhost", "127.0.0.1:http", "[::1]:70000", ":8790"):   # the boot stops, saying so
        (tmp_path / "bad.toml").write_text(f'[gateway]\nlisten = "{listen}"\n')
        with pytest.raises(ValueError, match="gateway.listen must be HOST:PORT"):
            Config.load(tmp_path / "bad.toml")


def test_which_addresses_need_a_key():
    from userland.gateway.__main__ import refusal
    for host in ("127.0.0.1", "127.3.2.1", "::1", "localhost"):
        assert refusal(host, require_key=False) is None
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        assert "not a loopback address" in refusal(host, require_key=False)
        assert refusal(host, require_key=True) is None


def test_llmos_errors_become_statuses_clients_act_on():
    from syscalls import errors
    from userland.gateway.responses import from_llmos
    busy = from_llmos(errors.EAGAIN("generate: the run queue is full"))
    assert (busy.status, busy.retry_after, busy.code) == (429, 1, "rate_limit_exceeded")
    quota = from_llmos(errors.EDQUOT("pid 4 generated 90 tokens ... (try again in 42 s)"))
    assert (quota.status, quota.retry_after) == (429, 42)
    assert from_llmos(errors.EINVAL("chat: argument 'messages': bad"), "messages").param == "messages"
    assert from_llmos(errors.ENOENT("no model named 'x'")).body("ollama") == {"error": "no model named 'x'"}
    for code in ("ESHUTDOWN", "ESRVDOWN", "ETIMEDOUT", "ECONNREFUSED"):
        assert from_llmos(errors.from_wire(code, "down")).status == 503
    assert from_llmos(errors.EIO("a driver failed")).status == 500      # llmos's fault, not the client's


# -- the OpenAI API ---------------------------------------------------------------------------------
def test_models_lists_every_registered_model(oai):
    assert [m.id for m in oai.models.list().data] == ["smollm2-135m-instruct", "tiny"]
    assert oai.models.retrieve("tiny").owned_by == "llmos"


def test_chat_completion_counts_tokens_and_honours_max_tokens(oai):
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=7,
                                    extra_body={"ignore_eos": True})
    choice = r.choices[0]
    assert r.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 3 and r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_greedy_logprobs_pick_the_likeliest_token(oai):
    r = oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == 6
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_same_seed_same_text_and_stop_cuts_it(oai):
    ask = dict(model="tiny", messages=CHAT, max_tokens=40, temperature=0.9, top_p=0.9, seed=7,
               extra_body={"ignore_eos": True})
    a, b = (oai.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert a == b and len(a) >= 8
    stop = a[5:8]
    cut = oai.chat.completions.create(**ask, stop=[stop]).choices[0]
    assert cut.message.content == a[:a.index(stop)] and cut.finish_reason == "stop"


def test_streamed_chat_ends_with_usage_then_done(gw, oai):
    chunks = list(oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    greedy = dict(model="tiny", messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**greedy).choices[0].message.content
    streamed = oai.chat.completions.create(**greedy, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole
    with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and lines[-1] == "data: [DONE]"


def test_completions_with_echo_and_logprobs(oai):
    r = oai.completions.create(model="tiny", prompt="The quick brown", max_tokens=5, logprobs=2,
                               echo=True, temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert r.object == "text_completion" and c.text.startswith("The quick brown")
    assert len(c.logprobs.tokens) == 5 == r.usage.completion_tokens
    assert c.logprobs.text_offset[0] == len("The quick brown")
    assert all(len(top) <= 2 for top in c.logprobs.top_logprobs)
    streamed = oai.completions.create(model="tiny", prompt="The quick brown", max_tokens=5,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
    assert "The quick brown" + "".join(x.choices[0].text for x in streamed) == c.text


def test_bad_parameters_are_400s_naming_them(gw, oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=CHAT, n=2)
    assert e.value.param == "n" and "n" in e.value.message
    cases = {
        "temperature": {"temperature": "hot"},
        "top_p": {"top_p": 1.5},
        "max_tokens": {"max_tokens": 0},
        "stop": {"stop": [1, 2]},
        "seed": {"seed": -3},
        "top_logprobs": {"top_logprobs": 2},
        "messages[0].role": {"messages": [{"role": "wizard", "content": "x"}]},
        "messages[0].content[0]": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]},
        "stream_options.include_usage": {"stream": True, "stream_options": {"include_usage": "yes"}},
        "model": {"model": ""},
    }
    for param, change in cases.items():
        r = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, **change})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == param, (param, r.text)
        assert error["type"] == "invalid_request_error" and f"'{param}'" in error["message"]


def test_malformed_oversize_and_unknown_requests(gw):
    for body in (b"{nope", b"[1, 2]", b"", b'{"temperature": NaN}', b"[" * 100000):
        r = post(gw, "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", body[:10]
    r = post(gw, "/v1/chat/completions", b'{"model": "tiny", "pad": "' + b"x" * (4 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = post(gw, "/v1/chat/completions", {"model": "nonesuch", "messages": CHAT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post(gw, "/api/chat", b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')
    assert r.status_code == 400 and "lone surrogates" in r.json()["error"]      # JSON allows it, UTF-8 not
    r = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "top_k": 10**30})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k"
    r = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "fox " * 5000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": CHAT, "max_tokens": 2,
                                          "frobnicate": {"a": 1}, "user": "me"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2     # unknown: ignored
    assert httpx.get(gw.url + "/v1/nowhere").json()["error"]["code"] == "not_found"
    assert httpx.get(gw.url + "/v1/chat/completions").status_code == 405
    assert httpx.get(gw.url + "/api/nowhere").json() == {"error": "no such endpoint: GET /api/nowhere"}
    with gw.connect() as c:
        entry = gateway_entry(c)
    assert entry["restarts"] == 0 and entry["advertised"]["url"] == gw.url     # it never died


FIELDS = {
    "/v1/chat/completions": ["model", "messages", "temperature", "top_p", "seed", "stop", "n",
                             "logprobs", "top_logprobs", "stream_options", "response_format",
                             "tools", "top_k", "min_p", "repetition_penalty", "ignore_eos"],
    "/v1/completions": ["model", "prompt", "echo", "logprobs", "suffix", "best_of", "stop", "seed"],
    "/api/chat": ["model", "messages", "options", "format", "tools", "logprobs", "top_logprobs"],
    "/api/generate": ["model", "prompt", "system", "raw", "options", "images", "suffix"],
    "/api/show": ["model", "name"],
}
LIMIT = {"max_tokens": 2, "stream": False, "options": {"num_predict": 2}}


def test_no_body_a_client_sends_gets_a_500(gw):
    """Any JSON in any field of any endpoint: a 2xx or a 4xx, never a 5xx, and the gateway lives.
    GATEWAY_FUZZ=N tries N bodies (default 60)."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | \
        st.text(max_size=8) | st.sampled_from(["tiny", "user", "assistant", "text", "", -1, 0, 1, 2.5])
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3) |
                         st.dictionaries(st.sampled_from(["role", "content", "type", "text", "num_predict",
                                                          "temperature", "stop", "include_usage", "x"]),
                                         inner, max_size=3), max_leaves=8)
    valid = {"model": "tiny", "messages": CHAT, "prompt": "hi"}

    @settings(max_examples=int(os.environ.get("GATEWAY_FUZZ", 60)), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(sorted(FIELDS)), st.data())
    def one(path, data):
        body = dict(valid)
        for field in data.draw(st.lists(st.sampled_from(FIELDS[path]), max_size=3, unique=True)):
            body[field] = data.draw(value)
        body.update(LIMIT if not isinstance(body.get("options"), dict) else
                    dict(LIMIT, options=dict(body["options"], num_predict=2)))
        r = post(gw, path, body)
        assert r.status_code < 500, (path, body, r.text)
    one()
    with gw.connect() as c:
        assert gateway_entry(c)["restarts"] == 0


def test_a_full_quota_is_a_429_with_retry_after(gw, idle):
    with gw.connect(privileged=True) as root:
        root.setrlimit("sequences", 1, pid=gw.gateway_pid)
        try:
            with httpx.stream("POST", gw.url + "/v1/chat/completions", timeout=60, json={
                    "model": "tiny", "messages": CHAT, "max_tokens": LONG, "ignore_eos": True,
                    "stream": True}) as busy:
                lines = busy.iter_lines()       # kept: a dropped iterator closes the connection
                next(lines)
                r = post(gw, "/v1/chat/completions", {"model": "tiny", "messages": CHAT})
                assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "quota_exceeded" and "sequences limit" in r.text
                with pytest.raises(ollama.ResponseError) as e:
                    ollama.Client(host=gw.url).generate(model="tiny", prompt="hi", stream=False)
                assert e.value.status_code == 429
        finally:
            root.setrlimit("sequences", None, pid=gw.gateway_pid)


# -- clients that go away ---------------------------------------------------------------------------
def test_a_closed_stream_cancels_its_request(gw, idle):
    with gw.connect() as c:
        before = c.ps(pid=gw.gateway_pid)[0]["tokens_out"]
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", gw.url + "/v1/chat/completions", json={
                "model": "tiny", "messages": CHAT, "max_tokens": LONG, "ignore_eos": True,
                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert len(requests_of(gw, gw.gateway_pid)) == 1
    wait_until(lambda: not requests_of(gw, gw.gateway_pid), 5, "the request to leave the run queue")
    # ps hears of the freed blocks from the scheduler's next report; what the gateway's process
    # keeps are the contexts of the chats before (tests/test_gateway_conversations.py)
    with gw.connect(privileged=True) as c:
        def freed():
            kept = sum(x["kv_blocks"] for x in c.contexts(pid=gw.gateway_pid))
            return (e := c.ps(pid=gw.gateway_pid)[0])["kv_blocks"] == kept and e
        entry = wait_until(freed, 5, "ps to show the request's KV blocks freed")
    assert entry["tokens_out"] - before < LONG // 2


def test_a_client_gone_while_waiting_for_a_whole_answer_cancels_it(gw, idle):
    for path, body in (("/v1/completions", {"model": "tiny", "prompt": "Once", "max_tokens": LONG,
                                            "ignore_eos": True}),
                       ("/api/chat", {"model": "tiny", "messages": CHAT, "stream": False,
                                      "options": {"num_predict": LONG}})):
        raw = json.dumps(body).encode()
        host, port = gw.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            wait_until(lambda: requests_of(gw, gw.gateway_pid), 5, f"{path}'s request to run")
        wait_until(lambda: not requests_of(gw, gw.gateway_pid), 5, f"{path}'s request to be cancelled")


# -- the Ollama API ---------------------------------------------------------------------------------
def test_ollama_chat_streams_and_ends_with_counts(gw):
    client = ollama.Client(host=gw.url)
    parts = list(client.chat(model="tiny:latest", messages=CHAT, stream=True,
                             options={"num_predict": 9, "temperature": 0}))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    last = parts[-1]
    assert last.done_reason == "length" and last.eval_count <= 9 and last.prompt_eval_count > 3
    assert last.total_duration >= last.eval_duration > 0 and last.prompt_eval_duration > 0
    whole = client.chat(model="tiny", messages=CHAT, stream=False, options={"num_predict": 9, "temperature": 0})
    assert whole.done and whole.message.content == "".join(p.message.content for p in parts)


def test_ollama_generate_raw_and_templated(gw):
    client = ollama.Client(host=gw.url)
    raw = client.generate(model="tiny", prompt="The quick", raw=True, options={"num_predict": 4})
    templated = client.generate(model="tiny", prompt="The quick", system="Be brief.",
                                options={"num_predict": 4})
    assert raw.done and templated.done and raw.prompt_eval_count < templated.prompt_eval_count
    streamed = list(client.generate(model="tiny", prompt="hi", stream=True, options={"num_predict": 3}))
    assert streamed[-1].done and streamed[-1].eval_count <= 3
    assert client.generate(model="tiny", prompt="").done_reason == "load"
    lines = httpx.post(gw.url + "/api/generate", json={"model": "tiny", "prompt": "hi",
                                                       "options": {"num_predict": 2}}).text.splitlines()
    assert json.loads(lines[-1])["done"] is True and all(json.loads(x)["done"] is False for x in lines[:-1])


def test_ollama_tags_ps_show_and_version(gw):
    client = ollama.Client(host=gw.url)
    tags = {m.model: m for m in client.list().models}
    assert {"tiny", "smollm2-135m-instruct"} <= set(tags)
    assert tags["tiny"].details.format == "gguf" and tags["tiny"].size > 0
    assert [m.model for m in client.ps().models] == ["tiny"]
    show = client.show("tiny")
    assert show.details.family == "llama" and show.modelinfo["llama.context_length"] == LONG + 96
    assert httpx.get(gw.url + "/api/version").json()["version"]
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nonesuch")
    assert e.value.status_code == 404 and "nonesuch" in e.value.error


def test_ollama_errors_are_ollama_shaped(gw):
    r = httpx.post(gw.url + "/api/chat", json={"model": "tiny", "messages": CHAT,
                                               "options": {"temperature": "warm"}})
    assert r.status_code == 400 and r.json() == {"error": "'options.temperature' must be a number, got a string"}
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=gw.url).chat(model="nonesuch", messages=CHAT)
    assert e.value.status_code == 404


# -- API keys ---------------------------------------------------------------------------------------
def add_key(home: Path, name: str, *options: str) -> str:
    r = run_cli(home, "keys", "add", name, *options)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[-1]


def test_a_key_runs_as_its_own_process_with_its_limits(gw, idle):
    import hashlib
    key = add_key(gw.home, "alice", "--priority", "5", "--limit", "tokens_per_minute=10")
    assert key.startswith("llmos-") and len(key) > 40
    with gw.connect(privileged=True) as root:
        stored = root.get("keys/alice", ns="gateway")["value"]
    assert stored["hash"] == hashlib.sha256(key.encode()).hexdigest() and key not in repr(stored)
    listed = run_cli(gw.home, "keys", "list").stdout
    assert "alice" in listed and "tokens_per_minute=10" in listed and key not in listed
    alice = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    r = alice.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 10
    with gw.connect() as c:
        proc = next(p for p in c.ps() if p["name"] == "key:alice")
        assert proc["priority"] == 5 and proc["tokens_out"] == 10
        assert c.getrlimit(pid=proc["pid"])["tokens_per_minute"] == 10
    with pytest.raises(openai.RateLimitError) as e:          # its minute's tokens are spent
        alice.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5)
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60 and "tokens_per_minute" in e.value.message
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=gw.url, headers={"Authorization": f"Bearer {key}"}).generate(
            model="tiny", prompt="hi")
    assert e.value.status_code == 429
    assert run_cli(gw.home, "keys", "rm", "alice").returncode == 0
    with gw.connect() as c:
        wait_until(lambda: all(p["name"] != "key:alice" for p in c.ps()), 5, "alice's process to end")
    with pytest.raises(openai.AuthenticationError) as e:
        alice.models.list()
    assert e.value.code == "invalid_api_key"


def test_keys_cli_refuses_what_it_cannot_keep(gw):
    for args, why in ((["add", "bad name"], "key name 'bad name'"),
                      (["add", "bob", "--limit", "storage_bytes=5"], "resources are"),
                      (["add", "bob", "--limit", "sequences"], "RESOURCE=N"),
                      (["rm", "nobody"], "no key named 'nobody'")):
        r = run_cli(gw.home, "keys", *args)
        assert r.returncode != 0 and why in r.stderr, (args, r.stderr)
    add_key(gw.home, "carol")
    r = run_cli(gw.home, "keys", "add", "carol")
    assert r.returncode == 1 and "a key named 'carol' exists" in r.stderr
    assert run_cli(gw.home, "keys", "rm", "carol").returncode == 0


def test_require_key_listens_anywhere_and_answers_only_keys(home):
    (home / "config.toml").write_text(FAST_SUPERVISION + LIGHT_SERVICES +
                                      '[gateway]\nlisten = "0.0.0.0:0"\nrequire_key = true\n')
    system = Booted(home).boot()
    try:
        url = advertised(system)["advertised"]["url"].replace("0.0.0.0", "127.0.0.1")
        for headers in ({}, {"Authorization": "Bearer sk-placeholder"}, {"Authorization": "Bearer llmos-wrong"}):
            r = httpx.get(url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer"), headers
            assert r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/api/tags").json()["error"].startswith("this gateway requires an llmos API key")
        key = add_key(home, "dave")
        assert httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert ollama.Client(host=url, headers={"Authorization": f"Bearer {key}"}).list().models
    finally:
        system.shutdown()


def test_without_storage_keys_are_a_503_and_the_rest_works(home):
    (home / "config.toml").write_text(FAST_SUPERVISION + '[services]\nenabled = ["tokenizer"]\n'
                                      '[gateway]\nlisten = "127.0.0.1:0"\n')
    system = Booted(home).boot()
    try:
        entry = advertised(system)
        url = entry["advertised"]["url"]
        r = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer llmos-anything"})
        assert r.status_code == 503 and "keys cannot be read" in r.json()["error"]["message"]
        assert httpx.get(url + "/api/tags").status_code == 200
        with system.connect() as c:
            assert gateway_entry(c)["restarts"] == 0
    finally:
        system.shutdown()


# -- /metrics ---------------------------------------------------------------------------------------
def scrape(gw) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(gw.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_requests_tokens_syscalls_and_latency(gw, oai, idle):
    before = scrape(gw)
    oai.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, extra_body={"ignore_eos": True})
    assert post(gw, "/v1/chat/completions", {"model": "nonesuch", "messages": CHAT}).status_code == 404
    after = scrape(gw)

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0)
    assert grew("llmos_http_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("llmos_http_requests_total", endpoint="/v1/chat/completions", status="404") == 1
    assert grew("llmos_http_requests_total", endpoint="/metrics", status="200") == 1
    assert grew("llmos_tokens_out_total", process="gateway") == 5
    assert grew("llmos_syscalls_total", syscall="chat") == 2
    assert grew("llmos_time_to_first_token_seconds_count") == 1
    assert 1 <= grew("llmos_inter_token_latency_seconds_count") <= 4      # the tokens after the first chunk
    assert after[("llmos_kv_blocks_total", ())] == 1024 and ("llmos_kv_blocks_used", ()) in after
    assert after[("llmos_service_up", (("service", "inference"),))] == 1
    assert after[("llmos_service_restarts_total", (("service", "cpu"),))] == 0
    assert ("llmos_runqueue_requests", (("state", "running"),)) in after


def test_a_programs_tokens_stay_counted_after_it_exits(gw):
    """tokens by process name only grow: an ended program's count is kept by the kernel."""
    before = scrape(gw).get(("llmos_tokens_out_total", (("process", "short-lived"),)), 0)
    with gw.connect(name="short-lived") as c:
        assert c.generate("hi", max_tokens=4, ignore_eos=True).text is not None
        pid = c.getpid()
        during = scrape(gw)[("llmos_tokens_out_total", (("process", "short-lived"),))]
    with gw.connect() as c:
        wait_until(lambda: all(p["pid"] != pid for p in c.ps()), 5, "the program to end")
    after = scrape(gw)[("llmos_tokens_out_total", (("process", "short-lived"),))]
    assert during == after == before + 4


# -- shutting down ----------------------------------------------------------------------------------
def test_requests_in_flight_at_shutdown_get_503_or_an_error_event():
    system = start_tiny()
    try:
        answers: dict = {}

        def whole():
            answers["whole"] = httpx.post(system.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": CHAT, "max_tokens": LONG, "ignore_eos": True})
        waiting = threading.Thread(target=whole)
        waiting.start()
        with httpx.stream("POST", system.url + "/api/generate", timeout=60, json={
                "model": "tiny", "prompt": "hi", "options": {"num_predict": LONG}}) as stream:
            lines = stream.iter_lines()
            assert json.loads(next(lines))["done"] is False
            wait_until(lambda: len(requests_of(system, system.gateway_pid)) == 2, 5, "both to run")
            assert run_cli(system.home, "shutdown").returncode == 0
            records = [json.loads(line) for line in lines if line]
        waiting.join(30)
        assert records[-1] == {"error": "llmos is shutting down"}
        r = answers["whole"]
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    finally:
        system.shutdown()
        shutil.rmtree(system.home, ignore_errors=True)
