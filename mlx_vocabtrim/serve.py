"""`mlx-vocabtrim serve`: mlx-lm's OpenAI-compatible server, with the drafter loaded (and
trimmed) by mlx-vocabtrim and handed to mlx-lm as a TrimmedDraft.

mlx-lm's server already takes a draft model; we swap in its model provider so the drafter
comes from our loader, and its request handler so oversized bodies and unknown model
names get 4xx answers before any work is done. Everything else is mlx-lm's.
"""

import functools
import io
import json
import sys

import click

from .models import DEFAULT_DRAFTER, DEFAULT_TARGET, check_pair, load_model, resolve_model
from .trim import head_rows

MAX_BODY_BYTES = 1 << 20
SERVED_ALIASES = ("default_model",)


def _provider_class(base: type, vocab: str | None, k: int | None) -> type:
    from .generate import trim_with_vocab
    from .mlx_lm_draft import TrimmedDraft

    class TrimmedDraftProvider(base):
        """mlx-lm's ModelProvider whose drafter is loaded, checked and trimmed by mlx-vocabtrim."""

        def _load(self, model_path, adapter_path=None, draft_model_path=None):
            super()._load(model_path, adapter_path, None)
            if draft_model_path is not None:
                draft, draft_tokenizer = load_model(draft_model_path)
                check_pair(self.model, self.tokenizer, draft, draft_tokenizer, model_path, draft_model_path)
                if vocab:
                    trim_with_vocab(draft, self.tokenizer, vocab, k)
                trimmed = getattr(draft, "vocab_remap", None) is not None
                self.draft_model = TrimmedDraft(draft, head_rows(self.model)) if trimmed else draft
                self.is_batchable = False
            self.model_key = (model_path, adapter_path, draft_model_path)

    return TrimmedDraftProvider


def _handler_class(base: type, served: tuple[str, ...]) -> type:
    class GuardedHandler(base):
        """mlx-lm's APIHandler with a body-size limit, a model-name check and our /v1/models."""

        def _error(self, status: int, message: str) -> None:
            self._set_completion_headers(status)
            self.end_headers()
            self.wfile.write(json.dumps({"error": {"message": message, "code": status}}).encode())

        def do_POST(self):
            length = self.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                remaining = min(int(length), 64 * MAX_BODY_BYTES)  # drain so the client reads the answer
                while remaining > 0 and (chunk := self.rfile.read(min(remaining, 1 << 16))):
                    remaining -= len(chunk)
                return self._error(413, f"request body over {MAX_BODY_BYTES} bytes")
            raw = self.rfile.read(int(length)) if length.isdigit() else b""
            try:
                body = json.loads(raw or b"{}")
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None  # mlx-lm answers malformed JSON with its own 400
            model = body.get("model") if isinstance(body, dict) else None
            if model is not None and model not in served:
                return self._error(404, f"model {model!r} is not served here: use one of {', '.join(served)}")
            self.rfile = io.BytesIO(raw)
            return super().do_POST()

        def handle_models_request(self):
            self._set_completion_headers(200)
            self.end_headers()
            data = [{"id": name, "object": "model", "owned_by": "mlx-vocabtrim"} for name in served]
            self.wfile.write(json.dumps({"object": "list", "data": data}).encode())

    return GuardedHandler


@click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--model", default=DEFAULT_TARGET, show_default=True, help="Target model.")
@click.option(
    "--draft-model", default=DEFAULT_DRAFTER, show_default=True, help="Drafter ('none' serves the target alone)."
)
@click.option(
    "--vocab",
    default=None,
    help="Vocab file to trim the drafter with [default: the packaged one for the default pair].",
)
@click.option("--k", type=int, default=None, help="Rows to keep when trimming [default: 16384].")
@click.option("--num-draft-tokens", type=int, default=3, show_default=True, help="Tokens drafted per target call.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=int, default=8080, show_default=True, help="Port to listen on.")
@click.pass_context
def serve(ctx, model, draft_model, vocab, k, num_draft_tokens, host, port):
    """OpenAI-compatible HTTP server (mlx-lm's) with a trimmed drafter; extra flags go to mlx_lm.server."""
    import mlx_lm.server as server

    from .generate import DEFAULT_VOCAB

    if vocab is None and model == DEFAULT_TARGET and draft_model == DEFAULT_DRAFTER:
        vocab = str(DEFAULT_VOCAB)
    target_path = resolve_model(model)
    draft = None if draft_model == "none" else draft_model
    served = (*SERVED_ALIASES, model, target_path)
    server.ModelProvider = _provider_class(server.ModelProvider, vocab, k)
    handler = _handler_class(server.APIHandler, served)
    server._run_http_server = functools.partial(server._run_http_server, handler_class=handler)
    argv = ["mlx_lm.server", "--model", target_path, "--host", host, "--port", str(port),
            "--num-draft-tokens", str(num_draft_tokens), *ctx.args]  # fmt: skip
    if draft is not None:
        argv += ["--draft-model", draft]
    sys.argv = argv
    server.main()
