"""`parscale eval`: held-out loss and perplexity of a checkpoint on your own text, with what the
streams do (``parscale.diagnostics.stream_usage``) when P > 1.

The text (a UTF-8 file, or JSONL with one ``{"text": ...}`` document per line) is tokenized with
the model's own tokenizer.json, each document followed by the end-of-text token, concatenated,
and cut into consecutive windows of ``--seq-len`` tokens (default: the window the model trained
with when ``--model`` is a ``parscale train`` run's ``model/``, else the model's context). Every
token after the first is predicted once, from the tokens before it in its window, so the loss is
the mean next-token cross-entropy in nats/token; perplexity is exp of it, and bits per byte
(loss · tokens / (bytes · ln 2)) compares models with different tokenizers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # perplexity of a trained run's model on a text file
  parscale eval --model runs/tiny-p2/model --data notes.txt

  # JSONL documents, windows of 256 tokens, at most 200k tokens, as JSON
  parscale eval --model runs/tiny-p2/model --data docs.jsonl --seq-len 256 --max-tokens 200000 --json

  # a dynamic-P checkpoint at P = 4 (prints the per-stream losses and aggregation weights)
  parscale eval --model runs/p4/model --streams 4 --data held_out.txt
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ._common import add_threads_argument, dtype_type

    p = sub.add_parser("eval", help="held-out loss / perplexity on your text (+ stream usage for P > 1)",
                       epilog=EXAMPLE, formatter_class=HelpFormatter, description=__doc__)
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--data", required=True, metavar="FILE",
                   help="UTF-8 text file, or .jsonl with a 'text' field per line")
    p.add_argument("--tokenizer", help="directory or file with tokenizer.json (default: --model)")
    p.add_argument("--streams", type=int, help="pick a stored stream set P (dynamic P)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the seq_len the model was trained with when "
                        "--model is a `parscale train` run's model/, else its context length)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--field", default="text", help="JSONL field holding the text")
    p.add_argument("--dtype", type=dtype_type(), default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add_threads_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def read_documents(path: str, field: str = "text") -> list[str]:
    """The documents of ``path``: one per JSONL line (``field``), or the whole UTF-8 text file."""
    from ..paths import jsonl_objects
    from ._common import read_text_file

    text = read_text_file(path, f"--data {path}")
    if not path.lower().endswith((".jsonl", ".ndjson")):
        return [text] if text else []
    docs = []
    for lineno, obj in jsonl_objects(text, f"--data {path}"):
        if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
            raise ParScaleError(f"--data {path}:{lineno}: expected an object with a string field {field!r}")
        if obj[field]:
            docs.append(obj[field])
    return docs


def _trained_seq_len(model_dir: str) -> int | None:
    """The window a `parscale train` run trained with, when ``model_dir`` is such a run's model/."""
    from ..training.trainer import CONFIG_NAME, MODEL_DIR

    saved = Path(model_dir).parent / CONFIG_NAME
    if Path(model_dir).name != MODEL_DIR or not saved.is_file():
        return None
    try:
        value = json.loads(saved.read_text(encoding="utf-8")).get("seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value >= 1 else None


def _check(args: argparse.Namespace) -> None:
    from ._common import at_least

    at_least("--seq-len", args.seq_len, 1)
    at_least("--batch-size", args.batch_size, 1)
    at_least("--max-tokens", args.max_tokens, 2)
    at_least("--streams", args.streams, 1)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data.tokenizer import load_tokenizer
    from ..dtypes import torch_dtype
    from ..model import ParScaleForCausalLM
    from ._common import apply_threads, check_checkpoint_path

    _check(args)
    check_checkpoint_path(args.model, "--model")
    docs = read_documents(args.data, args.field)
    if not docs:
        raise ParScaleError(f"--data {args.data}: no text to evaluate")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ParScaleError("--device cuda: no CUDA device is available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    apply_threads(args.threads)
    tok = load_tokenizer(Path(args.tokenizer or args.model))
    model = ParScaleForCausalLM.from_pretrained(args.model, streams=args.streams,
                                                dtype=torch_dtype(args.dtype), device=device)
    cfg = model.config
    seq_len = args.seq_len or _trained_seq_len(args.model) or cfg.max_position_embeddings
    if seq_len > cfg.max_position_embeddings:
        raise ParScaleError(f"--seq-len {seq_len}: longer than the model's context of "
                            f"{cfg.max_position_embeddings} tokens")
    from ._common import available_memory

    need = 2 * args.batch_size * seq_len * cfg.vocab_size * 4 * (cfg.streams + 1)  # float32 logits (+ their loss copy), per stream
    avail = available_memory()
    if device == "cpu" and avail is not None and need > avail:
        raise ParScaleError(f"--seq-len {seq_len} x --batch-size {args.batch_size}: the forward pass needs "
                            f"~{need / 2**30:.1f} GiB, more than the {avail / 2**30:.1f} GiB available; "
                            "lower --batch-size or --seq-len")
    ids: list[int] = []
    for ids_doc in tok.encode_batch(docs):
        ids += ids_doc + [tok.eos_id]
    if args.max_tokens is not None:
        ids = ids[:args.max_tokens]
    if len(ids) < 2:
        raise ParScaleError(f"--data {args.data}: fewer than 2 tokens; nothing to predict")
    if max(ids) >= cfg.vocab_size:
        raise ParScaleError(f"the tokenizer produced id {max(ids)} but the model's vocab_size is "
                            f"{cfg.vocab_size}; pass the model's own --tokenizer")
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)

    tokens = torch.tensor(ids, dtype=torch.long)
    seq_len = min(seq_len, len(ids) - 1)
    # windows of seq_len + 1 tokens that overlap by one: each token after the first is a label once
    starts = list(range(0, len(ids) - 1, seq_len))
    total, count = 0.0, 0
    full_inputs, full_labels = [], []
    with torch.no_grad():
        for lo in range(0, len(starts), args.batch_size):
            group = starts[lo:lo + args.batch_size]
            for length in sorted({min(seq_len, len(ids) - 1 - s) for s in group}):
                rows = [s for s in group if min(seq_len, len(ids) - 1 - s) == length]
                x = torch.stack([tokens[s:s + length] for s in rows])  # b s
                y = torch.stack([tokens[s + 1:s + 1 + length] for s in rows])  # b s, shifted by one
                if length == seq_len:
                    full_inputs.append(x)
                    full_labels.append(y)
                logits = model(x.to(device)).logits
                total += float(torch.nn.functional.cross_entropy(
                    logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum"))
                count += y.numel()
    loss = total / count
    result = {"model": str(args.model), "data": str(args.data), "streams": model.streams,
              "tokens": count, "windows": len(starts), "seq_len": seq_len, "bytes": n_bytes,
              "loss": loss, "perplexity": math.exp(min(loss, 700.0)),
              "bits_per_byte": loss * count / (n_bytes * math.log(2)) if n_bytes else None,
              "units": "nats/token"}
    if model.streams > 1:
        from ..diagnostics import stream_usage

        usage = stream_usage(model, torch.cat(full_inputs), torch.cat(full_labels), batch_size=args.batch_size)
        result["stream_usage"] = usage.to_dict()
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"{args.model} on {args.data}: {count:,} tokens in {len(starts)} window(s) of {seq_len}, P={model.streams}")
    print(f"loss {loss:.4f} nats/token, perplexity {result['perplexity']:.3f}, "
          f"{result['bits_per_byte']:.4f} bits/byte")
    if "stream_usage" in result:
        u = result["stream_usage"]
        losses = ", ".join(f"{x:.4f}" for x in u["stream_losses"])
        weights = ", ".join(f"{x:.3f}" for x in u["mean_weights"])
        print(f"streams (on the {u['tokens']:,} tokens of full windows): model {u['loss']:.4f}, "
              f"uniform mean {u['uniform_mean_loss']:.4f}, each alone {losses} nats/token")
        print(f"  combining gains {u['combination_gain']:+.4f} nats/token over the best single stream; "
              f"mean weights {weights}; weight entropy / ln P {u['entropy_over_lnP']:.3f}; "
              f"{u['share_peaked']:.1%} of tokens peaked on one stream")
    return 0
