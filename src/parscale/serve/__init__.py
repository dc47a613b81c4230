"""``parscale serve``: an OpenAI-compatible HTTP server with continuous batching and streaming.

``engine`` (the loop that owns the model and steps the running batches), ``protocol`` (OpenAI's
request/response schemas, validated), ``app`` (starlette routes). ``build_app`` wires them for a
loaded model; ``load_tokenizer`` reads the model directory's tokenizer and chat template.
"""

from __future__ import annotations

from ..errors import ParScaleError


def load_tokenizer(path):
    """The model directory's tokenizer (``tokenizer.json``, ``tokenizer_config.json``)."""
    from ..tokenizer import Tokenizer

    return Tokenizer.from_pretrained(path)


def build_app(model, tokenizer, *, model_id: str, max_batch: int = 16, max_queue: int = 64,
              max_tokens_per_request: int = 1024):
    """The ASGI app and its engine for a loaded model (the engine starts with the app, in a thread
    of its own unless ``engine.host()`` was called: then ``engine.run()`` runs it)."""
    from .app import create_app
    from .engine import Engine
    from .protocol import Limits

    if min(max_batch, max_queue, max_tokens_per_request) < 1:
        raise ParScaleError("max_batch, max_queue and max_tokens_per_request must be >= 1")
    from ..generation import default_eos_ids

    cfg = model.config
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue,
                    eos_token_ids=default_eos_ids(model, tokenizer))
    limits = Limits(model_id=model_id, context=cfg.max_position_embeddings, vocab_size=cfg.vocab_size,
                    max_tokens=max_tokens_per_request, max_rows=max_batch,
                    streams=sorted({1, *cfg.stream_sets}), default_streams=model.streams)
    return create_app(engine, limits, tokenizer), engine
