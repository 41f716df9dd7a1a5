"""`mlx-vocabtrim serve` over real HTTP on loopback ports with tiny models.

Each finding of issue 11 is a test here (fields naming models, losslessness with the KV cache
reused, the logit_bias crash, starvation, bad start-ups, dropped connections), plus the OpenAI
shapes, streaming, stop strings, the queue, cancellation and `bench-serve`.
"""

import http.client
import itertools
import json
import os
import random
import re
import resource
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
from conftest import CHAT_TEMPLATE, VOCAB, build_tokenizer, make_model, model_config, save_model
from mlx_lm import load as mlx_lm_load
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mlx_vocabtrim import VocabTrimError, generate, load, save_vocab
from mlx_vocabtrim.cli import cli
from mlx_vocabtrim.serve import (
    ChatRequest,
    CompletionRequest,
    Engine,
    Job,
    Message,
    RequestError,
    held_back,
    message_starts,
    pass_ends,
    prompt_cuts,
    prompt_ids,
    stop_index,
)

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
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve-vocab") / "ranked.txt"
    path.write_text("\n".join(str(i) for i in range(320)))
    return path


def start(args: list[str], log, **popen) -> tuple[subprocess.Popen, str]:
    """Start `mlx-vocabtrim serve ARGS --port 0`; (process, URL) once it prints where it listens."""
    command = [sys.executable, "-m", "mlx_vocabtrim", "serve", *args, "--port", "0"]
    proc = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, **popen)
    deadline = time.time() + 120
    while time.time() < deadline:
        found = re.search(r"at (http://\S+?)/v1 ", log.read_text())
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

    expected.tokenizer, expected.model = tokenizer, model
    return expected


def post(url: str, path: str, body: dict | None = None, raw: bytes | None = None, timeout: float = 120, headers=None):
    """(status, parsed JSON or text, headers) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    request = urllib.request.Request(url + path, data=data, headers=headers)
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
    tokenizer = target.tokenizer
    chat, fox = (tokenizer.apply_chat_template(b["messages"], add_generation_prompt=True) for b in (CHAT, FOX))
    head = next(i for i, (a, b) in enumerate(zip(chat, fox, strict=False)) if a != b)  # "<|im_start|>user\n"
    prompt, cached = usage[1]  # CHAT again: its passes end at its message's start, then every 16 tokens
    assert cached == head + (prompt - 1 - head) // 16 * 16 > head
    prompt, cached = usage[9]  # TEXT again (no messages): every whole 16-token pass
    assert cached == (prompt - 1) // 16 * 16 > 0
    assert usage[2][1] == head, "FOX after CHAT: distinct questions share the template's head"
    assert usage[4][1] > head, "TURNS extends CHAT's conversation: CHAT's passes reused"


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
        result = engine.run(Job(prompt, max_tokens, lambda kind, value: pieces.append(value[0]), logit_bias={2: -100}))
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


def test_passes_end_at_message_starts_and_a_reuse_keeps_only_passes_ending_alike(model_dirs, vocab_file):
    """Prompts cut at their messages' starts: a second prompt sharing the first 60 tokens, with a cut of
    its own at 45, reuses the passes that end alike in both (at 16, 23 and 39; not the first prompt's
    pass ending at 55, which shares its tokens but not its shape) and leaves both caches bitwise what a
    fresh engine computes for it, with the same tokens."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    rng = random.Random(4)
    first = [rng.randrange(3, 300) for _ in range(70)]
    second = first[:60] + [rng.randrange(3, 300) for _ in range(20)]
    assert pass_ends(69, [23], 16) == [16, 23, 39, 55] and pass_ends(79, [23, 45], 16) == [16, 23, 39, 45, 61, 77]
    assert pass_ends(40, [0, 16, 40, 99], 16) == [16, 32] and pass_ends(15, [], 16) == []

    def run(engine: Engine, prompt: list[int], cuts: list[int]) -> tuple[str, dict]:
        pieces = []
        job = Job(prompt, 12, lambda kind, value: pieces.append(value[0]), logit_bias={2: -100}, cuts=cuts)
        return "".join(pieces), engine.run(job)

    reusing, fresh = Engine(setup, prefill_step=16), Engine(setup, prefill_step=16)
    run(reusing, first, [23])
    assert reusing.cached_ends == [16, 23, 39, 55] and reusing.cached == first[:55]
    text, result = run(reusing, second, [23, 45])
    assert result["cached_tokens"] == 39
    fresh_text, fresh_result = run(fresh, second, [23, 45])
    assert (text, result["completion_tokens"]) == (fresh_text, fresh_result["completion_tokens"])
    for a, b in zip(reusing.cache, fresh.cache, strict=True):
        assert a.offset == b.offset == 77
        assert mx.array_equal(a.keys[..., :77, :], b.keys[..., :77, :]).item()
        assert mx.array_equal(a.values[..., :77, :], b.values[..., :77, :]).item()
    # cancelled during its prefill: the passes it had are kept, with their ends, for the next prompt
    cancelled = Engine(setup, prefill_step=16)
    cancelled.run(Job(first, 12, lambda kind, value: None, cancelled=CancelledAfter(4), cuts=[23]))
    assert cancelled.cached_ends and cancelled.cached_ends == [16, 23, 39, 55][: len(cancelled.cached_ends)] != [16]
    kept = cancelled.cached_ends[-1]
    assert cancelled.cached == first[:kept]
    text, result = run(cancelled, second, [23, 45])
    assert result["cached_tokens"] == min(kept, 39) and text == fresh_text


