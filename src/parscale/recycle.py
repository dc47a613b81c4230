"""Recycling a pretrained model into P streams: stream-set prefixes from the model's own keys/values.

A new stream set on a *pretrained* backbone must not damage it. The aggregator starts uniform (its
last layer is zero), so P identical streams would equal the base model exactly; what hurts is the
prefix. Small random prefix keys give attention logits near 0, which on a trained model are large
next to the real keys' logits, so the prefix takes attention mass from the real tokens: +24%
held-out loss on SmolLM2-135M at P = 2 with 48 tokens (docs/recycling.md).

``snippet_prefixes`` instead makes stream p's prefix the backbone's own layer-by-layer keys and
values on a real text snippet p of ``prefix_tokens`` tokens. With the keys rotated to positions
``-T … -1`` (``rope="prepend"``, the default), a query at position i sees prefix slot j at distance
``i + T - j``: RoPE attention depends only on distances, and the snippet's keys/values depend only
on the snippet (causal), so every stream computes *exactly* what the base model computes on
``snippet_p + input``. The recycled model starts as the average of P base models that each read
some other text first — near the base loss — and the streams differ from step one.

Snippets come from the training data (the trainer's ``--init-from``), from the caller, or — when
neither is at hand (``model.add_stream_set(P)`` with no data) — are sampled from the model itself,
starting from its BOS/EOS token.
"""

from __future__ import annotations

from pathlib import Path

import torch
from einops import rearrange

from .errors import ParScaleError

INITS = ("snippets", "random")
ROPE_MODES = ("prepend", "overlap", "none")


def _rotate(k: torch.Tensor, model, positions: torch.Tensor) -> torch.Tensor:
    """RoPE-rotate keys ``r h t d`` to ``positions`` (``t``, may be negative)."""
    from .model import apply_rope

    cos, sin = model.model.rotary(positions[None], k.dtype)  # 1 1 t d
    return apply_rope(k, cos, sin)


