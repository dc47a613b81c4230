import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # deterministic and fair on a shared 2-core machine


def official_config(P=3, *, layers=2, hidden=32, heads=4, kv=2, inter=48, vocab=61, n_tokens=3,
                    smooth=0.1, tie=False, model_type="qwen2_parscale", bias=True):
    c = {"model_type": model_type, "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
         "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
         "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie,
         "max_position_embeddings": 128, "hidden_act": "silu"}
    if model_type == "qwen2_parscale":
        c.update(parscale_n=P, parscale_n_tokens=n_tokens, parscale_attn_smooth=smooth)
    if model_type == "llama":
        c["attention_bias"] = bias
    return c


def official_tensors(c, seed=0, dtype=torch.float64):
    """Random tensors under official/HF names, built from the config alone (not from our model)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.2: (torch.randn(*s, generator=g, dtype=torch.float64) * std).to(dtype)  # noqa: E731
    H, V, I, L = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = H // nh
    bias = c["model_type"] != "llama" or c.get("attention_bias", False)
    W = {"model.embed_tokens.weight": r(V, H, std=1.0), "model.norm.weight": 1 + r(H)}
    if not c["tie_word_embeddings"]:
        W["lm_head.weight"] = r(V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        W[p + "self_attn.q_proj.weight"] = r(nh * hd, H)
        W[p + "self_attn.k_proj.weight"] = r(nkv * hd, H)
        W[p + "self_attn.v_proj.weight"] = r(nkv * hd, H)
        if bias:
            W[p + "self_attn.q_proj.bias"] = r(nh * hd)
            W[p + "self_attn.k_proj.bias"] = r(nkv * hd)
            W[p + "self_attn.v_proj.bias"] = r(nkv * hd)
        W[p + "self_attn.o_proj.weight"] = r(H, nh * hd)
        W[p + "mlp.gate_proj.weight"] = r(I, H)
        W[p + "mlp.up_proj.weight"] = r(I, H)
        W[p + "mlp.down_proj.weight"] = r(H, I)
        W[p + "input_layernorm.weight"] = 1 + r(H)
        W[p + "post_attention_layernorm.weight"] = 1 + r(H)
    P = c.get("parscale_n", 1)
    if P > 1:
        T = c["parscale_n_tokens"]
        for i in range(L):
            W[f"model.layers.{i}.self_attn.prefix_k"] = r(P, nkv, T, hd, std=1.0)
            W[f"model.layers.{i}.self_attn.prefix_v"] = r(P, nkv, T, hd, std=1.0)
        W["model.aggregate_layer.0.weight"] = r(H, P * H)
        W["model.aggregate_layer.0.bias"] = r(H)
        W["model.aggregate_layer.2.weight"] = r(P, H, std=1.0)
        W["model.aggregate_layer.2.bias"] = r(P)
    return W


def write_checkpoint(path: Path, c: dict, W: dict) -> Path:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(c))
    save_file({k: v.contiguous() for k, v in W.items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture
def tiny_config():
    from parscale import ParScaleConfig

    def make(P=1, **kw):
        base = dict(vocab_size=53, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3, streams=P)
        base.update(kw)
        return ParScaleConfig(**base)

    return make


WORDS = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "total", "result", "item",
         "name", "data", "left", "right", "node", "tree"]


def write_corpus(root: Path, n_files: int = 24, seed: int = 0) -> Path:
    """Deterministic Python-like text: learnable structure, ~30 KB, no dependence on the machine."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for _ in range(12):
            lines.append(f"def {rng.choice(WORDS)}_{rng.choice(WORDS)}({', '.join(rng.sample(WORDS, 2))}):")
            for _ in range(rng.randint(2, 4)):
                a, b, c = rng.choice(WORDS), rng.choice(WORDS), rng.choice(WORDS)
                lines.append(f"    {a} = {b} + {c} * {rng.randint(0, 9)}")
            lines.append(f"    return {rng.choice(WORDS)}\n")
        (root / f"mod_{i:02d}.py").write_text("\n".join(lines))
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``: files with their size and mtime, directories by name (a
    directory's mtime moves when an output check probes it with a temporary file)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[str((Path(dirpath) / name).relative_to(root))] = (-1, 0)
        for name in filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def run_cli(argv, capsys):
    """``parscale ARGV`` in-process: (exit status, stdout, stderr)."""
    from parscale.cli import main

    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


class CharTok:
    """A tokenizer for tiny sampling tests: one token per character of ``alphabet``; id
    ``len(alphabet)`` is EOS."""

    def __init__(self, alphabet: str):
        self.alphabet, self.eos_id = alphabet, len(alphabet)

    def encode(self, text):
        return [self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i] for i in ids if i < len(self.alphabet))