def test_message_starts_are_where_each_message_content_begins(target):
    """Each message's start is where its content begins in the prompt, the first one after the template's
    head, a default system prompt included; a template refusing a conversation cut short gives no start
    there, and text prompts have none."""
    tokenizer = target.tokenizer
    messages = TURNS["messages"]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    starts = []
    for i, m in enumerate(messages):  # the template's text before each content, tokenized alone
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False) if i else ""
        starts.append(len(tokenizer.encode(before + f"<|im_start|>{m['role']}\n", add_special_tokens=False)))
    assert message_starts(tokenizer, messages, None, ids) == starts and len(set(starts)) == 3
    chat = ChatRequest.model_validate({"model": "m", **TURNS})
    assert prompt_ids(tokenizer, chat) == ids and prompt_cuts(tokenizer, chat, ids) == starts
    text = CompletionRequest.model_validate({"model": "m", **TEXT})
    assert prompt_cuts(tokenizer, text, prompt_ids(tokenizer, text)) == []

    system = "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe helpful.<|im_end|>\n{% endif %}"

    class DefaultSystem:  # the test tokenizer under a template that adds a system prompt, as Qwen2.5's does
        def apply_chat_template(self, messages, **kwargs):
            if messages[-1]["role"] == "assistant" and not kwargs.get("add_generation_prompt"):
                raise ValueError("a conversation must not end with the assistant")
            return tokenizer.apply_chat_template(messages, chat_template=system + CHAT_TEMPLATE, **kwargs)

    ids = DefaultSystem().apply_chat_template(messages, add_generation_prompt=True)
    head = len(tokenizer.encode("<|im_start|>system\nBe helpful.<|im_end|>\n<|im_start|>user\n"))
    assert message_starts(DefaultSystem(), messages, None, ids) == [head, starts[2] + head - starts[0]]


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


def head(url: str, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(urllib.request.Request(url + path, method="HEAD"), timeout=30) as response:
        return response.status, response.read()


def test_models_shows_an_id_not_a_path_retrieves_it_and_answers_to_it(server, model_dirs):
    """openai's client.models.retrieve and HEAD work, and no local path is shown (the id is the
    directory's name); requests may name the model by its id, mlx-lm's alias or --model as given."""
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as response:
        listing = response.read().decode()
    assert [m["id"] for m in json.loads(listing)["data"]] == ["target"]
    assert str(model_dirs["target"].parent) not in listing
    for name in ("target", "default_model"):
        assert get(server, f"/v1/models/{name}")["id"] == "target"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server + "/v1/models/other/model", timeout=30)
    assert err.value.code == 404 and error_of(json.loads(err.value.read()))["code"] == "model_not_found"
    for path in ("/health", "/v1/models", "/v1/models/target"):
        assert head(server, path) == (200, b"")
    for name in ("target", "default_model", str(model_dirs["target"])):
        status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 2, "model": name})
        assert status == 200 and answer["model"] == "target"


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
        assert error_of(json.loads(e.read()))["code"] == "invalid_host"
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
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
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
    ({"logprobs": 1}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "g"}}, "tools": [TOOL]}, "tool_choice"),
    (
        {
            "messages": [
                {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
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
        for timings in (whole["timings"], events[-2]["timings"]):  # from arrival: first token, then the end
            assert 0 < timings["first_token_seconds"] <= timings["seconds"]
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


def test_sampling_with_a_seed_repeats(server, target):
    """A seed repeats its reply; another seed, or greedy decoding, gives another (temperature and seed are used)."""
    body = {**CHAT, "temperature": 0.9, "top_p": 0.95, "seed": 7}
    first, second = (content(post(server, "/v1/chat/completions", body)[1]) for _ in range(2))
    other = content(post(server, "/v1/chat/completions", {**body, "seed": 8})[1])
    assert first == second and first != other and first != target(CHAT)


def test_an_unseeded_request_after_a_seeded_one_is_not_predictable(server):
    """A seed is the request's own: it does not set what the next, unseeded request draws."""
    sampled = {**FOX, "temperature": 1.5, "max_tokens": 12}
    seeded = [content(post(server, "/v1/chat/completions", {**sampled, "seed": seed})[1]) for seed in (7, 8)]
    assert seeded[0] != seeded[1]  # the sampling varies
    after = []
    for _ in range(3):
        assert content(post(server, "/v1/chat/completions", {**sampled, "seed": 7})[1]) == seeded[0]
        after.append(content(post(server, "/v1/chat/completions", sampled)[1]))
    assert len(set(after)) == 3 and seeded[0] not in after


# ---- clients: logprobs, tools, senders ------------------------------------------------------

BYTE_CHAR = bytes_to_unicode()  # the byte-level BPE alphabet of the test tokenizer


def ids_of(tokenizer, entries: list[dict]) -> list[int]:
    """The token ids of chat logprobs entries, read back from their bytes."""
    vocab = tokenizer.get_vocab()
    return [vocab["".join(BYTE_CHAR[b] for b in e["bytes"])] for e in entries]


def forward_logprobs(target, prompt: list[int], ids: list[int], bias: dict | None = None) -> mx.array:
    """The target's log-softmax rows at each reply token, from one plain forward pass over prompt + reply."""
    logits = target.model(mx.array([prompt + ids]))[0, len(prompt) - 1 : -1].astype(mx.float32)
    for i, value in (bias or {}).items():
        logits[:, int(i)] += value
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def detokenized(tokenizer, ids: list[int]) -> str:
    detokenizer = tokenizer.detokenizer
    for token in ids:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text


def greedy_ids(target, prompt: list[int], count: int) -> list[int]:
    """The target's own greedy reply, up to EOS."""
    from mlx_lm.generate import generate_step

    ids = [token for token, _ in itertools.islice(generate_step(mx.array(prompt), target.model), count)]
    return ids[: ids.index(int(EOS))] if int(EOS) in ids else ids


def test_logprobs_are_the_targets_own_log_softmax(server, target):
    """Each token's logprob and top_logprobs are the target's (with logit_bias, before temperature and
    top_p, as mlx_lm.server reports them), for drafted tokens too, streamed or not."""
    tokenizer, vocab = target.tokenizer, 312
    sampled = {**FOX, "temperature": 0.9, "top_p": 0.9, "seed": 3, "logit_bias": {"100": 3.0}}
    cases = [
        ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 5}),
        ("/v1/chat/completions", {**sampled, "logprobs": True, "top_logprobs": 3}),
        ("/v1/completions", {**TEXT, "logprobs": 4}),
    ]
    accepted = 0
    for path, body in cases:
        status, answer, _ = post(server, path, body)
        assert status == 200, answer
        accepted += answer["speculation"]["accepted_tokens"]
        got = answer["choices"][0]["logprobs"]
        events = stream(server, path, body)
        if "messages" in body:
            prompt = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)
            entries, top = got["content"], body["top_logprobs"]
            assert [
                e for ev in events for c in ev["choices"] for e in (c["logprobs"] or {}).get("content", [])
            ] == entries
            ids = ids_of(tokenizer, entries)
            assert detokenized(tokenizer, ids) == content(answer)
            assert "seed" in body or ids == greedy_ids(target, prompt, body["max_tokens"])
            logprobs = [e["logprob"] for e in entries]
            tops = [[t["logprob"] for t in e["top_logprobs"]] for e in entries]
            top_ids = [ids_of(tokenizer, e["top_logprobs"]) for e in entries]
        else:
            prompt, top = tokenizer.encode(body["prompt"]), body["logprobs"]
            ids = greedy_ids(target, prompt, body["max_tokens"])
            streamed = [c["logprobs"] for ev in events for c in ev["choices"] if c["logprobs"]]
            assert sum((s["token_logprobs"] for s in streamed), []) == got["token_logprobs"]
            assert sum((s["text_offset"] for s in streamed), []) == got["text_offset"]
            assert got["text_offset"] == sorted(got["text_offset"]) and got["text_offset"][0] == 0
            logprobs, tops = got["token_logprobs"], [sorted(t.values(), reverse=True) for t in got["top_logprobs"]]
            top_ids = None
        expected = forward_logprobs(target, prompt, ids, body.get("logit_bias"))
        assert (
            len(ids)
            == len(logprobs)
            == answer["usage"]["completion_tokens"] - (answer["choices"][0]["finish_reason"] == "stop")
        )
        for i, token in enumerate(ids):
            assert abs(logprobs[i] - expected[i, token].item()) < 1e-3, (body, i)
            best = mx.argsort(-expected[i, :vocab])[:top].tolist()
            assert max(abs(a - expected[i, b].item()) for a, b in zip(tops[i], best, strict=True)) < 1e-3
            if top_ids is not None:
                assert top_ids[i] == best
    assert accepted > 0  # drafted tokens were scored too


def test_tool_fields_are_accepted_and_tool_histories_reach_the_template(server, target):
    """tools and every tool_choice are taken (this tokenizer has no tool-call format: the reply is
    content), and an assistant message with content null and tool_calls, then a tool result, is a
    valid history."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    for extra in (
        {"tool_choice": "auto"},
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": "none"},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tools": [TOOL], "tool_choice": named},
    ):
        status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, **extra})
        assert status == 200 and content(answer) == target(CHAT), (extra, answer)
        assert answer["choices"][0]["finish_reason"] == "length" and "tool_calls" not in answer["choices"][0]["message"]
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [
        *CHAT["messages"],
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny"},
    ]
    status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "messages": history, "tools": [TOOL]})
    assert status == 200, answer
    rendered = [history[0], {"role": "assistant", "content": ""}, history[2]]  # this template shows content only
    assert answer["usage"]["prompt_tokens"] == len(
        target.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    )


def test_messages_reach_the_template_whole():
    """What a chat template gets of each message: null content as "" (as mlx-lm's server passes it:
    templates that join strings fail on a missing one), tool calls with their arguments parsed
    (templates write them with tojson), tool_call_id and name."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [
        {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": [{"type": "text", "text": "sun"}]},
    ]
    assert [Message.model_validate(m).for_template() for m in messages] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sun", "tool_call_id": "call_1", "name": "get_weather"},
    ]