@torch.no_grad()
def backbone_kv(model, ids: torch.Tensor, *, rope: str = "prepend") -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's keys and values of the plain backbone (no prefix) on ``ids`` ``r t``:
    two ``l r h t d`` tensors. Keys rotated as ``rope`` says (see the module docstring)."""
    if rope not in ROPE_MODES:
        raise ParScaleError(f"unknown rope mode {rope!r} (use one of {', '.join(ROPE_MODES)})")
    bb = model.model
    r, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    x = bb.embed_tokens(ids)
    cos, sin = bb.rotary(pos.expand(r, t), x.dtype)
    shifted = {"prepend": pos - t, "overlap": pos, "none": None}[rope]
    ks, vs = [], []
    for layer in bb.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        k = rearrange(attn.k_proj(h), "r t (h d) -> r h t d", d=attn.head_dim)  # before RoPE
        ks.append(k if shifted is None else _rotate(k, model, shifted))
        vs.append(rearrange(attn.v_proj(h), "r t (h d) -> r h t d", d=attn.head_dim))
        x = layer(x, cos, sin, (None, True))  # plain causal attention over the snippet alone
    return torch.stack(ks), torch.stack(vs)


@torch.no_grad()
def document_separator(model) -> int | None:
    """The id of the token that ends a document in ``model``'s pretraining text (``<|endoftext|>``
    and the like, by parscale.Tokenizer's rule), read from the tokenizer beside the checkpoint it
    was loaded from (``model.name_or_path``); None when there is none."""
    from .tokenizer import Tokenizer

    path = getattr(model, "name_or_path", None)
    if not path or not (Path(path) / "tokenizer.json").is_file():
        return None
    try:
        sep = Tokenizer.from_pretrained(path).separator_id
    except ParScaleError:
        return None
    return sep if sep is not None and 0 <= sep < model.config.vocab_size else None


def sample_snippets(model, streams: int, tokens: int, *, seed: int = 0,
                    separator: int | None = None) -> torch.Tensor:
    """``streams`` snippets of ``tokens`` token ids ``p t`` sampled (temperature 1) from the plain
    backbone, each starting with the BOS (else EOS, else 0) token. For when no text is at hand.

    With a ``separator`` (the document-end token) each snippet's last token is it, so every stream
    reads the input as a fresh document after another one, as in pretraining: on SmolLM2 that
    takes the start from +0.64% / +3.50% above the base (Shakespeare / Python held-out text, P = 2)
    to +0.18% / +1.23% (docs/recycling.md)."""
    bb, cfg = model.model, model.config
    start = next((t for t in (cfg.bos_token_id, cfg.eos_token_id) if t is not None), 0)
    device = bb.embed_tokens.weight.device
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.full((streams, 1), start, dtype=torch.long, device=device)
    sampled = tokens - 1 if separator is not None and tokens > 1 else tokens
    while ids.shape[1] < sampled:
        s = ids.shape[1]
        x = bb.embed_tokens(ids)
        cos, sin = bb.rotary(torch.arange(s, device=device).expand(streams, s), x.dtype)
        for layer in bb.layers:
            x = layer(x, cos, sin, (None, True))
        logits = model.lm_head(bb.norm(x[:, -1])).float()  # r v
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=g).to(device)
        ids = torch.cat([ids, nxt], dim=1)
    if sampled < tokens:
        ids = torch.cat([ids, ids.new_full((streams, 1), separator)], dim=1)
    return ids[:, :tokens]


def snippet_prefixes(model, streams: int, snippets: torch.Tensor | None = None, *,
                     rope: str = "prepend") -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix keys/values ``l p h t d`` for a new P-stream set: stream p's are the backbone's on
    ``snippets[p]`` (``p t`` token ids with ``t = prefix_tokens``; None: sampled from the model,
    ending with its document separator when its tokenizer names one)."""
    T = model.config.prefix_tokens
    if snippets is None:
        snippets = sample_snippets(model, streams, T, separator=document_separator(model))
    snippets = torch.as_tensor(snippets)
    if snippets.dim() != 2 or tuple(snippets.shape) != (streams, T):
        raise ParScaleError(f"snippets must be token ids of shape (P, prefix_tokens) = ({streams}, {T}); "
                            f"got {tuple(snippets.shape)}")
    if snippets.dtype not in (torch.int32, torch.int64):
        raise ParScaleError(f"snippets must be integer token ids (got {snippets.dtype})")
    if int(snippets.min()) < 0 or int(snippets.max()) >= model.config.vocab_size:
        raise ParScaleError(f"snippets hold token ids outside [0, {model.config.vocab_size})")
    ids = snippets.long().to(model.model.embed_tokens.weight.device)
    return backbone_kv(model, ids, rope=rope)


def snippets_from_tokens(tokens: torch.Tensor, streams: int, length: int) -> torch.Tensor:
    """The first ``streams·length`` ids of a token tensor (any shape, e.g. training windows
    ``b s``), cut into ``p t`` snippets; a ParScaleError when there are too few."""
    flat = torch.as_tensor(tokens).reshape(-1)
    if flat.numel() < streams * length:
        raise ParScaleError(f"need {streams * length} tokens for {streams} snippets of {length}; "
                            f"got {flat.numel()}")
    return rearrange(flat[: streams * length], "(p t) -> p t", p=streams)


# --------------------------------------------------------------------------- adapters
# A frozen-backbone run trains only stream sets; its checkpoints and final model are *adapters*:
# the stream sets, plus the base model's path and a content hash of the base weights, loadable
# onto the base (``from_pretrained(base, adapter=DIR)``, or ``from_pretrained(DIR)``, which
# follows the recorded path and checks the hash). ``merge_adapter`` writes one full checkpoint.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "parscale-adapter"
ADAPTER_VERSION = 1
_STREAM_NAMES = ("prefix_k", "prefix_v", "aggregate_layer.", "parscale.stream_sets.")


