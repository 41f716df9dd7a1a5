"""`mlx-vocabtrim serve` over real HTTP on loopback ports with tiny models.

Each finding of issue 11 is a test here (fields naming models, losslessness with the KV cache
reused, the logit_bias crash, starvation, bad start-ups, dropped connections), plus the OpenAI
shapes, streaming, stop strings, the queue, cancellation and `bench-serve`.
"""

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlx.core as mx
import pytest
from click.testing import CliRunner
from conftest import build_tokenizer, make_model, model_config, save_model
from mlx_lm import load as mlx_lm_load

from mlx_vocabtrim import generate, load, save_vocab
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.serve import Engine, Job, held_back, stop_index

EOS = "2"  # <|im_end|> in the test tokenizer
LONG = 900  # tokens of a request that must still be running while a test looks at it
CHAT = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 24, "temperature": 0}
FOX = {"messages": [{"role": "user", "content": "The quick brown fox"}], "max_tokens": 24}
TURNS = {
    "messages": [
        *CHAT["messages"],
        {"role": "assistant", "content": "return a + b"},
        {"role": "user", "content": "and subtract?"},
    ],
    "max_tokens": 24,
}
TEXT = {"prompt": "import numpy as np\nx = np.arange(10)", "max_tokens": 24}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-vocab") / "ranked.txt"
    path.write_text("\n".join(str(i) for i in range(320)))
    return path


def start(args: list[str], log) -> tuple[subprocess.Popen, str]:
    """Start `mlx-vocabtrim serve ARGS --port 0`; (process, URL) once it prints where it listens."""
    command = [sys.executable, "-m", "mlx_vocabtrim", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            pytest.fail("server exited: " + log.read_text()[-2000:])
        time.sleep(0.2)
    proc.kill()
    pytest.fail("server did not start: " + log.read_text()[-2000:])


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """The module server's output: --verbose writes a line per request."""
    return tmp_path_factory.mktemp("serve-log") / "server.log"


@pytest.fixture(scope="module")
def server(model_dirs, vocab_file, log):
    """A server with a trimmed drafter, small limits and 16-token prefill passes (so short prompts reuse)."""
    proc, url = start(
        [
            "--model",
            str(model_dirs["target"]),
            "--draft-model",
            str(model_dirs["drafter"]),
            "--vocab",
            str(vocab_file),
            "--k",
            "200",
            "--max-tokens",
            "16",
            "--max-tokens-limit",
            str(LONG),
            "--max-prompt-tokens",
            "300",
            "--max-queue",
            "24",
            "--max-batch",
            "2",
            "--prefill-step-size",
            "16",
            "--verbose",
        ],
        log,
    )
    yield url
    proc.terminate()
    assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]  # a graceful stop


@pytest.fixture(scope="module")
def target(model_dirs):
    """The expected text of a request body: the target decoding alone, greedy."""
    model, tokenizer = mlx_lm_load(str(model_dirs["target"]))

    def expected(body: dict) -> str:
        prompt = body.get("prompt") or tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
        bias = {int(i): v for i, v in body.get("logit_bias", {}).items()} or None
        return generate(model, tokenizer, prompt, None, max_tokens=body["max_tokens"], logit_bias=bias)

    expected.tokenizer = tokenizer
    return expected


def post(url: str, path: str, body: dict | None = None, raw: bytes | None = None, timeout: float = 120):
    """(status, parsed JSON or text, headers) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text, headers = response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), headers
    except json.JSONDecodeError:
        return status, text, headers


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as response:
        return json.loads(response.read())


def content(answer: dict) -> str:
    choice = answer["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def stream(url: str, path: str, body: dict) -> list[dict]:
    """The events of a streamed request, checked to end with [DONE]."""
    status, text, headers = post(url, path, {**body, "stream": True})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream"), text
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def streamed_text(events: list[dict]) -> str:
    pieces = [c.get("delta", {}).get("content") or c.get("text") or "" for e in events for c in e["choices"]]
    return "".join(pieces)


def wait_for(check, seconds: float = 20) -> None:
    deadline = time.time() + seconds
    while not check():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def log_line(log, job_id: str) -> str:
    """The server's --verbose line about a request, once it is written."""
    wait_for(lambda: f"{job_id}:" in log.read_text())
    return next(line for line in log.read_text().splitlines() if line.startswith(f"{job_id}:"))