def test_a_template_that_refuses_the_messages_is_a_400_with_its_reason(target):
    """The server builds its prompts where every command does (`chat_ids`): a template's refusal is a
    400 on `messages` with the template's first line, and tools reach the template."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]

    class Refusing:
        chat_template = "refuses system messages"

        def apply_chat_template(self, messages, tools=None, add_generation_prompt=False):
            raise ValueError("System role not supported\nat line 1")

    request = ChatRequest.model_validate({"model": "m", "messages": messages})
    with pytest.raises(RequestError) as refused:
        prompt_ids(Refusing(), request)
    assert (refused.value.status, refused.value.param) == (400, "messages")
    assert "refused the messages (System role not supported)" in refused.value.message
    assert "line 1" not in refused.value.message
    tools = ChatRequest.model_validate({"model": "m", "messages": messages, "tools": [TOOL]})
    assert prompt_ids(target.tokenizer, tools) == target.tokenizer.apply_chat_template(
        messages, tools=tools.template_tools(), add_generation_prompt=True
    )


def test_cross_site_posts_and_bodies_not_sent_as_json_are_refused(server):
    """A web page's POST (text/plain needs no CORS preflight) is refused unless its Origin is
    allowed, and a body must come as JSON (charset parameters and any case accepted)."""
    body = json.dumps({**CHAT, "max_tokens": 2}).encode()
    cases = [
        ({"Content-Type": "text/plain", "Origin": "https://evil.example"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
        ({"Origin": "http://localhost.evil.example"}, 403),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
        ({"Content-Type": ""}, 415),
        ({"Origin": "http://localhost:3000"}, 200),
        ({"Origin": "http://127.0.0.1:8081", "Content-Type": "application/json; charset=utf-8"}, 200),
        ({"Content-Type": "Application/JSON"}, 200),
    ]
    for headers, expected in cases:
        status, answer, _ = post(server, "/v1/chat/completions", raw=body, headers=headers)
        assert status == expected, (headers, answer)
        if expected != 200:
            assert error_of(answer)["code"] in ("forbidden", "unsupported_media_type")


def test_a_client_that_drops_mid_body_is_one_log_line(server, log):
    host, port = server.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"messages"'
            )
            time.sleep(0.2)
    wait_for(lambda: "disconnected while sending" in log.read_text())
    assert get(server, "/health")["status"] == "ok"
    text = log.read_text()
    assert "Traceback" not in text and text.count("disconnected while sending") == 1


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
    wait_for(lambda: get(server, "/health")["speculating"])
    health = get(server, "/health")
    assert (health["batch"], health["queued"]) == (1, 0)
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


def test_a_tiny_temperature_is_greedy(server, target):
    status, answer, _ = post(server, "/v1/chat/completions", {**CHAT, "temperature": 1e-300})
    assert status == 200 and content(answer) == target(CHAT), answer


@pytest.mark.parametrize("batch_speculation", ["off", "2-8:2"])
def test_eight_mixed_concurrent_requests_each_return_what_they_return_alone(
    model_dirs, vocab_file, target, tmp_path, batch_speculation
):
    """Greedy and seeded sampled requests of different lengths, with stop strings, a long prompt, one
    joining while the others decode and one cancelled midway: each reply equals the one it gets alone,
    with the plain batch and with speculation inside the batch (seeded ones speculating too)."""
    args = ["--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"]), "--vocab"]
    args += [str(vocab_file), "--k", "200", "--max-batch", "9", "--max-tokens-limit", str(LONG), "--verbose"]
    args += ["--batch-speculation", batch_speculation]
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
        {**FOX, "max_tokens": 90},  # outlasts the seeded ones
    ]
    try:
        alone = [post(url, "/v1/completions" if "prompt" in b else "/v1/chat/completions", b)[1] for b in bodies]
        first = open_request(url, "/v1/chat/completions", {**bodies[0], "stream": True})
        first_reply = first.getresponse()
        first_reply.readline()
        wait_for(lambda: get(url, "/health")["mode"] == "alone")  # decoding alone, speculatively
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
        assert 0 < moved["draft_tokens"]
        if batch_speculation == "off":  # one token per target call while the others ran
            assert moved["target_calls"] > alone[0]["speculation"]["target_calls"]
        wait_for(lambda: not get(url, "/health")["busy"])
        health = get(url, "/health")
        assert health["moves"] >= 2, "requests moved into the batch and out of it"
        assert (health["speculative_batch_rounds"] > 0) == (batch_speculation != "off")
        assert re.search(r"cancelled$", (tmp_path / "batch.log").read_text(), re.M)
    finally:
        proc.terminate()
        proc.wait()


def test_the_batch_holds_no_more_kv_memory_than_the_limit(model_dirs, tmp_path):
    """--max-kv-memory fits two requests of 300 tokens (prompt and max_tokens) but not three: of four sent at
    once two run and two wait, each reply is still the target's; one that alone needs more is a JSON 400."""
    from mlx_vocabtrim.serve import kv_bytes_per_token

    target_model, _ = mlx_lm_load(str(model_dirs["target"]))
    drafter_model, _ = mlx_lm_load(str(model_dirs["drafter"]))
    per_token = kv_bytes_per_token([target_model, drafter_model])
    limit = 2.5 * 300 * per_token / 1e9
    args = ["--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"])]
    args += ["--max-kv-memory", repr(limit), "--max-batch", "8"]
    proc, url = start(args, tmp_path / "kv.log")
    try:
        prompt = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 1})[1]["usage"]["prompt_tokens"]
        body = {**CHAT, "max_tokens": 300 - prompt, "logit_bias": {EOS: -100}}  # 300 tokens in all
        alone = content(post(url, "/v1/chat/completions", body)[1])
        results, peak = [None] * 4, []
        threads = [
            threading.Thread(target=lambda i=i: results.__setitem__(i, post(url, "/v1/chat/completions", body)[1]))
            for i in range(4)
        ]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            health = get(url, "/health")
            peak.append((health["batch"], health["queued"]))
            time.sleep(0.02)
        assert max(b for b, _ in peak) == 2 and max(q for _, q in peak) >= 1, peak
        assert all(content(r) == alone for r in results)
        status, error, _ = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 800})
        assert status == 400 and "--max-kv-memory" in error["error"]["message"], error
        assert get(url, "/health")["max_kv_bytes"] == int(limit * 1e9)
    finally:
        proc.terminate()
        proc.wait()