def is_adapter(path) -> bool:
    """Whether ``path`` is an adapter directory (``adapter_config.json``, no ``config.json``)."""
    from pathlib import Path

    from .interop import CONFIG_NAME

    p = Path(path)
    return (p / ADAPTER_CONFIG).is_file() and not (p / CONFIG_NAME).is_file()


def weights_hash(path) -> str:
    """sha256 of a checkpoint directory's backbone tensors as stored (names, dtypes, shapes and
    bytes in name order; stream-set tensors excluded, sharding and file layout irrelevant), or
    of a single-file checkpoint's bytes (a GGUF file)."""
    import hashlib
    from pathlib import Path

    from .interop import _IGNORED_SUFFIXES, _restore_zero_biases, read_config, read_tensors

    if Path(path).is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        return h.hexdigest()
    cfg, raw = read_config(path)
    tensors, _ = read_tensors(Path(path))
    if raw.get("parscale_zero_attention_bias"):
        cfg = _restore_zero_biases(cfg, tensors)
    h = hashlib.sha256()
    for name in sorted(tensors):
        if any(s in name for s in _STREAM_NAMES) or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def adapter_base(path) -> tuple[str, str]:
    """The (base path, base hash) an adapter directory records."""
    meta = _read_adapter_config(path)
    return meta["base_model"], meta["base_sha256"]


