"""`mlx-vocabtrim serve` over real HTTP on a loopback port with tiny models."""

import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
from mlx_lm import load

from mlx_vocabtrim import generate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    vocab = tmp_path_factory.mktemp("sv") / "ranked.txt"
    vocab.write_text("\n".join(str(i) for i in range(320)))
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_vocabtrim", "serve", "--model", str(model_dirs["target"]), "--draft-model",
         str(model_dirs["drafter"]), "--vocab", str(vocab), "--k", "200", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
        if proc.poll() is not None:
            pytest.fail("server exited: " + proc.stdout.read()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def post(url, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


CHAT = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 12, "temperature": 0.0}


def test_chat_completion_equals_target_decoding(server, model_dirs):
    status, text = post(server, "/v1/chat/completions", CHAT)
    assert status == 200, text
    content = json.loads(text)["choices"][0]["message"]["content"]
    model, tokenizer = load(str(model_dirs["target"]))
    prompt = tokenizer.apply_chat_template(CHAT["messages"], add_generation_prompt=True)
    assert content == generate(model, tokenizer, prompt, None, max_tokens=12)


def test_streaming_matches_non_streaming(server):
    _, text = post(server, "/v1/chat/completions", CHAT)
    whole = json.loads(text)["choices"][0]["message"]["content"]
    status, stream = post(server, "/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    events = [line[len("data: ") :] for line in stream.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    pieces = [
        json.loads(e)["choices"][0].get("delta", {}).get("content") or ""
        for e in events[:-1]
        if json.loads(e)["choices"]
    ]
    assert "".join(pieces) == whole


def test_text_completion_models_and_health(server):
    status, text = post(server, "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0})
    assert status == 200 and json.loads(text)["choices"][0]["text"] is not None
    models = json.loads(urllib.request.urlopen(server + "/v1/models").read())
    assert "default_model" in [m["id"] for m in models["data"]]
    assert json.loads(urllib.request.urlopen(server + "/health").read())["status"] == "ok"


def test_bad_requests_get_4xx_and_the_server_keeps_running(server):
    cases = [
        (post(server, "/v1/chat/completions", None, raw=b"{not json"), 400),
        (post(server, "/v1/chat/completions", {**CHAT, "model": "someone/unknown"}), 404),
        (post(server, "/v1/chat/completions", {**CHAT, "max_tokens": -1}), 400),
        (post(server, "/v1/chat/completions", None, raw=b'{"x": "' + b"a" * (2 << 20) + b'"}'), 413),
    ]
    for (status, text), expected in cases:
        assert status == expected, text
        assert "error" in json.loads(text)
    status, _ = post(server, "/v1/chat/completions", CHAT)
    assert status == 200


def test_concurrent_requests_are_all_answered(server):
    results = []

    def ask():
        results.append(post(server, "/v1/chat/completions", CHAT))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(results) == 4 and all(status == 200 for status, _ in results)
    assert len({json.loads(text)["choices"][0]["message"]["content"] for _, text in results}) == 1