def test_a_client_that_disconnects_cancels_its_request(server, log, target):
    for extra in ({"stream": True}, {}):
        conn = open_request(server, "/v1/chat/completions", long_body(**extra))
        if extra:
            response = conn.getresponse()
            job_id = json.loads(response.readline().decode().removeprefix("data: "))["id"]
            wait_for(lambda: get(server, "/health")["busy"])  # decoding, not still queued (a loaded machine)
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


def bench_serve_args(model_dirs, vocab_file, tmp_path, turns, per_category, max_tokens, clients) -> list[str]:
    questions = tmp_path / "q.jsonl"
    questions.write_text(
        "\n".join(json.dumps({"question_id": i, "category": c, "turns": [t]}) for i, (c, t) in enumerate(turns))
    )
    args = ["bench-serve", "--model", str(model_dirs["target"]), "--draft-model", str(model_dirs["drafter"])]
    args += ["--vocab", str(vocab_file), "--k", "200", "--questions", str(questions)]
    args += ["--per-category", per_category] if per_category else []
    args += ["--max-tokens", max_tokens, "--clients", clients, "--mlx-lm-num-draft-tokens", "2"]
    return args + ["--out", str(tmp_path / "out")]


def test_bench_serve_compares_the_servers_end_to_end(model_dirs, vocab_file, tmp_path, monkeypatch):
    """Each server gets a warm-up request and each level and pass its own questions, none sent twice: a server
    that caches prompts (mlx_lm.server does) would skip the prefill of a question it has seen."""
    import mlx_vocabtrim.serve_bench as serve_bench

    code = ["def add(a, b):", "import numpy as np", "for i in range(10):"]
    text = ["The quick brown fox", "Once upon a time", "Dear Sir or Madam,"]
    turns = [("code", t) for t in code] + [("text", t) for t in text]
    args = bench_serve_args(model_dirs, vocab_file, tmp_path, turns, None, "6", "1,3")
    out = tmp_path / "out"
    real, sent = serve_bench.ask, {}

    def recording(url, prompt, max_tokens):
        sent.setdefault(url, []).append(prompt)
        return real(url, prompt, max_tokens)

    monkeypatch.setattr(serve_bench, "ask", recording)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(sent) == 3 and all(sorted(prompts) == sorted(code + text[:2]) for prompts in sent.values())
    report = json.loads((out / "bench-serve.json").read_text())
    assert report["config"]["per_category"] == 3  # the fewest giving 1 + 1 + 3 questions
    assert report["config"]["warm_up_question"] == 0 and report["config"]["level_questions"] == {
        "1": [[3]],
        "3": [[1, 4, 2]],
    }
    assert list(report["summary"]) == ["mlx-vocabtrim serve", "mlx_lm.server", "mlx_lm.server --draft-model"]
    assert report["config"]["commands"]["mlx_lm.server --draft-model"][-2:] == ["--num-draft-tokens", "2"]
    for name, figures in report["summary"].items():
        assert set(figures) == {"1", "3"} and figures["3"]["requests"] == 3
        assert figures["1"]["aggregate_tokens_per_s"] > 0 and figures["3"]["p95_latency_s"] > 0
        firsts = sorted(r["first_token_s"] for r in report["requests"] if r["clients"] == 3 and r["server"] == name)
        assert figures["3"]["p95_first_token_s"] == firsts[-1] >= figures["3"]["median_first_token_s"] == firsts[1]
    ours = report["summary"]["mlx-vocabtrim serve"]
    assert ours["1"]["unlike_target"] == 0 and ours["3"]["unlike_target"] == 0
    assert len(report["requests"]) == 3 * (1 + 3) and all(r["completion_tokens"] >= 1 for r in report["requests"])
    for name, figures in report["summary"].items():  # prompt tokens each server took from its prompt cache
        for level, n in (("1", 1), ("3", 3)):
            records = [r for r in report["requests"] if (r["server"], r["clients"]) == (name, n)]
            assert figures[level]["prompt_tokens"] == sum(r["prompt_tokens"] for r in records) > 0
            assert figures[level]["cached_prompt_tokens"] == sum(r["cached_tokens"] for r in records)
    # distinct questions still share the chat template's head, which mlx_lm.server's prompt cache keeps
    assert all(
        0 < r["cached_tokens"] < r["prompt_tokens"] for r in report["requests"] if r["server"] == "mlx_lm.server"
    )
    alone = next(r for r in report["requests"] if (r["server"], r["clients"]) == ("mlx-vocabtrim serve", 1))
    assert 0 < alone["cached_tokens"] < alone["prompt_tokens"], "ours keeps the head too: its passes end there"
    table = (out / "bench-serve.md").read_text()
    assert "| 3 | " in table and "ours over the better mlx_lm.server" in table
    cached = report["summary"]["mlx_lm.server"]["3"]
    assert f"| {cached['cached_prompt_tokens']} of {cached['prompt_tokens']} |" in table
    assert table in result.output
    refused = CliRunner().invoke(
        cli, [*args[:-2], "--clients", "1,2", "--per-category", "1", "--out", str(tmp_path / "o2")]
    )
    assert refused.exit_code == 1 and refused.output.endswith(
        "need 4 distinct questions (each level and pass its own, one to warm the servers up), and "
        f"{tmp_path / 'q.jsonl'} gives 2 at --per-category 1: raise --per-category or leave it out\n"
    )
    refused = CliRunner().invoke(cli, [*args[:-2], "--clients", "1,9", "--out", str(tmp_path / "o2")])
    assert refused.exit_code == 1 and "need 11 distinct questions" in refused.output
    assert "gives 6: pass fewer --clients or --repeats, or a longer --questions file" in refused.output