def _read_adapter_config(path) -> dict:
    import json
    from pathlib import Path

    f = Path(path) / ADAPTER_CONFIG
    try:
        meta = json.loads(f.read_text())
    except FileNotFoundError:
        raise ParScaleError(f"{f}: missing (not an adapter directory)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ParScaleError(f"{f}: not valid JSON ({e})") from None
    keys = ("format", "base_model", "base_sha256", "streams", "prefix_tokens", "agg_smoothing", "stream_sets")
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT or any(k not in meta for k in keys):
        raise ParScaleError(f"{f}: not a parscale adapter config (needs format={ADAPTER_FORMAT!r} and "
                            f"{', '.join(keys[1:])})")
    if meta.get("format_version") != ADAPTER_VERSION:
        raise ParScaleError(f"{f}: format_version {meta.get('format_version')!r}, this parscale reads "
                            f"{ADAPTER_VERSION}")
    return meta


def save_adapter(model, path, *, base: str, base_sha256: str) -> None:
    """Write ``model``'s stream sets (all of them) as an adapter of the base checkpoint ``base``
    (whose backbone tensors hash to ``base_sha256``, see ``weights_hash``). Each file atomically,
    the config last."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from .atomic import atomic_write, atomic_write_text

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"stream_sets.{n}": t.detach().cpu().contiguous().clone()
               for n, t in model.stream_sets.state_dict().items()}
    cfg = model.config
    meta = {"format": ADAPTER_FORMAT, "format_version": ADAPTER_VERSION,
            "base_model": str(Path(base).resolve()), "base_sha256": base_sha256,
            "streams": cfg.streams, "prefix_tokens": cfg.prefix_tokens, "agg_smoothing": cfg.agg_smoothing,
            "stream_sets": cfg.stream_sets, "prefix_only": cfg.prefix_only,
            "dtype": str(model.model.norm.weight.dtype).removeprefix("torch.")}
    atomic_write(path / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(path / ADAPTER_CONFIG, json.dumps(meta, indent=2) + "\n")


def load_adapter(path, *, base=None, streams: int | None = None, dtype=None, device=None, quantize=None,
                 verify: bool = True):
    """The base model (``base``, default: the path the adapter records; a directory or a GGUF
    file) with the adapter's stream sets. The base's weights must hash to the recorded
    ``base_sha256`` (``verify``). ``quantize`` applies to the base (see ``from_pretrained``)."""
    from pathlib import Path

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .interop import load_pretrained
    from .model import StreamSet

    path = Path(path)
    meta = _read_adapter_config(path)
    base = Path(meta["base_model"] if base is None else base)
    if is_adapter(base):
        raise ParScaleError(f"{base}: the base of an adapter must be a full checkpoint, not another adapter")
    if not base.exists():
        raise ParScaleError(f"adapter {path}: its base model {base} does not exist (moved? pass "
                            f"the base explicitly: from_pretrained(BASE, adapter={str(path)!r}))")
    if verify:
        got = weights_hash(base)
        if got != meta["base_sha256"]:
            raise ParScaleError(f"adapter {path}: base model {base} has different weights than the one "
                                f"it was trained on (sha256 {got[:12]}… != {meta['base_sha256'][:12]}…)")
    model = load_pretrained(base, dtype=dtype, device=device, quantize=quantize)
    try:
        tensors = load_file(str(path / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ParScaleError(f"{path / ADAPTER_WEIGHTS}: not a readable safetensors file: {e}") from None
    cfg = model.config
    if model.stream_sets and (cfg.prefix_tokens, cfg.agg_smoothing) != (meta["prefix_tokens"], meta["agg_smoothing"]):
        raise ParScaleError(f"adapter {path}: prefix_tokens/agg_smoothing {meta['prefix_tokens']}/"
                            f"{meta['agg_smoothing']} differ from the base's stream sets' "
                            f"{cfg.prefix_tokens}/{cfg.agg_smoothing}")
    cfg.prefix_tokens, cfg.agg_smoothing = int(meta["prefix_tokens"]), float(meta["agg_smoothing"])
    cfg.prefix_only = cfg.prefix_only or bool(meta.get("prefix_only", False))
    ref = model.model.norm.weight  # the compute dtype (the embedding may be int8)
    sets = sorted({int(n.split(".")[1]) for n in tensors if n.startswith("stream_sets.")})
    if sets != sorted(p for p in meta["stream_sets"] if p > 1 or meta.get("prefix_only")):
        raise ParScaleError(f"{path / ADAPTER_WEIGHTS}: holds stream sets {sets}, "
                            f"{ADAPTER_CONFIG} lists {meta['stream_sets']}")
    with torch.no_grad():
        for P in sets:
            s = StreamSet(cfg, P)
            own = s.state_dict()
            for n, dst in own.items():
                src = tensors.get(f"stream_sets.{P}.{n}")
                if src is None or tuple(src.shape) != tuple(dst.shape):
                    raise ParScaleError(f"{path / ADAPTER_WEIGHTS}: tensor stream_sets.{P}.{n} is missing "
                                        f"or has the wrong shape (expected {tuple(dst.shape)})")
                dst.copy_(src)
            model.stream_sets[str(P)] = s.to(device=ref.device, dtype=ref.dtype)
    cfg.stream_sets = sorted(set(cfg.stream_sets) | set(sets))
    model.set_streams(int(meta["streams"]) if streams is None else streams)
    return model.eval()


def merge_adapter(adapter, out, *, base=None) -> None:
    """Write the base + adapter as one full checkpoint directory ``out`` (official format, the
    stored dtype), with the tokenizer files (tokenizer.json, tokenizer_config.json, a chat template)
    of the adapter, else of the base, and the base's generation_config.json."""
    import shutil
    from pathlib import Path

    from .atomic import atomic_write
    from .paths import ensure_writable_dir

    out = ensure_writable_dir(out, "--out")  # before the base is read and hashed
    if out.resolve() == Path(adapter).resolve():
        raise ParScaleError(f"--out {out}: is the adapter directory itself; choose another directory")
    from .generation_config import GenerationConfig
    from .tokenizer import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

    model = load_adapter(adapter, base=base, dtype="auto")
    base_dir = Path(adapter_base(adapter)[0] if base is None else base)
    if base_dir.is_dir():  # the base's EOS ids (e.g. every end-of-turn token of a chat model)
        model.generation_config = GenerationConfig.load(base_dir, model.config)
    model.save_pretrained(out)
    # the tokenizer with its config (chat template, special tokens): the adapter's, else the base's
    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE):
        src = next((d / name for d in (Path(adapter), base_dir) if (d / name).is_file()), None)
        if src is not None:
            atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