def error_of(answer: dict) -> dict:
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    return answer["error"]


# ---- finding 2: greedy output is the target's, first time and with the cache reused ----------


def test_repeated_and_interleaved_greedy_requests_equal_the_target_alone(server, target):
    sequence = [CHAT, CHAT, FOX, CHAT, TURNS, FOX, TURNS, CHAT, TEXT, TEXT, TURNS]
    usage = []
    for body in sequence:
        path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        status, answer, _ = post(server, path, body)
        assert status == 200, answer
        assert content(answer) == target(body), body
        usage.append((answer["usage"]["prompt_tokens"], answer["usage"]["prompt_tokens_details"]["cached_tokens"]))
    for repeat in (1, 9):  # the same request again: every whole 16-token prefill pass reused
        prompt, cached = usage[repeat]
        assert cached == (prompt - 1) // 16 * 16 > 0
    assert usage[4][1] > 0 and usage[2][1] == 0  # TURNS extends CHAT's prompt; FOX shares too little


def test_twenty_concurrent_requests_all_equal_the_target_alone(server, target):
    bodies = [dict(b, max_tokens=8) for b in (CHAT, FOX, TURNS, TEXT)] * 5
    answers = [None] * len(bodies)

    def ask(i: int) -> None:
        path = "/v1/completions" if "prompt" in bodies[i] else "/v1/chat/completions"
        answers[i] = post(server, path, bodies[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for body, (status, answer, _) in zip(bodies, answers, strict=True):
        assert status == 200, answer
        assert content(answer) == target(body)


def test_a_reused_cache_is_bitwise_a_fresh_run(model_dirs, vocab_file):
    """The reuse rule itself: after a request, a second one sharing a prefix leaves both caches holding
    exactly (bitwise) what a fresh engine computes for it, and returns the same tokens."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    rng = random.Random(0)
    first = [rng.randrange(3, 300) for _ in range(70)]
    second = first[:50] + [rng.randrange(3, 300) for _ in range(30)]

    def run(engine: Engine, prompt: list[int], max_tokens: int = 12) -> tuple[str, dict]:
        pieces = []
        result = engine.run(Job(prompt, max_tokens, lambda kind, value: pieces.append(value), logit_bias={2: -100}))
        return "".join(pieces), result

    reusing, fresh = Engine(setup, prefill_step=16), Engine(setup, prefill_step=16)
    run(reusing, first, 300)  # grows the cache buffers past mlx-lm's 256-token step: reused entries are strided
    text, result = run(reusing, second)
    assert result["cached_tokens"] == 48  # 50 shared tokens: three whole passes
    fresh_text, fresh_result = run(fresh, second)
    assert (text, result["completion_tokens"]) == (fresh_text, fresh_result["completion_tokens"])
    assert len(reusing.cache) == len(fresh.cache) == 4  # two target layers, two drafter layers
    for a, b in zip(reusing.cache, fresh.cache, strict=True):
        assert a.offset == b.offset == 64 and a.keys.shape[2] > b.keys.shape[2]  # whole passes: 79 // 16 * 16
        assert mx.array_equal(a.keys[..., :64, :], b.keys[..., :64, :]).item()
        assert mx.array_equal(a.values[..., :64, :], b.values[..., :64, :]).item()


# ---- finding 1: nothing in a request loads or names another model -----------------------------


def test_fields_naming_models_get_4xx_that_reveal_nothing(server, model_dirs, tmp_path):
    cache = Path(os.environ["MLX_VOCABTRIM_CACHE"])  # where a GGUF would be converted
    before = sorted(cache.rglob("*"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    places = [str(model_dirs["drafter"]), str(tmp_path / "missing"), str(gguf), "mlx-community/Qwen2.5-0.5B"]
    for name in ("draft_model", "adapters", "adapter_path", "model_path"):
        messages = set()
        for place in places:
            status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, name: place})
            assert status == 400
            messages.add(error_of(answer)["message"])
        assert messages == {f"{name} is not accepted: this server's models are fixed at start-up (see /v1/models)"}
    for place in places:
        status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "model": place})
        assert status == 404
        assert error_of(answer) == {
            "message": f"model {place!r} is not served: see /v1/models",
            "param": "model",
            "type": "invalid_request_error",
            "code": "model_not_found",
        }
    assert sorted(cache.rglob("*")) == before


def test_models_lists_the_served_model_once_and_answers_to_it(server, model_dirs):
    models = get(server, "/v1/models")
    assert [m["id"] for m in models["data"]] == [str(model_dirs["target"])]
    for name in (str(model_dirs["target"]), "default_model"):
        status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "model": name})
        assert status == 200 and answer["model"] == str(model_dirs["target"])


def test_browsers_may_call_it_from_local_pages_only(server):
    """CORS: a chat front-end served from this machine may call the server; other web pages may not,
    not even by pointing their own domain at 127.0.0.1 (the Host header is checked)."""

    def preflight(origin: str) -> str | None:
        request = urllib.request.Request(
            server + "/v1/chat/completions",
            method="OPTIONS",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.headers.get("access-control-allow-origin")

    request = urllib.request.Request(server + "/health", headers={"Host": "attacker.example:8080"})
    try:
        urllib.request.urlopen(request, timeout=30)
        raise AssertionError("a request for another host name was answered")
    except urllib.error.HTTPError as e:
        assert e.code == 400, "DNS rebinding: only loopback host names are served on loopback"
    assert preflight("http://localhost:3000") == "http://localhost:3000"
    assert preflight("http://127.0.0.1:8081") == "http://127.0.0.1:8081"
    assert preflight("https://example.com") is None


# ---- finding 3: logit_bias ids are checked, and the bias is applied losslessly ------------------


def test_logit_bias_outside_the_vocabulary_is_a_400_and_the_server_lives(server, target):
    for bias in ({"1000000000": 5}, {"9" * 5000: 1}, {"320": 1}, {"-1": 1}, {"abc": 1}, {"5": 101}, {"5": "x"}):
        status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "logit_bias": bias})
        assert status == 400 and error_of(answer)["param"].startswith("logit_bias"), answer
    assert get(server, "/health")["status"] == "ok"
    body = {**CHAT, "logit_bias": {"100": 8, EOS: -100}}
    status, answer, _ = post(server, "/v1/chat/completions", body)
    assert status == 200 and content(answer) == target(body)


# ---- finding 4: limits answer at once, before any generation -----------------------------------


def test_limits_answer_fast_and_a_normal_request_still_succeeds(server, target):
    tic = time.time()
    status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 1_000_000_000})
    assert status == 400 and f"limit of {LONG} (--max-tokens-limit)" in error_of(answer)["message"]
    status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "max_completion_tokens": LONG + 1})
    assert status == 400 and error_of(answer)["param"] == "max_completion_tokens"
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "a " * 400}]}
    status, answer, _ = post(server, "/v1/chat/completions", long_chat)
    assert status == 400 and "(--max-prompt-tokens)" in error_of(answer)["message"]
    huge = json.dumps({"prompt": "a " * 500_000, "max_tokens": 8}).encode()  # a million tokens, under 1 MiB
    assert len(huge) < 1 << 20
    status, answer, _ = post(server, "/v1/completions", raw=huge)
    assert status == 400 and "limit of 300" in error_of(answer)["message"]
    status, answer, _ = post(server, "/v1/completions", raw=b'{"prompt": "' + b"a " * (1 << 20) + b'"}')
    assert status == 413 and error_of(answer)["code"] == "request_too_large"
    assert time.time() - tic < 30
    status, answer, _ = post(server, "/v1/chat/completions", CHAT)
    assert status == 200 and content(answer) == target(CHAT)


# ---- finding 6 and the rest of validation: 4xx JSON, never a dropped connection ----------------

BAD = [
    (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    (b"{not json", 400, "not valid JSON"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "NaN is not a JSON number"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    (b'{"prompt": "x\\ud800"}', 400, "unpaired surrogate"),
]
BAD_FIELDS = [
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": 1.5}, "seed"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": None}, "prompt"),
    ({"n": 3}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"stop": ""}, "stop"),
    ({"stop": ["a", ""]}, "stop"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"model": 5}, "model"),
    ({"logprobs": 2}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"best_of": 2}, "best_of"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"repetition_penalty": 1.1}, "repetition_penalty"),
    ({"top_k": 5}, "top_k"),
]
BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
]


def test_bad_requests_get_4xx_json_errors_and_the_server_keeps_running(server):
    for raw, status, words in BAD:
        got, answer, _ = post(server, "/v1/completions", raw=raw)
        assert got == status and words in error_of(answer)["message"], (raw[:40], answer)
    for fields, param in BAD_FIELDS:
        got, answer, _ = post(server, "/v1/completions", {"prompt": "x", **fields})
        assert got == 400 and error_of(answer)["param"] == param, (fields, answer)
    for fields, param in BAD_CHAT:
        got, answer, _ = post(server, "/v1/chat/completions", {**CHAT, **fields})
        assert got == 400 and error_of(answer)["param"] == param, (fields, answer)
    status, answer, _ = post(server, "/v1/completions", {"prompt": "x", "n": 3})
    assert error_of(answer)["message"] == "n must be 1: this server returns one choice per request"
    for path, method, status in (("/v1/nothing", "GET", 404), ("/v1/completions", "GET", 405)):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(server + path, method=method), timeout=30)
        assert err.value.code == status and error_of(json.loads(err.value.read()))["code"]
    neutral = {
        "n": 1,
        "user": "me",
        "logprobs": False,
        "presence_penalty": 0,
        "stop": None,
        "seed": 2**64 - 1,
        "response_format": {"type": "text"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "def add"}, {"type": "text", "text": "(a, b):"}]}
        ],
    }
    status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, **neutral})
    assert status == 200, answer
    deep = json.dumps({**CHAT, "max_tokens": 2, "metadata": "DEEP"}).replace('"DEEP"', "[" * 900 + "]" * 900)
    status, answer, _ = post(server, "/v1/chat/completions", raw=deep.encode())  # an ignored field, nested deep
    assert status == 200, answer


# ---- the OpenAI shapes: streaming, usage, speculation, stop strings ----------------------------


def test_streaming_equals_non_streaming_with_usage_and_speculation(server, target):
    for path, body in (("/v1/chat/completions", CHAT), ("/v1/completions", TEXT)):
        status, whole, _ = post(server, path, body)
        assert status == 200
        events = stream(server, path, {**body, "stream_options": {"include_usage": True}})
        assert streamed_text(events) == content(whole) == target(body)
        prefix = "chatcmpl-" if "messages" in body else "cmpl-"
        assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith(prefix)
        assert whole["id"].startswith(prefix)
        finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finish == [whole["choices"][0]["finish_reason"]]
        usage = whole["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        tokenizer = target.tokenizer
        ids = (
            tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
            if "messages" in body
            else tokenizer.encode(body["prompt"])
        )
        assert usage["prompt_tokens"] == len(ids)
        assert usage["completion_tokens"] == body["max_tokens"] or finish == ["stop"]
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert events[-1]["choices"] == [] and [events[-1]["usage"][c] for c in counts] == [usage[c] for c in counts]
        spec = whole["speculation"]
        assert 0 <= spec["accepted_tokens"] <= spec["draft_tokens"] and spec["target_calls"] >= 1
        assert spec["tokens_per_target_call"] == round(usage["completion_tokens"] / spec["target_calls"], 3)
        assert "speculation" in events[-2]
        if path == "/v1/chat/completions":
            assert whole["object"] == "chat.completion" and events[0]["object"] == "chat.completion.chunk"
            assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert whole["choices"][0]["message"]["role"] == "assistant"
        else:
            assert whole["object"] == events[0]["object"] == "text_completion"


def test_stop_strings_end_the_output_before_them(server, target):
    text = target(CHAT)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    expected = text[: text.index(stop)]
    for body in ({**CHAT, "stop": stop}, {**CHAT, "stop": ["\x00never", stop]}):
        status, answer, _ = post(server, "/v1/chat/completions", body)
        assert (content(answer), answer["choices"][0]["finish_reason"]) == (expected, "stop")
        assert streamed_text(stream(server, "/v1/chat/completions", body)) == expected
    held = {**CHAT, "stop": [text[i : i + 6] + "\x00" for i in (0, 5, 10, 15)]}  # long prefixes held back, then sent
    assert streamed_text(stream(server, "/v1/chat/completions", held)) == text


def test_stop_helpers():
    assert stop_index("abcabc", ["ca", "bc"], 0) == 1 and stop_index("abcabc", ["ca"], 3) == -1
    assert held_back("hello wor", ["world", "x"]) == 3 and held_back("hello", ["xyz"]) == 0
    assert held_back("aa", ["aab"]) == 2


def test_sampling_with_a_seed_repeats(server):
    body = {**CHAT, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, second = (content(post(server, "/v1/chat/completions", body)[1]) for _ in range(2))
    assert first == second


# ---- fair service: FIFO, /health, cancellation ---------------------------------------------


def open_request(url: str, path: str, body: dict) -> http.client.HTTPConnection:
    """Send a request without reading its answer."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn


def long_body(**extra) -> dict:
    return {**CHAT, "max_tokens": LONG, "logit_bias": {EOS: -100}, **extra}


def test_requests_join_the_batch_and_health_shows_it(server, log):
    """A long request decodes speculatively alone; two short ones join it (the batch, no speculation), finish
    first, and the long one goes on speculatively: /health shows the batch as it grows and shrinks."""
    first = open_request(server, "/v1/chat/completions", long_body(stream=True))
    response = first.getresponse()
    first_id = json.loads(response.readline().decode().removeprefix("data: "))["id"]
    health = get(server, "/health")
    assert (health["batch"], health["speculating"], health["queued"]) == (1, True, 0)
    later = [open_request(server, "/v1/chat/completions", {**FOX, "max_tokens": 60}) for _ in range(2)]
    wait_for(lambda: get(server, "/health")["batch"] == 2)  # the batch of 2 is full: the third waits
    wait_for(lambda: get(server, "/health")["queued"] == 1)
    ids = [json.loads(conn.getresponse().read())["id"] for conn in later]
    wait_for(lambda: get(server, "/health")["batch"] == 1)
    assert get(server, "/health")["speculating"] is True
    response.read()
    for conn in [first, *later]:
        conn.close()
    text = log.read_text()
    assert all(text.index(f"{i}:") < text.index(f"{first_id}:") for i in ids), "the short ones finished first"
    assert all(" 1.0 per target call" in log_line(log, i) for i in ids), "decoded in the batch: no drafts"
    assert " 1.0 per target call" not in log_line(log, first_id), "speculative alone"
    health = get(server, "/health")
    assert (health["busy"], health["batch"], health["queued"]) == (False, 0, 0)


def test_eight_mixed_concurrent_requests_each_return_what_they_return_alone(model_dirs, vocab_file, target, tmp_path):
    """Greedy and seeded sampled requests of different lengths, with stop strings, a long prompt, one
    joining while the others decode and one cancelled midway: each reply equals the one it gets alone."""
    args = ["--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"]), "--vocab"]
    args += [str(vocab_file), "--k", "200", "--max-batch", "8", "--max-tokens-limit", str(LONG), "--verbose"]
    proc, url = start(args, tmp_path / "batch.log")
    long_prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)
    bodies = [
        {**CHAT, "max_tokens": 200, "logit_bias": {EOS: -100}},  # starts alone, then joins the others' batch
        {**FOX, "max_tokens": 12},
        {**CHAT, "max_tokens": 20, "temperature": 0.8, "seed": 3},
        {**FOX, "max_tokens": 25, "temperature": 1.0, "top_p": 0.9, "seed": 11},
        {**CHAT, "max_tokens": 40, "stop": ["a"]},
        {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 16},
        {"prompt": "def add(a, b):", "max_tokens": 18, "stop": [")", "b"]},
    ]
    try:
        alone = [post(url, "/v1/completions" if "prompt" in b else "/v1/chat/completions", b)[1] for b in bodies]
        first = open_request(url, "/v1/chat/completions", {**bodies[0], "stream": True})
        first_reply = first.getresponse()
        first_reply.readline()  # decoding alone, speculatively
        cancelled = open_request(url, "/v1/chat/completions", long_body(stream=True))
        cancelled.getresponse().readline()
        results: list = [None] * len(bodies)

        def send(i: int) -> None:
            time.sleep(0.3 if i == len(bodies) - 1 else 0)  # the last joins while the others decode
            body = bodies[i]
            results[i] = post(url, "/v1/completions" if "prompt" in body else "/v1/chat/completions", body)[1]

        threads = [threading.Thread(target=send, args=(i,)) for i in range(1, len(bodies))]
        for t in threads:
            t.start()
        time.sleep(0.2)
        cancelled.close()  # midway, with the others in the batch
        for t in threads:
            t.join()
        events = [json.loads(line[6:]) for line in first_reply.read().decode().splitlines() if line[6:7] == "{"]
        first.close()
        text = "".join((e["choices"][0]["delta"].get("content") or "") for e in events if e.get("choices"))
        results[0] = {
            "choices": [{"message": {"content": text}, "finish_reason": events[-1]["choices"][0]["finish_reason"]}]
        }
        results[0]["speculation"] = events[-1]["speculation"]
        for body, one, together in zip(bodies, alone, results, strict=True):
            assert content(together) == content(one), body
            assert together["choices"][0]["finish_reason"] == one["choices"][0]["finish_reason"]
        for body, one in zip(bodies, alone, strict=True):
            if not body.get("temperature") and "stop" not in body:
                assert content(one) == target(body), "greedy replies are the target's own"
        assert alone[0]["speculation"]["draft_tokens"] > 0, "alone: speculative"
        moved = results[0]["speculation"]
        assert 0 < moved["draft_tokens"] and moved["target_calls"] > alone[0]["speculation"]["target_calls"]
        wait_for(lambda: not get(url, "/health")["busy"])
        assert get(url, "/health")["moves"] >= 2, "requests moved into the batch and out of it"
        assert re.search(r"cancelled$", (tmp_path / "batch.log").read_text(), re.M)
    finally:
        proc.terminate()
        proc.wait()