def test_bench_serve_sends_again_a_request_whose_connection_was_dropped(monkeypatch):
    """A server that resets a connection before answering (mlx_lm.server does with 16 at once) gets the
    request again, its latency counted from the first try; a break while the answer streams, or resets
    that go on, are one line."""
    import http.client
    import io
    import urllib.request

    import mlx_vocabtrim.serve_bench as serve_bench

    usage = {"choices": [], "usage": {"completion_tokens": 1}}
    chunks = [{"choices": [{"delta": {"content": "hi"}, "finish_reason": "stop"}]}, usage]
    stream = b"".join(b"data: " + json.dumps(c).encode() + b"\n" for c in chunks) + b"data: [DONE]\n"
    tries = []

    def urlopen(request, timeout):
        tries.append(time.perf_counter())
        if len(tries) <= failures:
            raise ConnectionResetError(104, "Connection reset by peer")
        return io.BytesIO(stream)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    failures = 2
    answer = serve_bench.ask("http://127.0.0.1:1", "Hello", 4)
    assert len(tries) == 3 and answer["text"] == "hi" and answer["completion_tokens"] == 1
    tries.clear()
    failures = 99
    with pytest.raises(VocabTrimError, match=r"^http://127.0.0.1:1 broke off a streamed answer \(\[Errno 104\]"):
        serve_bench.ask("http://127.0.0.1:1", "Hello", 4)
    assert len(tries) == serve_bench.CONNECT_TRIES

    for error in (ConnectionResetError(104, "Connection reset by peer"), http.client.IncompleteRead(b"")):

        class Broken(io.BytesIO):
            def __iter__(self, error=error):
                yield stream.splitlines(keepends=True)[0]
                raise error  # a reset, or a server that closed the connection inside a chunk

        monkeypatch.setattr(urllib.request, "urlopen", lambda request, timeout: Broken())
        with pytest.raises(VocabTrimError, match="broke off a streamed answer"):
            serve_bench.ask("http://127.0.0.1:1", "Hello", 4)


def test_bench_serve_resumes_an_interrupted_run_from_its_finished_levels(model_dirs, vocab_file, tmp_path, monkeypatch):
    """Each finished (server, level, pass) is logged as it ends; a rerun after a failure measures only the
    rest and reports the logged passes as they were; each repeat runs every server in turn, each pass of
    a level on questions of its own."""
    import mlx_vocabtrim.serve_bench as serve_bench

    prompts = ["def add(a, b):", "The quick brown fox", "x = 1", "Hello", "import os", "Once upon a time"]
    turns = [("code" if i % 2 == 0 else "text", p) for i, p in enumerate([*prompts, "class A:", "Dear Sir"])]
    args = [*bench_serve_args(model_dirs, vocab_file, tmp_path, turns, "4", "4", "1,2"), "--repeats", "2"]
    out = tmp_path / "out"
    real, asked = serve_bench.ask_all, []

    def failing(url, prompts, max_tokens):
        if len(asked) == 3:
            raise VocabTrimError("the machine went to sleep")
        asked.append(url)
        return real(url, prompts, max_tokens)

    monkeypatch.setattr(serve_bench, "ask_all", failing)
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 1 and "went to sleep" in first.output
    partial = out / "bench-serve.partial.jsonl"
    logged = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [(e.get("server"), e.get("clients")) for e in logged[2:]] == [
        ("mlx-vocabtrim serve", 1),
        ("mlx-vocabtrim serve", 2),
        ("mlx_lm.server", 1),
    ]
    assert not (out / "bench-serve.json").exists()
    monkeypatch.setattr(serve_bench, "ask_all", real)
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0, second.output
    assert "Resuming the unfinished bench-serve" in second.output
    assert "mlx-vocabtrim serve: 1 clients at once, pass 1" not in second.output
    order = [line for line in second.output.splitlines() if " clients at once, pass " in line]
    assert order[0] == "mlx_lm.server: 2 clients at once, pass 1 of 2"
    assert order.index("mlx_lm.server --draft-model: 2 clients at once, pass 1 of 2") < order.index(
        "mlx-vocabtrim serve: 1 clients at once, pass 2 of 2"
    )
    report = json.loads((out / "bench-serve.json").read_text())
    first_pass = [(answers, wall) for answers, wall in logged[3]["passes"]]
    ours = report["summary"]["mlx-vocabtrim serve"]["2"]
    logged_rate = serve_bench.level_figures(first_pass, None)["aggregate_tokens_per_s"]
    assert ours["requests"] == 4 and logged_rate in ours["aggregate_range"]  # the logged pass and a new one
    assert set(report["summary"]["mlx_lm.server --draft-model"]) == {"1", "2"} and not partial.exists()
    sets = report["config"]["level_questions"]
    assert sets == {"1": [[1], [4]], "2": [[2, 3], [5, 6]]}, "each level and pass its own questions"
    for r in report["requests"]:
        assert r["question_id"] in sets[str(r["clients"])][r["pass"]]


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


