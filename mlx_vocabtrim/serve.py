"""`mlx-vocabtrim serve`: an OpenAI-compatible HTTP server on our own speculative generator.

The models are fixed at start-up, loaded and checked before the port listens. Every request
is validated before any work (types, ranges, limits, the served model's names); bad ones get
an OpenAI-style JSON error. The main thread owns the models and generates one request at a
time, in arrival order (MLX is not thread-safe, its streams belong to their thread, and MLX
used from another thread can abort the process at exit); the HTTP server runs in a thread of
its own. A client that disconnects cancels its request. The KV cache is reused across
requests in whole prefill passes only: those are computed with the same shapes from the same
state as in a fresh run, so bitwise alike (`Engine.reuse`); a pass cut short, or any entry
written while generating, is never reused.
"""

import asyncio
import errno
import ipaddress
import json
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import VocabTrimError, first_line
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import MAX_SEED, count_option, draft_options, pair_options

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # a body up to this is read to its end before a 413, so the client sees the answer
DEFAULT_PROMPT_LIMIT = 8192
ALIAS = "default_model"  # the name mlx-lm's server answers to, kept for its clients
FORBIDDEN = ("draft_model", "adapters", "adapter")  # and any field ending in _path
UNSUPPORTED = {  # fields that would change the output, accepted only at the value that changes nothing
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "top_k": (0,),
    "min_p": (0,),
}


