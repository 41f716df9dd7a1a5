"""`mlx-vocabtrim serve`: an OpenAI-compatible HTTP server on our own speculative generator.

The models are fixed at start-up, loaded and checked before the port listens. Every request
is validated before any work (types, ranges, limits, the served model's names); bad ones get
an OpenAI-style JSON error. The main thread owns the models and generates one request at a
time, in arrival order (MLX is not thread-safe, its streams belong to their thread, and MLX
used from another thread can abort the process at exit); the HTTP server runs in a thread of
its own. A client that disconnects cancels its request, within one prefill pass or one
token. The KV cache is reused across requests in whole prefill passes only: a prompt's passes
end where its messages start and every `--prefill-step-size` tokens after each (`pass_ends`),
so two prompts sharing their first messages (a system prompt, the template's head, a
conversation's history) computed those passes with the same shapes from the same state,
bitwise alike (`Engine.reuse`); what is left after the last whole pass, and any entry written
while generating, is never reused.

Tool calls are ordinary tokens of the reply: the text between the tokenizer's tool-call
markers goes to mlx-lm's own parser for the model's format (`Reply`), so speculation and
exactness are untouched. Logprobs are the target's own log-softmax rows, as mlx-lm's server
reports them. Against idle and slow clients every request has `--read-timeout` seconds for
its headers and again for its body, and at most `--max-connections` connections are open.
"""

import asyncio
import errno
import ipaddress
import json
import math
import os
import re
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from .checks import MAX_SEED, chat_ids
from .errors import VocabTrimError, first_line
from .models import DEFAULT_DRAFTER, DEFAULT_TARGET
from .options import count_option, draft_options, pair_options

MAX_BODY_BYTES = 1 << 20
DRAIN_BYTES = 64 << 20  # a body up to this is read to its end before a 413, so the client sees the answer
DEFAULT_PROMPT_LIMIT = 8192
MAX_TOP_LOGPROBS = 20  # OpenAI's bound
KEEP_ALIVE_SECONDS = 2.0  # a stream waiting for its first token (queue, prefill) sends an SSE comment this often
REFUSE_SECONDS = 1.0  # a connection over --max-connections that sends no request is closed after this
FILE_RESERVE = 16  # file descriptors kept free of connections
BACKLOG = 128  # connections the kernel queues, and asyncio accepts in one go
ALIAS = "default_model"  # the name mlx-lm's server answers to, kept for its clients
FORBIDDEN = ("draft_model", "adapters", "adapter")  # and any field ending in _path
UNSUPPORTED = {  # fields that would change the output, accepted only at the value that changes nothing
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "functions": ([],),
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
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "request_too_large",
    415: "unsupported_media_type",
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


class FunctionCall(BaseModel):
    """A call in a message's tool_calls: `arguments` is OpenAI's JSON string, parsed here for the
    template (templates render it with `tojson`, as mlx-lm's server passes it)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _arguments(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError("use the JSON text of the call's arguments") from None


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str = Field(min_length=1)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    content: str | None = Field(None, validate_default=True)  # after tool_calls: its check reads them

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None and not info.data.get("tool_calls"):
            raise ValueError("give the message's text (it may be null only beside tool_calls)")
        return _text_parts(value)

    def for_template(self) -> dict:
        """The message as chat templates take it: null content as "" (as mlx-lm's server passes it),
        tool calls, tool_call_id and name kept."""
        message: dict[str, Any] = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        for key in ("tool_call_id", "name"):
            if getattr(self, key) is not None:
                message[key] = getattr(self, key)
        return message


class FunctionSpec(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")  # description, parameters, ...: passed on as given
    name: str = Field(min_length=1)


class Tool(BaseModel):
    """A tool, or a named tool_choice (the same shape)."""

    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["function"]
    function: FunctionSpec


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class Fields(BaseModel):
    """What both endpoints take; None means the server's default."""

    model_config = ConfigDict(strict=True, extra="allow")
    unsupported: ClassVar[dict[str, tuple]] = {}  # this endpoint's own UNSUPPORTED fields
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

    def top(self) -> int | None:
        """How many most likely tokens to report beside each token's logprob; None: no logprobs."""
        return None

    def check(self) -> None:
        """Checks across fields, after each field's own."""


class ChatRequest(Fields):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | Tool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("tool_choice", mode="wrap")
    @classmethod
    def _tool_choice(cls, value: Any, handler: Callable) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                'use "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
            ) from None

    def top(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> list[dict] | None:
        """The tools the chat template shows the model: none with tool_choice "none"."""
        return [tool.model_dump() for tool in self.tools] if self.tools and self.tool_choice != "none" else None

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        names = [tool.function.name for tool in self.tools or []]
        choice = self.tool_choice
        if choice == "required" and not names:
            raise RequestError(
                400, 'tool_choice "required" needs tools: send the tools the model may call', "tool_choice"
            )
        if isinstance(choice, Tool) and choice.function.name not in names:
            raise RequestError(
                400, f"tool_choice names {choice.function.name[:80]!r}, which is not in tools: add it", "tool_choice"
            )


class CompletionRequest(Fields):
    unsupported: ClassVar[dict[str, tuple]] = {"tools": ([],), "tool_choice": ("none", "auto"), "top_logprobs": (0,)}
    prompt: str
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> Any:
        if not isinstance(value, str) or not value:
            raise ValueError("use one non-empty string (token-id and batched prompts are not supported)")
        return value

    def top(self) -> int | None:
        return self.logprobs


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
        raise not_served(model)
    for name, allowed in {**UNSUPPORTED, **kind.unsupported}.items():
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
    request.check()
    return request


def not_served(model: str) -> RequestError:
    shown = model if len(model) <= 80 else model[:80] + "..."
    return RequestError(404, f"model {shown!r} is not served: see /v1/models", "model", "model_not_found")


def prompt_ids(tokenizer: Any, request: Fields) -> list[int]:
    """The request's prompt as token ids: messages (and tools) through the chat template, or the text encoded."""
    if isinstance(request, ChatRequest):
        if not getattr(tokenizer, "chat_template", None):
            raise RequestError(400, "this model has no chat template: send the text to /v1/completions", "messages")
        messages = [m.for_template() for m in request.messages]
        try:
            return chat_ids(tokenizer, messages, "change the messages", request.template_tools())
        except VocabTrimError as e:  # templates raise their own errors for messages they refuse
            raise RequestError(400, e.message, "messages") from None
    bos = tokenizer.bos_token
    return tokenizer.encode(request.prompt, add_special_tokens=bos is None or not request.prompt.startswith(bos))


def prompt_cuts(tokenizer: Any, request: Fields, ids: list[int]) -> list[int]:
    """Where a chat request's messages start in its prompt `ids` (`message_starts`); none for text."""
    if not isinstance(request, ChatRequest):
        return []
    return message_starts(tokenizer, [m.for_template() for m in request.messages], request.template_tools(), ids)


MESSAGE_CUTS = 64  # the first messages whose starts end prefill passes (bounds the templating per request)
PROBE_BUDGET = 16  # and the tokens rendered to find them, in prompts' lengths
PLACEHOLDER = "\x00"  # a message's stand-in content (content that begins alike only moves its start)


def message_starts(tokenizer: Any, messages: list[dict], tools: list[dict] | None, ids: list[int]) -> list[int]:
    """Where each of the first MESSAGE_CUTS messages' content begins in `ids`: what the prompt shares with
    the template over the messages before it and a placeholder message of its role (for the first one,
    the template's head: a default system prompt, the role's header), while the tokens rendered stay
    within PROBE_BUDGET prompts. Prompts sharing their first messages normally share these starts, and
    so their prefill passes up to them; where they do not (a template that renders a message by what
    follows it), reuse only stops earlier, as it compares the passes themselves (`Engine.reuse`)."""
    starts, rendered_tokens = set(), 0
    for i, message in enumerate(messages[:MESSAGE_CUTS]):
        probe = [*messages[:i], {"role": message["role"], "content": PLACEHOLDER}]
        try:
            rendered = tokenizer.apply_chat_template(probe, tools=tools, add_generation_prompt=False)
        except Exception:  # a template may refuse the conversation cut there: no start for that message
            continue
        rendered_tokens += len(rendered)
        if rendered_tokens > PROBE_BUDGET * len(ids):
            break
        starts.add(common_prefix(rendered, ids))
    return sorted(starts)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def pass_ends(length: int, cuts: list[int], step: int) -> list[int]:
    """Where the server's whole prefill passes over a prompt's first `length` tokens end: at each cut
    (0 < cut < length) and every `step` tokens in between and after the last; what is left after the
    last whole pass (under `step` tokens) the decoder prefills. Prompts sharing their tokens and cuts
    up to a point share their passes up to it (`Engine.reuse`)."""
    ends, start = [], 0
    for cut in sorted({c for c in cuts if 0 < c < length}):
        ends += [*range(start + step, cut, step), cut]
        start = cut
    return ends + list(range(start + step, length + 1, step))


# ---- generation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One emitted token with the target's log-probabilities: its bytes, where its text begins in
    the reply, its logprob and the most likely tokens at its position."""

    bytes: bytes
    offset: int
    logprob: float
    top: list[tuple[bytes, float]]


@dataclass(eq=False)
class Job:
    """One request for the worker. `send(kind, value)` hands it ("text", (piece, scored tokens))
    events, then ("done", result) or ("error", (status, message)), from the thread that generates.
    `logprobs` None: no scores; n: each token's logprob and the n most likely tokens."""

    prompt: list[int]
    max_tokens: int
    send: Callable[[str, Any], None]
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stops: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] | None = None
    id: str = ""
    logprobs: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)  # when the request was read, before templating
    cuts: list[int] = field(default_factory=list)  # where its messages start: its prefill passes end there