def test_a_client_that_disconnects_cancels_its_request(server, log, target):
    for extra in ({"stream": True}, {}):
        conn = open_request(server, "/v1/chat/completions", long_body(**extra))
        if extra:
            response = conn.getresponse()
            job_id = json.loads(response.readline().decode().removeprefix("data: "))["id"]
            response.close()
        else:
            wait_for(lambda: get(server, "/health")["busy"])
            before = log.read_text()
        conn.close()
        wait_for(lambda: not get(server, "/health")["busy"], 10)
        if not extra:
            job_id = re.findall(r"^(chatcmpl-\w+): .*cancelled$", log.read_text(), re.M)[-1]
            assert f"{job_id}:" not in before
        line = log_line(log, job_id)
        assert line.endswith("cancelled") and int(re.search(r"(\d+) tokens in", line).group(1)) < LONG
    # a request cancelled while it waits (the batch of 2 is full) leaves the queue
    running = [open_request(server, "/v1/chat/completions", long_body(stream=True)) for _ in range(2)]
    replies = [conn.getresponse() for conn in running]
    for reply in replies:
        reply.readline()
    waiting = open_request(server, "/v1/chat/completions", CHAT)
    wait_for(lambda: get(server, "/health")["queued"] == 1)
    waiting.close()
    wait_for(lambda: get(server, "/health")["queued"] == 0)
    for reply, conn in zip(replies, running, strict=True):
        reply.close()
        conn.close()
    wait_for(lambda: not get(server, "/health")["busy"], 10)
    status, answer, _ = post(server, "/v1/chat/completions", CHAT)  # the cache is sound after cancellations
    assert status == 200 and content(answer) == target(CHAT)