# ---- a tool-call round trip through the openai client ------------------------------------------

CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ANSWER = "It is sunny in Paris."
# Qwen2.5's chat template (its tools, tool calls and tool results), with a shorter default system prompt
QWEN_TEMPLATE = r"""
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within " }}
    {{- "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": " }}
    {{- "<args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or
           (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""


def scripted_model(out: Path) -> Path:
    """A one-layer qwen2 model (mlx-lm's class, weights set by hand) whose greedy reply to a chat is
    a Qwen-style call of get_weather, and, once a <tool_response> is in the prompt, ANSWER.

    The reply's pieces are single added tokens, each embedded as its own basis vector; the head
    maps each token to the next. The one choice that needs the context is after the prompt's last
    token: one attention head there looks for <tool_response> (every other query rests on the
    <|im_start|> tokens, whose values are zero) and adds a direction the head reads as ANSWER.
    The keys and queries it uses sit in RoPE's slowest frequencies, so positions barely matter.
    mlx-lm infers its json_tools parser from the template."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2
    from transformers import AutoTokenizer

    build_tokenizer(out / "tokenizer")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", CALL, ANSWER])
    tok.chat_template = QWEN_TEMPLATE
    tok.save_pretrained(out / "tokenizer")
    ids = tok.convert_tokens_to_ids
    sink, marker, last = ids("<|im_start|>"), ids("<tool_response>"), tok.encode("\n")[-1]
    start, call, end, answer = ids("<tool_call>"), ids(CALL), ids("</tool_call>"), ids(ANSWER)
    dim = {t: i for i, t in enumerate([sink, marker, last, start, call, end, answer])}
    config = {**model_config("qwen2", layers=1), "rope_theta": 1e6}
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    weights = {name: mx.zeros_like(w) for name, w in tree_flatten(model.parameters())}
    norms = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm", "model.norm"]
    weights.update({f"{n}.weight": mx.ones((64,)) for n in norms})
    embed, head = mx.zeros((VOCAB, 64)), mx.zeros((VOCAB, 64))
    for token, d in dim.items():
        embed[token, d] = 1.0  # normed to 8 at the attention and the head
    for token, following in ((last, start), (start, call), (call, end), (end, int(EOS)), (answer, int(EOS))):
        head[following, dim[token]] = 1.0
    head[answer, 63] = 1.0
    attention = "model.layers.0.self_attn."
    q, k, v, o = (mx.zeros_like(weights[attention + p + ".weight"]) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    q_bias = mx.zeros_like(weights[attention + "q_proj.bias"])
    q_bias[7], k[7, dim[sink]] = 80**0.5, 80**0.5 / 8  # every query: score 20 on <|im_start|>
    q[6, dim[last]], k[6, dim[marker]] = 160**0.5 / 8, 160**0.5 / 8  # after the prompt: score 40 on <tool_response>
    v[0, dim[marker]], o[63, 0] = 4 / 8, 1.0  # which adds 4 along dimension 63
    weights.update({"model.embed_tokens.weight": embed, "lm_head.weight": head, attention + "q_proj.bias": q_bias})
    weights.update(
        {
            attention + p + ".weight": w
            for p, w in zip(("q_proj", "k_proj", "v_proj", "o_proj"), (q, k, v, o), strict=True)
        }
    )
    model.load_weights(list(weights.items()))
    return save_model(model, config, out / "tokenizer", out / "weather")


@pytest.fixture(scope="module")
def weather(tmp_path_factory) -> Path:
    return scripted_model(tmp_path_factory.mktemp("scripted"))


def test_openai_client_tool_call_round_trip(weather, tmp_path):
    """The official openai client, streaming and not: the model's call is parsed into tool_calls
    (finish_reason "tool_calls"), the result goes back in a tool message after the assistant's
    message with content null, and the final answer comes as content. The drafter is the model
    itself, so every draft is accepted: tool-call text is ordinary tokens to speculation."""
    from openai import OpenAI

    proc, url = start(["--model", str(weather), "--draft-model", str(weather)], tmp_path / "server.log")
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        (model,) = [m.id for m in client.models.list().data]
        assert model == "weather" and client.models.retrieve(model).id == model
        ask = {"model": model, "tools": [TOOL], "max_tokens": 16, "temperature": 0}
        tokenizer = mlx_lm_load(str(weather))[1]
        for streaming in (False, True):
            messages = [{"role": "user", "content": "What is the weather in Paris?"}]
            if streaming:
                chunks = list(client.chat.completions.create(messages=messages, stream=True, **ask))
                deltas = [c.choices[0].delta for c in chunks if c.choices]
                assert "".join(d.content or "" for d in deltas) == ""
                (call,) = [t for d in deltas for t in d.tool_calls or []]
                assert call.index == 0 and [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
                said = {"role": "assistant", "content": None, "tool_calls": [call.model_dump(exclude={"index"})]}
            else:
                first = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **ask)
                (reply,) = first.choices
                assert reply.finish_reason == "tool_calls" and reply.message.content is None
                (call,) = reply.message.tool_calls
                assert "".join(e.token for e in reply.logprobs.content) == f"<tool_call>{CALL}</tool_call>"
                assert first.speculation["accepted_tokens"] > 0
                said = reply.message
            assert call.type == "function" and call.function.name == "get_weather"
            assert json.loads(call.function.arguments) == {"city": "Paris"}
            messages += [said, {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 22}'}]
            if streaming:
                chunks = list(client.chat.completions.create(messages=messages, stream=True, **ask))
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            else:
                final = client.chat.completions.create(messages=messages, **ask)
                text, finish = final.choices[0].message.content, final.choices[0].finish_reason
                assert final.choices[0].message.tool_calls is None
                history = [
                    messages[0],
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {
                                "id": call.id,
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                            }
                        ],
                    },
                    messages[2],
                ]
                template = tokenizer.apply_chat_template(history, tools=[TOOL], add_generation_prompt=True)
                assert final.usage.prompt_tokens == len(template)  # the call and the result reached the template
            assert (text, finish) == (ANSWER, "stop")
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        shown = client.chat.completions.create(
            messages=messages, tool_choice="none", **ask
        )  # no tools shown, none parsed
        assert (
            shown.choices[0].message.content == f"<tool_call>{CALL}</tool_call>"
            and not shown.choices[0].message.tool_calls
        )
        cut = client.chat.completions.create(
            messages=messages, **{**ask, "max_tokens": 1}
        )  # a call cut short stays text
        assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("<tool_call>", "length")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- hosts, idle and slow clients, connection limits -------------------------------------------


def attacker_host(url: str) -> dict:
    request = urllib.request.Request(url + "/health", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=30)
    return error_of(json.loads(err.value.read()))


@pytest.mark.parametrize("host", ["::1", "127.0.0.2"])
def test_a_server_on_any_loopback_address_answers_requests_for_it(host, model_dirs, tmp_path):
    proc, url = start(["--model", str(model_dirs["target"]), "--host", host], tmp_path / "server.log")
    try:
        assert url.startswith(f"http://[{host}]:" if ":" in host else f"http://{host}:")
        assert get(url, "/health")["status"] == "ok"
        status, answer, _ = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 200, answer
        assert attacker_host(url)["code"] == "invalid_host"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=30)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True once the server closes `sock` (or answers and closes) within `seconds`."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        sock.settimeout(max(deadline - time.time(), 0.01))
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionError:
            return True
    return False