def stop_index(text: str, stops: list[str], start: int) -> int:
    """Where the first stop string at or after `start` begins in `text`; -1 if none does."""
    return min((i for s in stops if (i := text.find(s, start)) >= 0), default=-1)


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may begin a stop string: kept until the next piece decides."""
    return max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])), default=0)


class TokenBytes:
    """The bytes each token stands for, as OpenAI's logprobs give them: a byte-level BPE piece mapped
    back to its bytes, a SentencePiece piece with its spaces and byte pieces, else the token decoded
    alone (the detokenizer mlx-lm picked for the tokenizer says which)."""

    def __init__(self, tokenizer: Any):
        from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.tokenizer, self.known = tokenizer, {}
        detokenizer = tokenizer.detokenizer
        self.byte_level = isinstance(detokenizer, BPEStreamingDetokenizer)
        self.sentencepiece = isinstance(detokenizer, SPMStreamingDetokenizer)
        self.byte_of = {c: b for b, c in bytes_to_unicode().items()} if self.byte_level else {}

    def __call__(self, token: int) -> bytes:
        if token not in self.known:
            self.known[token] = self.find(token)
        return self.known[token]

    def find(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if not isinstance(piece, str):  # an id past the tokenizer's vocabulary (a padded head row)
            return b""
        if self.byte_level:
            return b"".join(bytes([self.byte_of[c]]) if c in self.byte_of else c.encode() for c in piece)
        if self.sentencepiece:
            byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
            return bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token]).encode()


class Output:
    """What a job has been sent: text pieces (stop strings cut, a possible stop's beginning held back
    until the next piece decides) with the scores of the tokens whose text begins in them (EOS has
    none, tokens from a stop string on are dropped), tokens, drafts accepted."""

    def __init__(self, job: Job, engine: "Engine"):
        self.job, self.engine = job, engine
        self.detokenizer = engine.setup.tokenizer.detokenizer
        self.detokenizer.reset()
        self.text, self.sent, self.tokens, self.accepted, self.finish = "", 0, 0, 0, None
        self.marks: list[Scored] = []
        self.first: float | None = None  # when the first token came

    def add(self, token: int, logprobs: Any, from_draft: bool, finish: str | None) -> bool:
        """Take one emitted token; True once the reply is finished."""
        job, engine = self.job, self.engine
        self.first = self.first or time.perf_counter()
        self.tokens += 1
        self.accepted += from_draft
        if job.logprobs is not None and token not in engine.eos:
            value, top = engine.score(token, logprobs, job.logprobs)
            self.marks.append(Scored(engine.token_bytes(token), len(self.text), value, top))
        if token not in engine.eos:
            self.detokenizer.add_token(token)
        if finish is not None:
            self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        hit = stop_index(self.text, job.stops, self.sent)
        if hit >= 0:
            self.text, finish = self.text[:hit], "stop"
        end = len(self.text) if finish else len(self.text) - held_back(self.text[self.sent :], job.stops)
        ready = [m for m in self.marks if m.offset < end or (finish and hit < 0)]
        self.marks = self.marks[len(ready) :]
        if end > self.sent or ready:
            job.send("text", (self.text[self.sent : end], ready))
            self.sent = end
        self.finish = finish
        return finish is not None


def kv_bytes_per_token(models: list) -> int:
    """KV cache bytes one more token adds, over every layer of `models` that keeps keys and values
    (read off a one-token pass; windows and recurrent states, which stop growing, counted as if they grew)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    total = 0
    for model in models:
        cache = make_prompt_cache(model)
        model(mx.array([[0]], mx.uint32), cache=cache)
        for layer in cache:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if isinstance(keys, mx.array) and isinstance(values, mx.array) and keys.ndim == 4:
                heads, dims = keys.shape[1], keys.shape[3] + values.shape[3]
                total += heads * dims * keys.dtype.size
    return total