def test_target_alone_and_a_full_queue(model_dirs, target, tmp_path):
    proc, url = start(
        ["--model", str(model_dirs["target"]), "--max-queue", "0", "--max-batch", "1", "--max-tokens-limit", str(LONG)],
        tmp_path / "alone.log",
    )
    try:
        first = open_request(url, "/v1/chat/completions", long_body(stream=True))
        response = first.getresponse()
        response.readline()
        status, answer, headers = post(url, "/v1/chat/completions", CHAT)
        assert status == 503 and error_of(answer)["code"] == "server_busy" and headers["Retry-After"] == "1"
        response.read()
        first.close()
        status, answer, _ = post(url, "/v1/chat/completions", CHAT)
        assert status == 200 and content(answer) == target(CHAT)
        assert answer["speculation"]["draft_tokens"] == 0
        running = open_request(url, "/v1/chat/completions", long_body(stream=True))
        reply = running.getresponse()
        reply.readline()
        proc.send_signal(signal.SIGINT)  # a stop while generating: the client is answered, the process ends cleanly
        events = [line for line in reply.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "the server is shutting down" in events[-2]
        assert proc.wait(timeout=30) == 0
        assert "Traceback" not in (tmp_path / "alone.log").read_text()
    finally:
        proc.kill()
        proc.wait(timeout=30)


# ---- finding 5: bad start-ups end in one line, before anything listens -------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_start_ups_exit_with_one_line_and_nothing_listening(model_dirs, vocab_file, tmp_path, monkeypatch):
    import uvicorn

    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("a bad start-up began serving"))
    target, drafter = str(model_dirs["target"]), str(model_dirs["drafter"])
    foreign = tmp_path / "foreign.json"
    save_vocab(foreign, [1] * 320, {"tokenizer_fingerprint": "sha256:0000"})
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"format": "mlx-vocabtrim-vocab/1", "counts": [1, 2')
    other_tokenizer = tmp_path / "tok"
    build_tokenizer(other_tokenizer, specials=["<|im_end|>", "<|im_start|>", "<|endoftext|>"])
    other = save_model(make_model("qwen2", seed=3), model_config("qwen2"), other_tokenizer, tmp_path / "other")
    pair = ["--model", target, "--draft-model", drafter]
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [
        ([*pair, "--vocab", str(vocab_file), "--k", "0"], "--k 0 is out of range"),
        ([*pair, "--vocab", str(foreign)], "was made for another tokenizer"),
        ([*pair, "--vocab", str(corrupt)], "is corrupt"),
        (["--model", target, "--draft-model", str(other)], "different tokenizers"),
        (["--model", "/nope"], "not found"),
        (["--model", drafter, "--max-tokens", "600", "--max-tokens-limit", "500"], "--max-tokens 600 is over"),
        (["--model", target, "--max-prompt-tokens", "1024"], "model's context of 1024 tokens"),
        (["--model", target, "--port", str(busy.getsockname()[1])], "is in use: pass --port"),
        (["--model", target, "--host", "no-such-host.invalid"], "is not an address of this machine"),
    ]
    try:
        for args, words in cases:
            port = [] if "--port" in args else ["--port", str(free_port())]
            result = CliRunner().invoke(cli, ["serve", *args, *port])
            lines = result.output.strip().splitlines()
            assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (args, result.output)
            assert words in lines[0], (args, lines[0])
            if port:
                with pytest.raises(ConnectionRefusedError):
                    socket.create_connection(("127.0.0.1", int(port[1])), timeout=5).close()
    finally:
        busy.close()


def test_a_busy_port_fails_fast_in_a_real_process(model_dirs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        tic = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "mlx_vocabtrim", "serve", "--model", str(model_dirs["target"]), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 1 and done.stdout == "" and time.time() - tic < 60
    assert done.stderr.strip() == (
        f"Error: port {port} on 127.0.0.1 is in use: pass --port with a free port "
        "(0 picks one), or stop what is using it"
    )


# ---- bench-serve -------------------------------------------------------------------------------


def test_bench_serve_compares_the_servers_end_to_end(model_dirs, vocab_file, tmp_path):
    questions = tmp_path / "q.jsonl"
    turns = [("code", "def add(a, b):"), ("text", "The quick brown fox"), ("code", "import numpy as np")]
    questions.write_text(
        "\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in enumerate(turns))
    )
    out = tmp_path / "out"
    args = ["bench-serve", "--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"])]
    args += ["--vocab", str(vocab_file), "--k", "200", "--questions", str(questions), "--per-category", "2"]
    args += ["--max-tokens", "6", "--clients", "1,3", "--mlx-lm-num-draft-tokens", "2", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench-serve.json").read_text())
    assert list(report["summary"]) == ["mlx-vocabtrim serve", "mlx_lm.server", "mlx_lm.server --draft-model"]
    assert report["config"]["commands"]["mlx_lm.server --draft-model"][-2:] == ["--num-draft-tokens", "2"]
    for figures in report["summary"].values():
        assert set(figures) == {"1", "3"} and figures["3"]["requests"] == 3
        assert figures["1"]["aggregate_tokens_per_s"] > 0 and figures["3"]["p95_latency_s"] > 0
    ours = report["summary"]["mlx-vocabtrim serve"]
    assert ours["1"]["unlike_target"] == 0 and ours["3"]["unlike_target"] == 0
    assert len(report["requests"]) == 3 * (1 + 3) and all(r["completion_tokens"] >= 1 for r in report["requests"])
    table = (out / "bench-serve.md").read_text()
    assert "| 3 | " in table and "ours over the better mlx_lm.server" in table
    assert table in result.output
    refused = CliRunner().invoke(cli, [*args[:-2], "--clients", "1,9", "--out", str(tmp_path / "o2")])
    assert refused.exit_code == 1 and "9 clients need as many questions" in refused.output


@pytest.mark.parametrize("arch", ["gemma3_text", "qwen3_5"])
def test_sliding_window_and_hybrid_models_serve_the_targets_output(arch, tokenizer_dir, vocab_file, tmp_path):
    """A sliding-window target (windows of 8 tokens, crossed by every reply) and a hybrid one, each with
    a trimmed drafter of its family: every reply equals the target decoding alone, and no KV entries are
    reused across requests (only plain KVCache reuse is bitwise exact)."""
    from archs import NOISE, arch_config, make_arch, noisy

    model = make_arch(arch, seed=1)
    drafter = noisy(model, arch, NOISE.get(arch, 0.005), seed=2)
    pair = (("target", model), ("drafter", drafter))
    dirs = {name: save_model(m, arch_config(arch), tokenizer_dir, tmp_path / name) for name, m in pair}
    loaded, tok = mlx_lm_load(str(dirs["target"]))
    log = tmp_path / "server.log"
    flags = ["--vocab", str(vocab_file), "--k", "200", "--num-draft-tokens", "4"]
    proc, url = start(["--model", str(dirs["target"]), "--draft-model", str(dirs["drafter"]), *flags], log)
    try:
        for body in (CHAT, FOX, CHAT, TEXT, TURNS, TEXT):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            status, answer, _ = post(url, path, body)
            assert status == 200, answer
            prompt = body.get("prompt") or tok.apply_chat_template(body["messages"], add_generation_prompt=True)
            assert content(answer) == generate(loaded, tok, prompt, None, max_tokens=body["max_tokens"]), body
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
            assert answer["speculation"]["draft_tokens"] > answer["speculation"]["accepted_tokens"] > 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