def test_idle_and_slow_clients_time_out_and_connections_are_capped(model_dirs, tmp_path):
    log = tmp_path / "server.log"
    proc, url = start(["--model", str(model_dirs["target"]), "--read-timeout", "2", "--max-connections", "8"], log)
    try:
        tic = time.time()
        idle = [connect(url) for _ in range(20)]
        time.sleep(0.3)
        status, answer, headers = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 503 and error_of(answer)["code"] == "server_busy" and headers["Retry-After"] == "1"
        assert "--max-connections" in error_of(answer)["message"] and time.time() - tic < 1.5  # at once
        assert all(closed_within(sock, 4) for sock in idle) and time.time() - tic < 5  # idle sockets were closed
        status, answer, _ = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 200, answer
        slow = connect(url)  # headers a byte at a time (slow loris)
        tic, closed = time.time(), False
        for byte in b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: " + b"a" * 100:
            try:
                slow.send(bytes([byte]))
            except OSError:
                closed = True
            if closed or closed_within(slow, 0.25):
                break
        assert time.time() - tic < 4
        late = connect(url)  # a body that never finishes
        tic = time.time()
        late.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"mess'
        )
        late.settimeout(10)
        answer = b"".join(iter(lambda: late.recv(65536), b""))  # up to the server closing the connection
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in answer and 1.5 < time.time() - tic < 4
        status, answer, _ = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2})
        assert status == 200, answer
        for sock in [*idle, slow, late]:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text and len(text.splitlines()) <= 4, text  # the start line and a notice or two


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="sets a running process's limit with prlimit (Linux)")
def test_a_low_open_file_limit_is_one_note_not_a_flood(model_dirs, tmp_path):
    """Out of file descriptors (128 of them, set once the server runs: mlx-lm raises the limit as it
    loads) with 300 idle connections, the server writes one line, not a traceback a second, and
    answers again once the idle connections time out. A --max-connections over the limit is lowered."""
    log = tmp_path / "server.log"
    args = ["--model", str(model_dirs["target"]), "--read-timeout", "2", "--max-connections", "100000"]
    proc, url = start(args, log)
    try:
        assert "Note: --max-connections 100000 lowered to" in log.read_text()
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        idle = []
        for _ in range(300):  # a full backlog refuses some: the accepted ones still use every descriptor
            try:
                idle.append(connect(url))
            except OSError:
                pass
        assert len(idle) > 128
        deadline, status = time.time() + 40, None
        while status != 200 and time.time() < deadline:
            try:
                status, answer, _ = post(url, "/v1/chat/completions", {**CHAT, "max_tokens": 2}, timeout=10)
            except OSError:  # refused or reset while the server has no descriptor to spare
                time.sleep(0.5)
        assert status == 200, answer
        for sock in idle:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    text = log.read_text()
    assert "out of file descriptors" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 5, text


# ---- in one process: keep-alive comments, cancelling a prefill ---------------------------------


def test_a_stream_waiting_for_its_first_token_gets_keep_alive_comments(model_dirs):
    """While a streamed request waits (in the queue here; in a long prefill likewise) the server
    sends SSE comments, so clients and proxies do not time out; the client leaving still cancels it."""
    import uvicorn

    from mlx_vocabtrim.serve import Limits, create_app

    engine = Engine(load(str(model_dirs["target"]), "none"))
    app = create_app(engine, ("target",), Limits(8, 64, 100, 1024, engine.vocab), keep_alive=0.2)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()  # no worker runs: the request stays queued
    try:
        wait_for(lambda: server.started)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        conn = open_request(url, "/v1/chat/completions", {**CHAT, "stream": True})
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ") and response.readline() == b"\n"  # the role chunk
        assert [response.readline() for _ in range(4)] == [b": keep-alive\n", b"\n"] * 2
        assert (engine.status()["busy"], engine.status()["queued"]) == (False, 1)
        conn.close()
        wait_for(lambda: engine.status()["queued"] == 0)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class CancelledAfter(threading.Event):
    """A job's cancel flag that turns set the `n`-th time it is asked: a client gone at a known point."""

    def __init__(self, n: int):
        super().__init__()
        self.asked, self.n = 0, n

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked >= self.n or super().is_set()