def default_kv_limit(models: list) -> int:
    """Three quarters of this machine's memory, less the weights: what the KV caches may hold by default."""
    from mlx.utils import tree_flatten

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    weights = sum(v.nbytes for m in models for _, v in tree_flatten(m.parameters()))
    return max(int(0.75 * memory) - weights, 0)


ADMIT_WAIT = 0.05  # seconds an idle engine waits for requests sent together with the first


class Engine:
    """The models, their KV caches and the queue in front of them; `work` decodes up to `max_batch`
    requests together (`batch.Decoder`: speculative while a request is alone, in a speculative or a
    plain batch while others run), in the thread that loaded the models; waiting requests join in
    arrival order (while their KV memory fits under `max_kv_bytes`; an idle engine waits `admit_wait`
    seconds after a request for others sent with it, so that they start in one batch instead of the
    first one speculating alone, drafter prefill and all, before the others join). A joining
    request's prompt is prefilled one pass per step (others' tokens keep coming; a cancel stops it
    between passes)."""

    def __init__(
        self,
        setup: Any,
        *,
        max_queue: int = 32,
        max_batch: int = 8,
        prefill_step: int = 512,
        verbose: bool = False,
        max_kv_bytes: int | None = None,
        admit_wait: float = ADMIT_WAIT,
    ):
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        from .trim import head_rows
        from .vocab import real_size

        self.setup, self.max_queue, self.max_batch, self.step = setup, max_queue, max_batch, prefill_step
        self.verbose, self.admit_wait = verbose, admit_wait
        self.models = [m for m in (setup.target, setup.drafter) if m is not None]
        self.counts = [len(make_prompt_cache(m)) for m in self.models]  # each model's layers in a cache
        self.reusable = all(type(c) is KVCache for c in self.layers())  # others (rotating, quantized) cannot go back
        self.vocab = min(head_rows(setup.target), real_size(setup.tokenizer))  # ids the tokenizer can produce
        self.token_bytes = TokenBytes(setup.tokenizer)
        self.eos = set(setup.tokenizer.eos_token_ids)
        self.kv_per_token = kv_bytes_per_token(self.models)
        self.max_kv_bytes = max_kv_bytes
        self.cache: list | None = None
        self.cached: list[int] = []  # tokens whose KV entries the cache holds, in whole prefill passes
        self.cached_ends: list[int] = []  # where those passes ended
        self.cache_owner: Any = None  # the job decoding on the reusable cache, if any
        self.waiting: deque[Job] = deque()
        self.prefilling: list[list] = []  # [job, cache, prompt tokens it holds, reused, start time]
        self.active: dict[Any, tuple[Job, Output, float, int]] = {}  # sequence -> (job, output, start, reused)
        self.stopping = False
        self.cond = threading.Condition()
        self.decoder: Any = None
        self.drop()

    def layers(self) -> list:
        """A fresh cache: the target's layers, then the drafter's."""
        from mlx_lm.models.cache import make_prompt_cache

        return [c for m in self.models for c in make_prompt_cache(m)]

    def status(self) -> dict:
        with self.cond:
            running = len(self.active) + len(self.prefilling)
            return {
                "busy": bool(running),
                "batch": running,
                "max_batch": self.max_batch,
                "queued": len(self.waiting),
                "speculating": bool(self.active) and self.decoder.mode in ("alone", "speculative batch"),
                "mode": self.decoder.mode if self.decoder is not None else "idle",
                "moves": self.decoder.moves if self.decoder is not None else 0,
                "speculative_batch_rounds": self.decoder.spec_rounds if self.decoder is not None else 0,
                "kv_reserved_bytes": self.kv_reserved(),
                "max_kv_bytes": self.max_kv_bytes,
            }

    def kv_need(self, job: Job) -> int:
        """KV cache bytes `job` may come to hold (both models), counted against --max-kv-memory."""
        return (len(job.prompt) + job.max_tokens) * self.kv_per_token

    def kv_reserved(self) -> int:
        return sum(self.kv_need(job) for job, *_ in self.active.values()) + sum(
            self.kv_need(p[0]) for p in self.prefilling
        )

    def submit(self, job: Job) -> None:
        if self.max_kv_bytes is not None and self.kv_need(job) > self.max_kv_bytes:
            raise RequestError(
                400,
                f"this request may need {self.kv_need(job) / 1e9:.2f} GB of KV cache ({len(job.prompt)} prompt "
                f"tokens + max_tokens {job.max_tokens}), over the server's --max-kv-memory of "
                f"{self.max_kv_bytes / 1e9:.2f} GB: ask for fewer tokens or send a shorter prompt",
            )
        with self.cond:
            running = len(self.active) + len(self.prefilling)
            if len(self.waiting) + running > self.max_queue + self.max_batch - 1:
                raise RequestError(
                    503,
                    f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue "
                    f"{self.max_queue}); retry later",
                )
            self.waiting.append(job)
            self.cond.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job`: taken off the queue, or stopped after its next prefill pass or token."""
        job.cancelled.set()
        with self.cond:
            if job in self.waiting:
                self.waiting.remove(job)
            self.cond.notify()

    def stop(self) -> None:
        """End `work`; requests waiting or running are cancelled and answered with an error."""
        with self.cond:
            self.stopping = True
            jobs = [*self.waiting, *(p[0] for p in self.prefilling), *(job for job, *_ in self.active.values())]
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
            schedule=setup.schedule,
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
        while self.active or self.prefilling:
            self.advance()
        return results[0] if results else None

    def work(self) -> None:
        """Decode requests until `stop`."""
        self.fresh_decoder()
        while True:
            with self.cond:
                while not self.waiting and not self.active and not self.prefilling and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                if not self.active and not self.prefilling:  # idle: requests sent together start together
                    deadline = time.monotonic() + self.admit_wait
                    while (left := deadline - time.monotonic()) > 0 and not self.stopping:
                        self.cond.wait(left)
                started = []
                reserved = self.kv_reserved()
                while self.waiting and len(self.active) + len(self.prefilling) + len(started) < self.max_batch:
                    need = self.kv_need(self.waiting[0])
                    busy = self.active or self.prefilling or started
                    if busy and self.max_kv_bytes is not None and reserved + need > self.max_kv_bytes:
                        break  # waits until running requests free their KV memory
                    reserved += need
                    started.append(self.waiting.popleft())
            try:
                for job in started:
                    self.start(job)
                self.advance()
            except Exception as e:  # a bug or an MLX error: answer every request, log, start afresh
                traceback.print_exc()
                failed = [job for job, *_ in self.active.values()] + [p[0] for p in self.prefilling]
                with self.cond:
                    self.active.clear()
                    self.prefilling.clear()
                self.fresh_decoder()
                self.drop()
                self.cache_owner = None
                message = f"generation failed ({type(e).__name__}): the server's log has the details"
                for job in failed:  # the type only: an exception's text may name files
                    job.send("error", (500, message))

    def start(self, job: Job) -> None:
        """Begin `job`'s prefill: alone, on the caches it may reuse a prefix of."""
        if job.cancelled.is_set():
            return
        reused, cache = 0, None
        if self.cache is not None and self.cache_owner is None and not self.active and not self.prefilling:
            reused, cache, self.cache_owner = self.reuse(job), self.cache, job
        with self.cond:
            self.prefilling.append([job, cache or self.layers(), reused, reused, time.perf_counter()])

    def ends(self, job: Job) -> list[int]:
        return pass_ends(len(job.prompt) - 1, job.cuts, self.step)

    def prefill_pass(self, entry: list) -> bool:
        """Feed the next whole prefill pass of a joining job's prompt (`pass_ends`) to its caches, each
        model through the generator's own `_prefill`; True once no whole pass is left."""
        import mlx.core as mx

        from .speculative import _prefill

        job, cache, done = entry[0], entry[1], entry[2]
        ends = self.ends(job)
        end = next(e for e in ends if e > done)
        tokens = mx.array(job.prompt[done:end], mx.uint32)
        at = 0
        for model, count in zip(self.models, self.counts, strict=True):
            _prefill(model, cache[at : at + count], tokens, self.step)
            at += count
        entry[2] = end
        if cache is self.cache:
            self.cached, self.cached_ends = job.prompt[:end], [e for e in ends if e <= end]
        return end == ends[-1]

    def advance(self) -> None:
        """One step: joining requests with no whole prefill pass left join the decoder, the first other one
        gets a prefill pass; then one decoder step; finished or cancelled requests are answered and leave."""
        from .batch import Sequence

        for entry in list(self.prefilling):  # every joining request with no whole pass left joins at once
            job, cache, done, reused, tic = entry
            if job.cancelled.is_set():
                with self.cond:
                    self.prefilling.remove(entry)
                self.finished(None, job, None, tic, reused)
            elif done >= max(self.ends(job), default=0) or (entry is self.prefilling[0] and self.prefill_pass(entry)):
                seq = Sequence(job.prompt, job.max_tokens, job.temp, job.top_p, job.seed, job.logit_bias)
                split = self.counts[0]
                self.decoder.add(seq, cache[:split], cache[split:] or None)
                with self.cond:
                    self.prefilling.remove(entry)
                    self.active[seq] = (job, Output(job, self), tic, reused)
        for event in self.decoder.step():
            if event.sequence in self.active:
                job, output, *_ = self.active[event.sequence]
                if output.add(event.token, event.logprobs, event.from_draft, event.finish) and event.finish is None:
                    self.decoder.remove(event.sequence)  # a stop string ended it
        for seq, (job, output, tic, reused) in list(self.active.items()):
            if job.cancelled.is_set() and output.finish is None:
                self.decoder.remove(seq)
            elif output.finish is None:
                continue
            with self.cond:
                del self.active[seq]
            self.finished(seq, job, output, tic, reused)

    def finished(self, seq: Any, job: Job, output: Output | None, tic: float, reused: int) -> None:
        """Answer a job that ended (cancelled: finish_reason None) and log it."""
        if job is self.cache_owner:
            self.cache_owner = None
            if seq is not None:  # it decoded: its prompt's whole passes are kept (one cancelled during its
                self.keep(job)  # prefill keeps the passes it had, `prefill_pass`)
        tokens = output.tokens if output else 0
        calls = (seq.stats.target_calls + seq.batched_tokens + seq.plain_tokens) if seq else 0
        speculation = {
            "draft_tokens": seq.stats.draft_tokens if seq else 0,
            "accepted_tokens": output.accepted if output else 0,
            "target_calls": calls,
            "tokens_per_target_call": round(tokens / calls, 3) if calls else 0.0,
        }
        finish = output.finish if output else None
        now = time.perf_counter()
        first = output.first if output else None
        timings = {  # from when the request was read: templating, queue, prefill and decoding
            "first_token_seconds": round(first - job.arrived, 3) if first else None,
            "seconds": round(now - job.arrived, 3),
        }
        if self.verbose:
            seconds = now - tic
            click.echo(
                f"{job.id}: {len(job.prompt)} prompt tokens ({reused} reused), {tokens} tokens in {seconds:.2f} s "
                f"({tokens / max(seconds, 1e-9):.1f} tok/s), first token after {timings['first_token_seconds']} s, "
                f"{speculation['tokens_per_target_call']} per target call, {finish or 'cancelled'}",
                err=True,
            )
        result = {
            "finish_reason": finish,
            "prompt_tokens": len(job.prompt),
            "completion_tokens": tokens,
            "cached_tokens": reused,
            "speculation": speculation,
            "timings": timings,
        }
        job.send("done", result)

    def drop(self) -> None:
        """Start from empty caches."""
        self.cache = self.layers() if self.reusable else None
        self.cached, self.cached_ends = [], []

    def reuse(self, job: Job) -> int:
        """Trim the caches to the longest prefix of `job`'s prompt they hold in whole prefill passes
        that end where its own passes end, and return its length.

        A prompt's prefill passes are a function of the prompt alone (`pass_ends`), so where two
        prompts agree on their tokens and on their pass ends up to a point, the passes up to it saw
        the same tokens, the same cached state and the same shapes: the entries are bitwise those
        of a fresh run, and so is the rest of the prefill, in the new prompt's passes from there.
        Entries of a shorter last pass, or written while generating, are never kept (`keep`).
        """
        if self.cache is None:
            return 0
        common = common_prefix(self.cached, job.prompt[:-1])
        reused = 0
        for cached, end in zip(self.cached_ends, self.ends(job), strict=False):
            if cached != end or end > common:
                break
            reused = end
        for layer in self.cache:
            layer.trim(layer.offset - reused)
        self.cached, self.cached_ends = self.cached[:reused], [e for e in self.cached_ends if e <= reused]
        return reused

    def keep(self, job: Job) -> None:
        """After a request, keep in the caches only its prompt's whole prefill passes."""
        if self.cache is None:
            return
        ends = self.ends(job)
        kept = max(ends, default=0)
        if any(layer.offset < kept for layer in self.cache):
            return self.drop()
        for layer in self.cache:
            layer.trim(layer.offset - kept)
        self.cached, self.cached_ends = job.prompt[:kept], ends

    def score(self, token: int, row: Any, top: int) -> tuple[float, list[tuple[bytes, float]]]:
        """The target's logprob of `token` and its `top` most likely tokens, best first."""
        import mlx.core as mx

        best = []
        if top:
            ids = mx.argpartition(-row[: self.vocab], kth=min(top, self.vocab) - 1)[:top]
            pairs = sorted(zip(row[ids].tolist(), ids.tolist(), strict=True), reverse=True)
            best = [(self.token_bytes(i), value) for value, i in pairs]
        return row[token].item(), best


# ---- replies: tool calls and logprobs -------------------------------------------------------


def tool_call(parsed: Any) -> dict:
    """One call as OpenAI gives it, from what a tool parser returned; ValueError if it is not a call."""
    if not isinstance(parsed, dict) or not isinstance(parsed.get("name"), str):
        raise ValueError(f"not a call: {parsed!r}")
    arguments = parsed.get("arguments", {})
    return {
        "id": parsed.get("id") or f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {
            "name": parsed["name"],
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
        },
    }


class Reply:
    """A chat reply split into content and tool calls as mlx-lm's server splits it: text between
    the tokenizer's tool-call markers (mlx-lm's TextStateMachine finds them, however the text
    comes in pieces) goes to mlx-lm's parser for the model's format. `tools` None: all content.
    A call its parser refuses (cut short by max_tokens, malformed) stays in the content as written."""

    def __init__(self, tokenizer: Any, tools: list[dict] | None):
        self.tokenizer, self.tools = tokenizer, tools
        self.on = tools is not None and getattr(tokenizer, "has_tool_calling", False)
        if self.on:
            from mlx_lm.generate import TextStateMachine

            start, end = tokenizer.tool_call_start, tokenizer.tool_call_end
            edges = {"normal": [(start, "tool")], "tool": [(end, "normal")] if end else []}
            self.machine = TextStateMachine
            self.state = TextStateMachine(edges).make_state("normal")
        self.where, self.call, self.calls = "normal", "", 0

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(content, tool calls completed) of the next piece of text."""
        if not self.on:
            return piece, []
        self.state, segments = self.machine.split(self.state, piece)
        return self.take(segments)

    def close(self) -> tuple[str, list[dict]]:
        """(content, tool calls) left at the end: text held back as a possible marker, a call not closed."""
        if not self.on:
            return "", []
        self.state, rest, where = self.machine.flush(self.state)
        content, calls = self.take([(where, rest)])
        if self.where == "tool":
            more, found = self.parse(closed=False)
            content, calls = content + more, calls + found
        return content, calls

    def take(self, segments: list[tuple[str, str]]) -> tuple[str, list[dict]]:
        content, calls = "", []
        for where, text in segments:
            if where == "tool":
                self.call += text
            else:
                if self.where == "tool":
                    more, found = self.parse(closed=True)
                    content, calls = content + more, calls + found
                content += text
            self.where = where
        return content, calls

    def parse(self, closed: bool) -> tuple[str, list[dict]]:
        """The call text so far as calls, or, when the parser refuses it, as content."""
        text, self.call = self.call, ""
        try:
            parsed = self.tokenizer.tool_parser(text, self.tools)
            calls = [tool_call(p) for p in (parsed if isinstance(parsed, list) else [parsed])]
        except Exception:  # parsers raise what they raise on text a model wrote
            end = self.tokenizer.tool_call_end if closed else ""
            return self.tokenizer.tool_call_start + text + (end or ""), []
        self.calls += len(calls)
        return "", calls


def token_text(data: bytes) -> str:
    """A token's text in logprobs: its bytes as UTF-8, or written out ("bytes:\\xe2\\x80") for part of a
    character, so no two such tokens look alike (the `bytes` field holds them exactly)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def token_entry(data: bytes, logprob: float) -> dict:
    """A token of chat logprobs; -9999 stands for -inf (JSON has no infinities), as in OpenAI's API."""
    return {"token": token_text(data), "logprob": max(logprob, -9999.0), "bytes": list(data)}


def logprobs_of(chat: bool, scores: list[Scored] | None) -> dict | None:
    """OpenAI's logprobs of a choice: chat's content list, or the completions' token lists."""
    if scores is None:
        return None
    if chat:
        content = [
            {**token_entry(s.bytes, s.logprob), "top_logprobs": [token_entry(*t) for t in s.top]} for s in scores
        ]
        return {"content": content}
    return {
        "tokens": [token_text(s.bytes) for s in scores],
        "token_logprobs": [max(s.logprob, -9999.0) for s in scores],
        "top_logprobs": [{token_text(b): max(v, -9999.0) for b, v in s.top} for s in scores],
        "text_offset": [s.offset for s in scores],
    }


def choice(
    chat: bool,
    text: str | None,
    finish: str | None,
    whole: bool = False,
    calls: list[dict] | None = None,
    scores: list[Scored] | None = None,
) -> dict:
    """One choice: a chat message (`whole`) or delta, or a completion's text."""
    logprobs = logprobs_of(chat, scores)
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    if whole:
        part = {"message": {"role": "assistant", "content": text if text or not calls else None}}
        if calls:
            part["message"]["tool_calls"] = calls
    else:
        part = {"delta": {"content": text} if text else {}}
        if calls:
            part["delta"]["tool_calls"] = calls
    return {"index": 0, **part, "logprobs": logprobs, "finish_reason": finish}


def finish_reason(result: dict, reply: Reply) -> str | None:
    """The generator's reason, or "tool_calls" for a reply that made calls and ended on its own (as mlx-lm's server)."""
    return "tool_calls" if result["finish_reason"] == "stop" and reply.calls else result["finish_reason"]


def usage(result: dict) -> dict:
    return {
        "prompt_tokens": result["prompt_tokens"],
        "completion_tokens": result["completion_tokens"],
        "total_tokens": result["prompt_tokens"] + result["completion_tokens"],
        "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]},
    }


def sse(data: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---- HTTP -----------------------------------------------------------------------------------


class Notice:
    """A warning on stderr at most once a minute however often it happens, with the count since
    the last one: a flood of bad clients cannot flood the log."""

    def __init__(self, text: str, every: float = 60.0):
        self.text, self.every, self.last, self.count = text, every, -math.inf, 0

    def __call__(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.every:
            again = f" ({self.count} times in the last {self.every:g} s)" if self.count > 1 else ""
            click.echo(f"Warning: {self.text}{again}", err=True)
            self.last, self.count = now, 0


async def read_body(request: Any, seconds: float, gone: Callable[[], None]) -> bytes:
    """The body: at most MAX_BODY_BYTES (413 above, drained so the client reads it), within
    `seconds` (408 after: a client that sends it slowly holds a connection). A client that
    disconnects meanwhile is noted in one line (`gone`)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes: send a shorter request")

    async def receive() -> tuple[bytearray, int]:
        body, size = bytearray(), 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= MAX_BODY_BYTES:
                body += chunk
            elif size > DRAIN_BYTES:
                break
        return body, size

    try:
        body, size = await asyncio.wait_for(receive(), seconds)
    except asyncio.TimeoutError:
        raise RequestError(
            408, f"the request body did not arrive within {seconds:g} s (--read-timeout): send it at once"
        ) from None
    except ClientDisconnect:
        gone()
        raise RequestError(400, "the client disconnected while sending the request") from None
    if size > MAX_BODY_BYTES:
        raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes: send a shorter request")
    return bytes(body)


def parse_json(body: bytes) -> Any:
    """A body as JSON: UTF-8, no NaN or Infinity."""
    try:
        text = body.decode("utf-8")
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


LOCAL_ORIGINS = r"https?://(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?"


@dataclass(frozen=True)
class Origins:
    """Which web pages may call the server from a browser (`--allowed-origins`): "local" (pages
    served from this machine), "*" (any), "none", or a comma-separated list. CORS headers follow
    it, and a POST from any other page is refused: a browser sends a page's `text/plain` POST
    without asking first, so CORS alone would let any page make the server generate."""

    setting: str

    @property
    def listed(self) -> list[str]:
        return {"local": [], "*": ["*"], "none": []}.get(
            self.setting, [o.strip() for o in self.setting.split(",") if o.strip()]
        )

    @property
    def regex(self) -> str | None:
        return LOCAL_ORIGINS if self.setting == "local" else None

    def allow(self, origin: str) -> bool:
        listed = self.listed
        return (
            "*" in listed
            or origin in listed
            or (self.regex is not None and re.fullmatch(self.regex, origin) is not None)
        )


def check_sender(request: Any, origins: Origins) -> None:
    """Refuse a POST from a web page `origins` does not allow (403), and a body not sent as JSON (415)."""
    origin = request.headers.get("origin")
    if origin is not None and not origins.allow(origin):
        shown = origin if len(origin) <= 80 else origin[:80] + "..."
        raise RequestError(
            403,
            f"requests from the web page {shown!r} are refused: start the server with "
            "--allowed-origins naming it to allow them",
        )
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/json":
        shown = media[:80] or "none"
        raise RequestError(415, f"the body is sent as {shown}: send JSON with Content-Type: application/json")


def loopback_host(host: str) -> bool:
    """True when a Host header names this machine: localhost or a loopback address (127.0.0.0/8,
    ::1 in brackets), with or without a port."""
    name = host.strip().lower()
    name = name[1:].partition("]")[0] if name.startswith("[") else name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class LoopbackOnly:
    """ASGI middleware of a server listening on loopback: it answers only requests addressed to a
    loopback name, so a web page cannot reach it by rebinding its own domain's address to
    127.0.0.1; others get a JSON 400."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if not loopback_host(host):
                from starlette.responses import JSONResponse

                shown = host if len(host) <= 80 else host[:80] + "..."
                message = (
                    f"the Host header {shown!r} is not this machine: this server answers requests for "
                    "localhost or a loopback address only (a guard against DNS rebinding)"
                )
                return await JSONResponse(error_body(400, message, None, "invalid_host"), 400)(scope, receive, send)
        await self.app(scope, receive, send)


def refusal(max_connections: int) -> Callable:
    """The ASGI app a connection over the cap gets: a JSON 503 that closes the connection."""

    async def refuse(scope: dict, receive: Callable, send: Callable) -> None:
        from starlette.responses import JSONResponse

        message = f"the server has {max_connections} connections open (--max-connections): retry later"
        headers = {"Retry-After": "1", "Connection": "close"}
        await JSONResponse(error_body(503, message), 503, headers=headers)(scope, receive, send)

    return refuse


def guarded_protocol(read_timeout: float, max_connections: int, refused: Notice, idle: Notice) -> type:
    """uvicorn's h11 protocol with what it lacks against idle and slow clients: each request's
    headers must arrive within `read_timeout` seconds of the connection opening or the last
    answer, or the connection closes (uvicorn waits forever for them); and past
    `max_connections` open connections a new one is answered 503 at once, or closed within
    REFUSE_SECONDS if it sends nothing."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):
        deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            over = len(self.connections) > max_connections
            if over:
                self.app = refusal(max_connections)
                refused()
            self.arm(REFUSE_SECONDS if over else read_timeout)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self.disarm()  # the headers are in; read_body times the body

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.arm(read_timeout)

        def connection_lost(self, exc: Exception | None) -> None:
            self.disarm()
            super().connection_lost(exc)

        def arm(self, seconds: float) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(seconds, self.expire)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            self.deadline = None
            waiting = self.cycle is None or self.cycle.response_complete  # for headers, not on a request
            if waiting and not self.transport.is_closing():
                idle()
                self.transport.close()

    return Guarded


def quiet_accept_errors(listening: socket.socket, out_of_files: Notice) -> Callable:
    """An event-loop exception handler for asyncio's accept() failing for lack of file descriptors:
    asyncio logs a traceback and schedules a retry for each connection it tried (up to the
    backlog) every second; here that is one notice, and the retries still due once the listening
    socket has closed at shutdown are dropped. Anything else is handled as before."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            out_of_files()
        elif listening.fileno() != -1:
            loop.default_exception_handler(context)

    return handle


def create_app(
    engine: Engine,
    names: tuple[str, ...],
    limits: Limits,
    origins: str = "local",
    loopback: bool = True,
    read_timeout: float = 30.0,
    keep_alive: float = KEEP_ALIVE_SECONDS,
) -> Any:
    """The FastAPI app: /v1/chat/completions, /v1/completions, /v1/models, /health.

    `origins`: see `Origins`. Listening on loopback (`loopback`), it answers only requests
    addressed to a loopback name (`LoopbackOnly`). `names[0]` is the served model's id; the
    others are names requests may use for it. A stream waiting for its first token sends an SSE
    comment every `keep_alive` seconds, so clients and proxies do not give up on a long prefill.
    """
    from fastapi import FastAPI, Request
    from fastapi.middleware.cors import CORSMiddleware
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    allowed = Origins(origins)
    gone = Notice("a client disconnected while sending its request")
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    if loopback:
        app.add_middleware(LoopbackOnly)
    if origins != "none":
        app.add_middleware(
            CORSMiddleware,
            allow_origins=allowed.listed,
            allow_origin_regex=allowed.regex,
            allow_methods=["GET", "HEAD", "POST"],
            allow_headers=["*"],
        )
    started = int(time.time())
    served = {"id": names[0], "object": "model", "created": started, "owned_by": "mlx-vocabtrim"}

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else {"Connection": "close"} if e.status == 408 else None
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

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> dict:
        return {"status": "ok", **engine.status()}

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models() -> dict:
        return {"object": "list", "data": [served]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str) -> dict:
        if model not in names:
            raise not_served(model)
        return served

    async def watch(request: Request, job: Job, events: asyncio.Queue) -> None:
        """Cancel `job` once its client disconnects, and wake whoever waits on its events."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(job)
        events.put_nowait(("gone", None))

    async def next_event(events: asyncio.Queue, seconds: float | None = None) -> tuple | None:
        """The job's next event; None after `seconds` without one."""
        try:
            return await asyncio.wait_for(events.get(), seconds)
        except asyncio.TimeoutError:
            return None

    async def complete(request: Request, kind: type[Fields]) -> Any:
        body = await read_body(request, read_timeout, gone)
        check_sender(request, allowed)
        parsed = parse_request(parse_json(body), kind, names, limits)
        arrived = time.perf_counter()
        ids = await run_in_threadpool(prompt_ids, engine.setup.tokenizer, parsed)
        if len(ids) > limits.max_prompt_tokens:
            raise RequestError(
                400,
                f"the prompt is {len(ids)} tokens, over this server's limit of "
                f"{limits.max_prompt_tokens} (--max-prompt-tokens): shorten it",
                "messages" if kind is ChatRequest else "prompt",
            )
        cuts = await run_in_threadpool(prompt_cuts, engine.setup.tokenizer, parsed, ids)  # within the limit only
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
            parsed.top(),
            arrived=arrived,
            cuts=cuts,
        )
        reply = Reply(engine.setup.tokenizer, parsed.template_tools() if chat else None)
        engine.submit(job)
        head = {"id": job.id, "created": int(time.time()), "model": names[0]}

        def reported(scores: list[Scored]) -> list[Scored] | None:
            return None if job.logprobs is None else scores

        if parsed.stream:
            include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
            head["object"] = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text: str, calls: list[dict], scores: list[Scored], made: int) -> str:
                calls = [{"index": made + i, **c} for i, c in enumerate(calls)]
                return sse({**head, "choices": [choice(chat, text, None, calls=calls, scores=reported(scores))]})

            async def chunks():
                watcher = asyncio.create_task(watch(request, job, events))
                try:
                    if chat:
                        first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                        yield sse({**head, "choices": [{**first, "logprobs": None, "finish_reason": None}]})
                    while True:
                        message = await next_event(events, keep_alive)
                        if message is None:
                            yield ": keep-alive\n\n"
                            continue
                        if message[0] != "text":
                            break
                        made = reply.calls
                        text, calls = reply.feed(message[1][0])
                        if text or calls or message[1][1]:
                            yield chunk(text, calls, message[1][1], made)
                    what, value = message
                    if what == "gone":
                        return
                    if what == "error":
                        yield sse(error_body(*value))
                    else:
                        made = reply.calls
                        text, calls = reply.close()
                        if text or calls:
                            yield chunk(text, calls, [], made)
                        last = choice(chat, None, finish_reason(value, reply))
                        extra = {"speculation": value["speculation"], "timings": value["timings"]}
                        yield sse({**head, "choices": [last], **extra})
                        if include_usage:
                            yield sse({**head, "choices": [], "usage": usage(value)})
                    yield "data: [DONE]\n\n"
                finally:
                    watcher.cancel()
                    engine.cancel(job)

            return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        watcher = asyncio.create_task(watch(request, job, events))
        texts, calls, scores = [], [], []
        try:
            while (message := await next_event(events))[0] == "text":
                text, found = reply.feed(message[1][0])
                texts.append(text)
                calls += found
                scores += message[1][1]
        finally:
            watcher.cancel()
            engine.cancel(job)
        what, value = message
        if what == "error":
            raise RequestError(*value)
        if what == "gone":
            return JSONResponse(error_body(400, "the client disconnected"), status_code=400)
        text, found = reply.close()
        whole = choice(chat, "".join(texts) + text, finish_reason(value, reply), True, calls + found, reported(scores))
        return {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [whole],
            "usage": usage(value),
            "speculation": value["speculation"],
            "timings": value["timings"],
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


def model_id(name: str) -> str:
    """The id clients see for --model: a local path's last part (the path itself would show the
    file system), else the name as given (a packaged name or a Hugging Face repo id)."""
    path = Path(name).expanduser()
    return path.resolve().name if path.exists() else name


def connection_cap(wanted: int) -> int:
    """`wanted` connections, or fewer where the open-file limit leaves less (each connection holds
    a file descriptor, and without one accept() fails on every try), with a note saying so."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    cap = max(1, min(wanted, soft - len(os.listdir("/dev/fd")) - FILE_RESERVE))
    if cap < wanted:
        click.echo(
            f"Note: --max-connections {wanted} lowered to {cap}: the open-file limit is {soft} (ulimit -n raises it)",
            err=True,
        )
    return cap


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
    "Requests decoded together (speculative alone; several: a speculative or plain batch, see --batch-speculation).",
)
@click.option(
    "--max-kv-memory",
    type=float,
    default=None,
    help="GB of KV cache (target and drafter) the running requests may hold; each counts its prompt plus "
    "max_tokens, and waits while the batch holds too much [default: 3/4 of memory, less the weights].",
)
@click.option(
    "--batch-speculation",
    default="auto",
    show_default=True,
    help="Speculation inside a batch of several requests: auto (the sizes and draft lengths the pair's "
    "profile measured, `mlx-vocabtrim tune`), off, or SIZES:DRAFTS entries such as 2-4:2,5:1.",
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
    help="Web pages that may call the server from a browser (CORS; POSTs from others are refused): local "
    "(pages served from this machine), * (any), none, or a comma-separated list of origins.",
)
@count_option(
    "--read-timeout",
    30,
    "Seconds a client has to send a request's headers, and again its body (a connection that sends "
    "nothing for that long is closed; a body later than that gets a 408 error).",
)
@count_option(
    "--max-connections",
    100,
    "Open connections at most (more: a 503 error at once); lowered to fit the open-file limit.",
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
    max_kv_memory,
    batch_speculation,
    prefill_step_size,
    allowed_origins,
    read_timeout,
    max_connections,
    verbose,
):
    """OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    on the speculative generator: lossless; up to --max-batch requests decode together, speculative
    alone and inside batches where the pair's profile measured that it pays."""
    import uvicorn

    from .checks import parse_batch_schedule
    from .resolve import context_length, describe_schedule, load_for

    schedule = parse_batch_schedule(batch_speculation)
    if max_kv_memory is not None and not 0 < max_kv_memory < math.inf:
        raise VocabTrimError(f"--max-kv-memory {max_kv_memory} is not a positive number of GB: e.g. --max-kv-memory 8")
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
        if schedule is not None:
            setup.schedule = schedule
        context = context_length(setup.target)
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
            if setup.drafter is not None:
                click.echo(f"Batch speculation: {describe_schedule(setup.schedule)}")
        given = model or DEFAULT_TARGET
        names = tuple(dict.fromkeys((model_id(given), ALIAS, given)))  # the id first; requests may use any
        models = [m for m in (setup.target, setup.drafter) if m is not None]
        kv_limit = default_kv_limit(models) if max_kv_memory is None else int(max_kv_memory * 1e9)
        engine = Engine(
            setup,
            max_queue=max_queue,
            max_batch=max_batch,
            prefill_step=prefill_step_size,
            verbose=verbose,
            max_kv_bytes=kv_limit,
        )
        limits = Limits(max_tokens, max_tokens_limit, max_prompt_tokens, context, engine.vocab)
        loopback = ipaddress.ip_address(sock.getsockname()[0]).is_loopback
        app = create_app(engine, names, limits, allowed_origins, loopback, read_timeout)
        cap = connection_cap(max_connections)
        refused = Notice(f"refused connections over --max-connections {cap}")
        idle = Notice(f"closed connections that sent no request within --read-timeout {read_timeout} s")
        out_of_files = Notice("out of file descriptors accepting connections: raise the limit with ulimit -n")
        config = uvicorn.Config(
            app,
            http=guarded_protocol(read_timeout, cap, refused, idle),
            loop="asyncio",
            log_level="info" if verbose else "warning",
            access_log=verbose,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=3,
            backlog=BACKLOG,
        )
        http = uvicorn.Server(config)

        async def serve_http() -> None:
            asyncio.get_running_loop().set_exception_handler(quiet_accept_errors(sock, out_of_files))
            await http.serve(sockets=[sock])

        def run_http() -> None:
            try:
                asyncio.run(serve_http())
            finally:
                engine.stop()

        sock.listen(BACKLOG)
        thread = threading.Thread(target=run_http, name="http", daemon=True)
        thread.start()
        where = sock.getsockname()
        url = f"http://{f'[{where[0]}]' if ':' in where[0] else where[0]}:{where[1]}"
        drafter = f" with drafter {setup.names[1]}" if setup.drafter is not None else " (no drafter)"
        shown = given if names[0] == given else f"{given} as {names[0]}"
        click.echo(f"Serving {shown}{drafter} at {url}/v1 (up to {max_batch} requests at once; Ctrl-C stops)")
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