class RequestError(Exception):
    """A request the server answers with an error status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    500: "internal_error",
    503: "server_busy",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    code = code or ERROR_CODES.get(status, str(status))
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---- request models -------------------------------------------------------------------------


def _text_parts(value: Any) -> Any:
    """Message content as one string: a string, or a list of {"type": "text", "text": ...} parts."""
    if not isinstance(value, list):
        return value
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError('use a string or {"type": "text", "text": "..."} parts (only text is supported)')
        texts.append(part["text"])
    return "".join(texts)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str = Field(min_length=1)
    content: str

    _content = field_validator("content", mode="before")(_text_parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Fields(BaseModel):
    """What both endpoints take; None means the server's default."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: Any) -> Any:
        stops = [value] if isinstance(value, str) else value
        if value is not None and not (
            isinstance(stops, list) and len(stops) <= 4 and all(isinstance(s, str) and s for s in stops)
        ):
            raise ValueError("use a non-empty string or a list of up to 4 of them")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(Fields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(Fields):
    prompt: str

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("use one non-empty string (token-id and batched prompts are not supported)")
        return value


def _param(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _bad_text(value: Any) -> bool:
    """True when a JSON value holds a string with an unpaired surrogate (a \\ud800 escape); a loop, as
    JSON nests as deep as the parser allows."""
    todo = [value]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            todo += [*item, *item.values()]
        elif isinstance(item, list):
            todo += item
    return False


def _neutral(value: Any, allowed: tuple) -> bool:
    return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


@dataclass(frozen=True)
class Limits:
    """What the server allows one request."""

    max_tokens: int  # when a request names none
    max_tokens_limit: int
    max_prompt_tokens: int
    context: int | None  # the target's max_position_embeddings, when its config has one
    vocab: int  # ids the tokenizer can produce (padded head rows excluded): logit_bias ids must be below


def parse_request(body: Any, kind: type[Fields], names: tuple[str, ...], limits: Limits) -> Fields:
    """Check a request body; raise RequestError naming the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    if _bad_text(body):
        raise RequestError(400, "the request holds an unpaired surrogate escape (\\ud800-\\udfff): send valid Unicode")
    for name in body:
        if name in FORBIDDEN or name.endswith("_path"):
            raise RequestError(
                400, f"{name} is not accepted: this server's models are fixed at start-up (see /v1/models)", name
            )
    model = body.get("model")
    if isinstance(model, str) and model not in names:
        shown = model if len(model) <= 80 else model[:80] + "..."
        raise RequestError(404, f"model {shown!r} is not served: see /v1/models", "model", "model_not_found")
    for name, allowed in UNSUPPORTED.items():
        if not _neutral(body.get(name), allowed):
            raise RequestError(400, f"{name} is not supported by this server: leave it out", name)
    try:
        request = kind.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = _param(error["loc"])
        raise RequestError(400, f"{param}: {error['msg'].removeprefix('Value error, ')}", param) from None
    if request.n not in (None, 1):
        raise RequestError(400, "n must be 1: this server returns one choice per request", "n")
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(request, name)
        if value is not None and value > limits.max_tokens_limit:
            raise RequestError(
                400,
                f"{name} {value} is over this server's limit of {limits.max_tokens_limit} "
                "(--max-tokens-limit): ask for fewer",
                name,
            )
    for key in request.logit_bias or {}:
        if not (key.isascii() and key.isdigit() and len(key) < 10 and int(key) < limits.vocab):
            shown = key if len(key) <= 30 else key[:30] + "..."
            raise RequestError(
                400, f"logit_bias names token {shown!r}: use token ids from 0 to {limits.vocab - 1}", "logit_bias"
            )
    return request


def prompt_ids(tokenizer: Any, request: Fields) -> list[int]:
    """The request's prompt as token ids: messages through the chat template, or the text encoded."""
    if isinstance(request, ChatRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(400, "this model has no chat template: send the text to /v1/completions", "messages")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # templates raise their own errors for messages they refuse
            reason = first_line(e)
            raise RequestError(400, f"the chat template refused these messages ({reason})", "messages") from None
    bos = tokenizer.bos_token
    return tokenizer.encode(request.prompt, add_special_tokens=bos is None or not request.prompt.startswith(bos))


# ---- generation -----------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One request for the worker. `send(kind, value)` hands it ("text", piece) events, then
    ("done", result) or ("error", (status, message)), from the thread that generates."""

    prompt: list[int]
    max_tokens: int
    send: Callable[[str, Any], None]
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None
    id: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)


def stop_index(text: str, stops: list[str], start: int) -> int:
    """Where the first stop string at or after `start` begins in `text`; -1 if none does."""
    return min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may begin a stop string: kept until the next piece decides."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class Reply:
    """What a job has been sent: text pieces (stop strings cut, a possible stop's beginning held back
    until the next piece decides), tokens, drafts accepted."""

    def __init__(self, job: Job, tokenizer: Any, eos: set[int]):
        self.job, self.eos = job, eos
        self.detokenizer = tokenizer.detokenizer
        self.detokenizer.reset()
        self.text, self.sent, self.tokens, self.accepted, self.finish = "", 0, 0, 0, None

    def add(self, token: int, from_draft: bool, finish: str | None) -> bool:
        """Take one emitted token; True once the reply is finished."""
        self.tokens += 1
        self.accepted += from_draft
        if token not in self.eos:
            self.detokenizer.add_token(token)
        if finish is not None:
            self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        stops = self.job.stops
        hit = stop_index(self.text, stops, self.sent)
        if hit >= 0:
            self.text, finish = self.text[:hit], "stop"
        end = len(self.text) if finish else len(self.text) - held_back(self.text[self.sent :], stops)
        if end > self.sent:
            self.job.send("text", self.text[self.sent : end])
            self.sent = end
        self.finish = finish
        return finish is not None


class Engine:
    """The models, their KV caches and the queue in front of them; `work` decodes up to `max_batch`
    requests together (`batch.Decoder`: speculative while a request is alone, batched while others
    run), in the thread that loaded the models; waiting requests join in arrival order."""

    def __init__(
        self,
        setup: Any,
        *,
        max_queue: int = 32,
        max_batch: int = 8,
        prefill_step: int = 512,
        verbose: bool = False,
    ):
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        self.setup, self.max_queue, self.max_batch, self.step = setup, max_queue, max_batch, prefill_step
        self.verbose = verbose
        self.models = [m for m in (setup.target, setup.drafter) if m is not None]
        self.split = len(make_prompt_cache(setup.target))
        layers = [c for m in self.models for c in make_prompt_cache(m)]
        self.reusable = all(type(c) is KVCache for c in layers)  # others (rotating, quantized) cannot go back exactly
        self.cache: list | None = None
        self.cached: list[int] = []  # tokens whose KV entries the cache holds, in whole prefill passes
        self.cache_owner: Any = None  # the sequence decoding on the reusable cache, if any
        self.waiting: deque[Job] = deque()
        self.active: dict[Any, tuple[Job, Reply, float, int]] = {}  # sequence -> (job, reply, start, reused)
        self.stopping = False
        self.cond = threading.Condition()
        self.decoder: Any = None
        self.eos = set(setup.tokenizer.eos_token_ids)
        self.drop()

    def status(self) -> dict:
        with self.cond:
            return {
                "busy": bool(self.active),
                "batch": len(self.active),
                "max_batch": self.max_batch,
                "queued": len(self.waiting),
                "speculating": len(self.active) == 1,
                "moves": self.decoder.moves if self.decoder is not None else 0,
            }

    def submit(self, job: Job) -> None:
        with self.cond:
            if len(self.waiting) + len(self.active) > self.max_queue + self.max_batch - 1:
                raise RequestError(
                    503,
                    f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                    f"{self.max_queue}); retry later",
                )
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`: taken off the queue, or stopped after its next token."""
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
            self.cond.notify()

    def stop(self) -> None:
        """End `work`; requests waiting or running are cancelled and answered with an error."""
        with self.cond:
            self.stopping = True
            jobs = [*self.waiting, *(job for job, *_ in self.active.values())]
            self.waiting.clear()
            self.cond.notify()
        for job in jobs:
            job.cancelled.set()
            job.send("error", (503, "the server is shutting down"))

    def fresh_decoder(self) -> None:
        from .batch import Decoder

        setup = self.setup
        if self.decoder is not None:
            self.decoder.close()
        self.decoder = Decoder(
            setup.target,
            setup.drafter,
            setup.generation_kwargs(),
            self.eos,
            max_batch=self.max_batch,
            prefill_step=self.step,
        )

    def run(self, job: Job) -> dict | None:
        """Decode `job` to its end in this thread (tests, scripts): its result, or None when it was
        cancelled before it began."""
        if self.decoder is None:
            self.fresh_decoder()
        results = []
        send = job.send
        job.send = lambda kind, value: results.append(value) if kind == "done" else send(kind, value)
        self.start(job)
        while self.active:
            self.advance()
        return results[0] if results else None

    def work(self) -> None:
        """Decode requests until `stop`."""
        self.fresh_decoder()
        while True:
            with self.cond:
                while not self.waiting and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                started = []
                while self.waiting and len(self.active) + len(started) < self.max_batch:
                    started.append(self.waiting.popleft())
            try:
                for job in started:
                    self.start(job)
                self.advance()
            except Exception as e:  # a bug or an MLX error: answer every request, log, start afresh
                traceback.print_exc()
                failed = [job for job, *_ in self.active.values()]
                with self.cond:
                    self.active.clear()
                self.fresh_decoder()
                self.drop()
                self.cache_owner = None
                for job in failed:
                    job.send("error", (500, f"generation failed ({type(e).__name__}: {e})"))

    def start(self, job: Job) -> None:
        """Hand `job` to the decoder; alone, it reuses the longest prefix the caches hold."""
        from .batch import Sequence

        if job.cancelled.is_set():
            return
        reused, caches = 0, (None, None)
        if self.cache is not None and self.cache_owner is None and not self.active:
            reused = self.reuse(job.prompt)
            caches = (self.cache[: self.split], self.cache[self.split :] or None)
        seq = Sequence(job.prompt, job.max_tokens, job.temp, job.top_p, job.seed, job.logit_bias)
        if caches[0] is not None:
            self.cache_owner = seq
        self.decoder.add(seq, *caches)
        with self.cond:
            self.active[seq] = (job, Reply(job, self.setup.tokenizer, self.eos), time.perf_counter(), reused)

    def advance(self) -> None:
        """One decoder step; finished or cancelled requests are answered and leave."""
        for event in self.decoder.step():
            if event.sequence in self.active:
                job, reply, *_ = self.active[event.sequence]
                if reply.add(event.token, event.from_draft, event.finish) and event.finish is None:
                    self.decoder.remove(event.sequence)  # a stop string ended it
        for seq, (job, reply, tic, reused) in list(self.active.items()):
            if job.cancelled.is_set() and reply.finish is None:
                self.decoder.remove(seq)
            elif reply.finish is None:
                continue
            with self.cond:
                del self.active[seq]
            if seq is self.cache_owner:
                self.cache_owner = None
                self.keep(job.prompt)
            result = self.result(seq, job, reply, tic, reused)
            if reply.finish is not None:
                job.send("done", result)

    def result(self, seq: Any, job: Job, reply: Reply, tic: float, reused: int) -> dict:
        calls = seq.stats.target_calls + seq.batched_tokens
        speculation = {
            "draft_tokens": seq.stats.draft_tokens,
            "accepted_tokens": reply.accepted,
            "target_calls": calls,
            "tokens_per_target_call": round(reply.tokens / calls, 3) if calls else 0.0,
        }
        if self.verbose:
            seconds = time.perf_counter() - tic
            click.echo(
                f"{job.id}: {len(job.prompt)} prompt tokens ({reused} reused), {reply.tokens} tokens in "
                f"{seconds:.2f} s ({reply.tokens / max(seconds, 1e-9):.1f} tok/s), "
                f"{speculation['tokens_per_target_call']} per target call, {reply.finish or 'cancelled'}",
                err=True,
            )
        return {
            "finish_reason": reply.finish,
            "prompt_tokens": len(job.prompt),
            "completion_tokens": reply.tokens,
            "cached_tokens": reused,
            "speculation": speculation,
        }

    def drop(self) -> None:
        """Start from empty caches."""
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = [c for m in self.models for c in make_prompt_cache(m)] if self.reusable else None
        self.cached = []

    def reuse(self, prompt: list[int]) -> int:
        """Trim the caches to the longest prefix of `prompt` they hold in whole prefill passes, and
        return its length.

        Prefill feeds prompt[:-1] in passes of `step` tokens from position 0, so a pass ending at
        a multiple of `step` saw the same tokens, the same cached state and the same shapes as in
        a fresh run of any prompt sharing that prefix: its entries are bitwise the fresh run's, and
        so is the rest of the prefill, again in whole passes from there. Entries of a shorter last
        pass, or written while generating, come from other shapes and are never kept (`keep`).
        """
        if self.cache is None:
            return 0
        common = 0
        for a, b in zip(self.cached, prompt[:-1], strict=False):
            if a != b:
                break
            common += 1
        common -= common % self.step
        for layer in self.cache:
            layer.trim(layer.offset - common)
        self.cached = self.cached[:common]
        return common

    def keep(self, prompt: list[int]) -> None:
        """After a request, keep in the caches only its prompt's whole prefill passes."""
        if self.cache is None:
            return
        kept = (len(prompt) - 1) // self.step * self.step
        if any(layer.offset < kept for layer in self.cache):
            return self.drop()
        for layer in self.cache:
            layer.trim(layer.offset - kept)
        self.cached = prompt[:kept]


# ---- HTTP -----------------------------------------------------------------------------------


async def read_body(request: Any) -> Any:
    """The body as JSON: at most MAX_BODY_BYTES of UTF-8 (413 above, drained so the client reads it)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes: send a shorter request")
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            body += chunk
        elif size > DRAIN_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes: send a shorter request")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        reason = f"{e.reason} at byte {e.start}"
        raise RequestError(400, f"the request body is not UTF-8 ({reason}): send UTF-8 JSON") from None

    def constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return json.loads(text, parse_constant=constant)
    except (ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise RequestError(400, f"the request body is not valid JSON ({reason}): send a JSON object") from None


def usage(result: dict) -> dict:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
    }


def choice(chat: bool, text: str | None, finish: str | None, whole: bool = False) -> dict:
    """One choice: a chat message (`whole`) or delta, or a completion's text."""
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
    if whole:
        part = {"message": {"role": "assistant", "content": text}}
    else:
        part = {"delta": {} if text is None else {"content": text}}
    return {"index": 0, **part, "logprobs": None, "finish_reason": finish}


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?"


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


def create_app(
    engine: Engine, names: tuple[str, ...], limits: Limits, origins: str = "local", loopback: bool = True
) -> Any:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health.

    `origins` says which web pages may call it from a browser (CORS): "local" (pages served
    from this machine: local chat front-ends), "*" (any page, as mlx-lm's server), "none", or
    a comma-separated list of origins. Listening on loopback, it answers only requests
    addressed to a loopback name, so a web page cannot reach it by rebinding its own domain's
    address to 127.0.0.1.
    """
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if loopback:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
    if origins != "none":
        listed = {"local": [], "*": ["*"]}.get(origins, [o.strip() for o in origins.split(",") if o.strip()])
        local = LOCAL_ORIGINS if origins == "local" else None
        app.add_middleware(
            CORSMiddleware,
            allow_origins=listed,
            allow_origin_regex=local,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    started = int(time.time())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        path = request.url.path
        message = {
            404: f"no endpoint {path}: use /v1/chat/completions, /v1/completions, /v1/models or /health",
            405: f"{request.method} is not allowed on {path}",
        }.get(e.status_code)
        return JSONResponse(error_body(e.status_code, message or str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(500, f"internal error ({type(e).__name__})"), status_code=500)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **engine.status()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": names[0], "object": "model", "created": started, "owned_by": "mlx-vocabtrim"}],
        }

    async def watch(request: Request, job: Job, events: asyncio.Queue) -> None:
        """Cancel `job` once its client disconnects, and wake whoever waits on its events."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(job)
        events.put_nowait(("gone", None))

    async def complete(request: Request, kind: type[Fields]) -> Any:
        parsed = parse_request(await read_body(request), kind, names, limits)
        ids = await run_in_threadpool(prompt_ids, engine.setup.tokenizer, parsed)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt is {len(ids)} tokens, over this server's limit of "
                f"{limits.max_prompt_tokens} (--max-prompt-tokens): shorten it",
                "messages" if kind is ChatRequest else "prompt",
            )
        wanted = parsed.max_completion_tokens or parsed.max_tokens or limits.max_tokens
        if limits.context is not None:
            wanted = min(wanted, limits.context - len(ids))  # generation ends at the end of the context
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def send(what: str, value: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (what, value))
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        chat = kind is ChatRequest
        job = Job(
            ids,
            wanted,
            send,
            parsed.temperature or 0.0,
            1.0 if parsed.top_p is None else parsed.top_p,
            parsed.seed,
            parsed.stops(),
            {int(k): v for k, v in (parsed.logit_bias or {}).items()} or None,
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        )
        engine.submit(job)
        head = {"id": job.id, "created": int(time.time()), "model": names[0]}
        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            head["object"] = "chat.completion.chunk" if chat else "text_completion"

            async def chunks():
                watcher = asyncio.create_task(watch(request, job, events))
                try:
                    if chat:
                        yield sse(
                            {
                                **head,
                                "choices": [
                                    {
                                        "index": 0,
                                        "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            }
                        )
                    while (message := await events.get())[0] == "text":
                        yield sse({**head, "choices": [choice(chat, message[1], None)]})
                    what, value = message
                    if what == "gone":
                        return
                    if what == "error":
                        yield sse(error_body(*value))
                    else:
                        last = choice(chat, None, value["finish_reason"])
                        yield sse({**head, "choices": [last], "speculation": value["speculation"]})
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": usage(value)})
                    yield "data: [DONE]\n\n"
                finally:
                    watcher.cancel()
                    engine.cancel(job)

            return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        watcher = asyncio.create_task(watch(request, job, events))
        pieces = []
        try:
            while (message := await events.get())[0] == "text":
                pieces.append(message[1])
        finally:
            watcher.cancel()
            engine.cancel(job)
        what, value = message
        if what == "error":
            raise RequestError(*value)
        if what == "gone":
            return JSONResponse(error_body(400, "the client disconnected"), status_code=400)
        return {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice(chat, "".join(pieces), value["finish_reason"], whole=True)],
            "usage": usage(value),
            "speculation": value["speculation"],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await complete(request, ChatRequest)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await complete(request, CompletionRequest)

    return app


# ---- start-up -------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, not yet listening; a one-line error when that cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise VocabTrimError(f"--host {host} is not an address of this machine ({e}): pass --host 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise VocabTrimError(
                f"port {port} on {host} is in use: pass --port with a free port (0 picks one), or stop what is using it"
            ) from None
        if e.errno == errno.EACCES:
            raise VocabTrimError(f"port {port} on {host} needs privileges: pass --port 1024 or above") from None
        raise VocabTrimError(
            f"cannot listen on {host} port {port} ({e.strerror}): pass --host 127.0.0.1 or another --port"
        ) from None
    return sock


@click.command()
@pair_options(DEFAULT_TARGET, DEFAULT_DRAFTER)
@draft_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 opens the server to the network).",
)
@count_option("--port", 8080, "Port to listen on (0: any free port).", 0, 65535)
@count_option("--max-tokens", 512, "Tokens a request gets when it names no max_tokens.")
@count_option("--max-tokens-limit", 4096, "Most tokens one request may ask for (more: a 400 error).")
@count_option(
    "--max-prompt-tokens",
    None,
    f"Longest prompt in tokens (longer: a 400 error) [default: {DEFAULT_PROMPT_LIMIT}, within the model's context].",
)
@count_option("--max-queue", 32, "Requests that may wait while the batch is full (more: a 503 error).", 0)
@count_option(
    "--max-batch",
    8,
    "Requests decoded together (speculative while one runs alone, batched while several do).",
)
@count_option(
    "--prefill-step-size",
    512,
    "Prompt tokens per prefill pass; the KV cache is reused across requests in whole passes.",
)
@click.option(
    "--allowed-origins",
    default="local",
    show_default=True,
    help="Web pages that may call the server from a browser (CORS): local (pages served from this "
    "machine), * (any), none, or a comma-separated list of origins.",
)
@click.option("--verbose", is_flag=True, help="Print the setup, then one line per request and the access log.")
def serve(
    model,
    draft_model,
    vocab,
    k,
    num_draft_tokens,
    draft_threshold,
    context_head,
    lookup_ngram,
    lookup_tokens,
    adaptive,
    host,
    port,
    max_tokens,
    max_tokens_limit,
    max_prompt_tokens,
    max_queue,
    max_batch,
    prefill_step_size,
    allowed_origins,
    verbose,
):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    on the speculative generator: lossless; up to --max-batch requests decode together, speculative
    while one runs alone."""
    import uvicorn

    from .resolve import load_for
    from .trim import head_rows
    from .vocab import real_size

    if max_tokens > max_tokens_limit:
        raise VocabTrimError(
            f"--max-tokens {max_tokens} is over --max-tokens-limit {max_tokens_limit}: lower it or raise the limit"
        )
    sock = bind(host, port)  # before loading: a busy port fails at once (nothing listens until the models are ready)
    try:
        try:
            setup = load_for(click.get_current_context().params)
        except VocabTrimError:
            raise
        except Exception as e:  # load names bad input itself; anything else still ends in one line
            if verbose:
                traceback.print_exc()
            reason = first_line(e)
            raise VocabTrimError(
                f"cannot set up the models ({type(e).__name__}: {reason}): check --model, "
                "--draft-model and --vocab (--verbose prints the traceback)"
            ) from None
        context = getattr(getattr(setup.target, "args", None), "max_position_embeddings", None)
        context = context if isinstance(context, int) and context > 1 else None
        if max_prompt_tokens is None:
            max_prompt_tokens = min(DEFAULT_PROMPT_LIMIT, context - 1) if context else DEFAULT_PROMPT_LIMIT
        elif context is not None and max_prompt_tokens >= context:
            raise VocabTrimError(
                f"--max-prompt-tokens {max_prompt_tokens} leaves no room in the model's context of "
                f"{context} tokens: pass at most {context - 1}"
            )
        if verbose:
            for line in setup.describe():
                click.echo(line)
        name = model or DEFAULT_TARGET
        vocab = min(head_rows(setup.target), real_size(setup.tokenizer))
        limits = Limits(max_tokens, max_tokens_limit, max_prompt_tokens, context, vocab)
        engine = Engine(
            setup, max_queue=max_queue, max_batch=max_batch, prefill_step=prefill_step_size, verbose=verbose
        )
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        app = create_app(engine, (name, ALIAS), limits, allowed_origins, loopback)
        config = uvicorn.Config(
            app,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=3,
        )
        http = uvicorn.Server(config)

        def run_http() -> None:
            try:
                http.run(sockets=[sock])
            finally:
                engine.stop()

        sock.listen(2048)
        thread = threading.Thread(target=run_http, name="http", daemon=True)
        thread.start()
        where = sock.getsockname()
        url = f"http://{f'[{where[0]}]' if ':' in where[0] else where[0]}:{where[1]}"
        drafter = f" with drafter {setup.names[1]}" if setup.drafter is not None else " (no drafter)"
        click.echo(f"Serving {name}{drafter} at {url}/v1 (up to {max_batch} requests at once; Ctrl-C stops)")
        for stop in (signal.SIGINT, signal.SIGTERM):  # both stop gracefully, even where SIGINT came in ignored
            signal.signal(stop, signal.default_int_handler)
        try:
            engine.work()
        except KeyboardInterrupt:
            pass
        finally:
            engine.stop()
            http.should_exit = True
            thread.join(timeout=10)
    finally:
        sock.close()