@pytest.mark.parametrize("admit_wait", [1.5, 0.0])
def test_requests_sent_together_start_in_one_batch(model_dirs, vocab_file, admit_wait):
    """An idle engine waits a moment after a request for others sent with it: two requests 0.3 s apart
    decode together from their first tokens (the first does not speculate alone, drafter prefill and
    all, while the second waits), and a request alone still speculates. With no wait the first one
    starts alone: the counter this test reads can see the difference."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    engine = Engine(setup, admit_wait=admit_wait)
    thread = threading.Thread(target=engine.work, daemon=True)
    thread.start()
    rng = random.Random(2)
    prompts = [[rng.randrange(3, 300) for _ in range(20)] for _ in range(3)]
    results: dict[int, dict] = {}
    done = threading.Semaphore(0)

    def job(i: int) -> Job:
        def send(kind: str, value) -> None:
            if kind == "done":
                results[i] = value
                done.release()

        return Job(prompts[i], 10, send, logit_bias={2: -100})

    try:
        engine.submit(job(0))
        time.sleep(0.3)
        engine.submit(job(1))
        for _ in range(2):
            assert done.acquire(timeout=60)
        together = engine.decoder.speculative_steps
        engine.submit(job(2))
        assert done.acquire(timeout=60)
        alone_steps = engine.decoder.speculative_steps - together
    finally:
        engine.stop()
        thread.join(10)
    assert [results[i]["completion_tokens"] for i in range(3)] == [10, 10, 10]
    assert (together == 0) == (admit_wait > 0) and alone_steps == 9  # its first token from the target's own pass


def test_a_request_cancelled_during_prefill_stops_between_passes(model_dirs, vocab_file):
    """A request whose client leaves during its prefill stops at the next pass, generates nothing,
    and the whole passes done are reused by the next request, which still equals a fresh run."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    prompt = [random.Random(1).randrange(3, 300) for _ in range(70)]  # 69 prefilled tokens: 4 whole passes of 16
    engine, fresh = Engine(setup, prefill_step=16), Engine(setup, prefill_step=16)
    result = engine.run(Job(prompt, 12, lambda kind, value: None, cancelled=CancelledAfter(3)))
    assert (result["completion_tokens"], result["finish_reason"]) == (0, None)
    assert 0 < len(engine.cached) < 64 and engine.cached == prompt[: len(engine.cached)]

    def run(engine: Engine) -> tuple[str, dict]:
        pieces = []
        result = engine.run(Job(prompt, 12, lambda kind, value: pieces.append(value[0]), logit_bias={2: -100}))
        return "".join(pieces), result

    (text, result), (fresh_text, _) = run(engine), run(fresh)
    assert result["cached_tokens"] > 0 and result["completion_tokens"] == 12 and text == fresh_text


def test_a_failed_generation_is_a_500_naming_no_file_and_the_engine_goes_on(model_dirs, vocab_file, monkeypatch):
    """An error inside generation (here a step that raises with a path in its text) answers the
    requests it hit with a 500 that names the exception's type only, and the next request decodes."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    engine = Engine(setup)
    thread = threading.Thread(target=engine.work, daemon=True)
    thread.start()
    events: list[tuple[str, object]] = []
    done = threading.Semaphore(0)

    def send(kind: str, value) -> None:
        if kind in ("done", "error"):
            events.append((kind, value))
            done.release()

    prompt = [random.Random(3).randrange(3, 300) for _ in range(20)]
    real_advance = Engine.advance

    def failing(self) -> None:
        raise RuntimeError("[load] cannot read /home/someone/secret/model.safetensors")

    try:
        monkeypatch.setattr(Engine, "advance", failing)
        engine.submit(Job(prompt, 6, send))
        assert done.acquire(timeout=60)
        monkeypatch.setattr(Engine, "advance", real_advance)
        engine.submit(Job(prompt, 6, send))
        assert done.acquire(timeout=60)
    finally:
        engine.stop()
        thread.join(10)
    (kind, (status, message)), (then, result) = events
    assert (kind, status, then, result["completion_tokens"]) == ("error", 500, "done", 6)
    assert "RuntimeError" in message and "secret" not in message and ".safetensors" not in message


def test_a_long_prompt_is_prefilled_pass_by_pass_while_another_request_decodes(model_dirs, vocab_file, monkeypatch):
    """A 120-token prompt joining a decoding request takes its 7 whole 16-token passes one per step, the
    other request's tokens coming between them (its stream does not stall for the whole prefill), and
    both return what each returns alone."""
    setup = load(str(model_dirs["target"]), str(model_dirs["drafter"]), vocab=str(vocab_file), k=200)
    rng = random.Random(5)
    prompts = {"a": [rng.randrange(3, 300) for _ in range(20)], "b": [rng.randrange(3, 300) for _ in range(120)]}
    lengths = {"a": 40, "b": 8}

    def job(name: str, pieces: list[str]) -> Job:
        def send(kind: str, value) -> None:
            if kind == "text":
                pieces.append(value[0])

        return Job(prompts[name], lengths[name], send, logit_bias={2: -100})

    def emitted(engine: Engine, name: str) -> int:
        return sum(out.tokens for j, out, *_ in engine.active.values() if j.prompt is prompts[name])

    engine, texts, passes = Engine(setup, prefill_step=16), {"a": [], "b": []}, []
    engine.fresh_decoder()
    engine.start(job("a", texts["a"]))
    while emitted(engine, "a") < 3:
        engine.advance()
    real = engine.prefill_pass
    monkeypatch.setattr(engine, "prefill_pass", lambda entry: passes.append(emitted(engine, "a")) or real(entry))
    engine.start(job("b", texts["b"]))
    while engine.active or engine.prefilling:
        engine.advance()
    assert len(passes) == 119 // 16 == 7
    assert all(later > earlier for earlier, later in zip(passes, passes[1:], strict=False)), passes
    for name in ("a", "b"):
        alone: list[str] = []
        Engine(setup, prefill_step=16).run(job(name, alone))
        assert "".join(texts[name]) == "".join(alone), name
