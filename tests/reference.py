"""An independent, deliberately naive ParScale forward pass over official checkpoint tensors.

It shares no code with ``parscale.model``: it reads the official tensor names
(``model.layers.{i}.self_attn.prefix_k`` ...) and loops over samples, streams, heads and query
positions, attending each stream to ``[its prefix, tokens]`` with an explicit mask and softmax.
Used by the tests as the ground truth for the fast path.
"""

from __future__ import annotations

import math

import torch


def _rms(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _freq_divisor(freq, scaling):
    """Llama-3 RoPE scaling as llama.cpp writes it (a divisor per frequency), in scalar math."""
    if not scaling:
        return 1.0
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freq
    if wavelen < orig / hi:
        return 1.0
    if wavelen > orig / lo:
        return factor
    smooth = (orig / wavelen - lo) / (hi - lo)
    return 1 / ((1 - smooth) / factor + smooth)


def _rope(x, pos, theta, scaling=None):
    # x: (n_heads, d) at integer position pos; rotate pairs (i, i + d/2) by pos·theta^(-2i/d)
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        freq = theta ** (-2 * i / d)
        ang = pos * freq / _freq_divisor(freq, scaling)
        c, s = math.cos(ang), math.sin(ang)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * c - b * s
        out[..., i + d // 2] = b * c + a * s
    return out


def reference_logits(W: dict[str, torch.Tensor], c: dict, ids: torch.Tensor, mask: torch.Tensor | None = None):
    """Logits ``b s v`` (positions where mask == 0 are left as zeros)."""
    B, S = ids.shape
    P = c.get("parscale_n", 1)
    L, nh, nkv = c["num_hidden_layers"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // nh
    eps, theta, smooth = c["rms_norm_eps"], c["rope_theta"], c.get("parscale_attn_smooth", 0.01)
    bias = c.get("attention_bias", c["model_type"] not in ("llama", "qwen3"))
    qk_norm = c["model_type"] == "qwen3" or c.get("qk_norm", False)
    scaling = c.get("rope_scaling")
    mask = torch.ones(B, S, dtype=torch.long) if mask is None else mask
    lm_head = W["model.embed_tokens.weight"] if c["tie_word_embeddings"] else W["lm_head.weight"]
    out = torch.zeros(B, S, lm_head.shape[0], dtype=lm_head.dtype)
    for b in range(B):
        real = [j for j in range(S) if mask[b, j]]
        pos = {j: n for n, j in enumerate(real)}  # positions from the first real token
        finals = []
        for p in range(P):
            x = W["model.embed_tokens.weight"][ids[b, real]]  # only the real tokens
            n = len(real)
            for li in range(L):
                pre = f"model.layers.{li}."
                h = _rms(x, W[pre + "input_layernorm.weight"], eps)
                proj = lambda name: h @ W[pre + f"self_attn.{name}.weight"].T + (  # noqa: E731
                    W[pre + f"self_attn.{name}.bias"] if bias else 0)
                q = proj("q_proj").view(n, nh, hd)
                k = proj("k_proj").view(n, nkv, hd)
                v = proj("v_proj").view(n, nkv, hd)
                if qk_norm:  # Qwen3: each head's vector normalised on its own
                    q = torch.stack([_rms(q[:, j], W[pre + "self_attn.q_norm.weight"], eps) for j in range(nh)], 1)
                    k = torch.stack([_rms(k[:, j], W[pre + "self_attn.k_norm.weight"], eps) for j in range(nkv)], 1)
                q = torch.stack([_rope(q[t], pos[real[t]], theta, scaling) for t in range(n)])
                k = torch.stack([_rope(k[t], pos[real[t]], theta, scaling) for t in range(n)])
                att = torch.zeros(n, nh, hd, dtype=x.dtype)
                for head in range(nh):
                    g = head // (nh // nkv)
                    K, V = k[:, g], v[:, g]
                    if P > 1:
                        K = torch.cat([W[pre + "self_attn.prefix_k"][p, g], K])
                        V = torch.cat([W[pre + "self_attn.prefix_v"][p, g], V])
                    n_pre = K.shape[0] - n
                    for t in range(n):
                        keys = list(range(n_pre)) + [n_pre + j for j in range(t + 1)]
                        scores = torch.stack([q[t, head] @ K[j] for j in keys]) / math.sqrt(hd)
                        w = torch.softmax(scores, dim=0)
                        att[t, head] = sum(w[i] * V[j] for i, j in enumerate(keys))
                x = x + att.reshape(n, nh * hd) @ W[pre + "self_attn.o_proj.weight"].T
                h = _rms(x, W[pre + "post_attention_layernorm.weight"], eps)
                gate = h @ W[pre + "mlp.gate_proj.weight"].T
                up = h @ W[pre + "mlp.up_proj.weight"].T
                x = x + (torch.nn.functional.silu(gate) * up) @ W[pre + "mlp.down_proj.weight"].T
            finals.append(_rms(x, W["model.norm.weight"], eps))
        if P > 1:
            hs = torch.stack(finals, dim=-1)  # n h p
            z = hs.reshape(hs.shape[0], -1)  # feature index h·P + p
            a = torch.nn.functional.silu(z @ W["model.aggregate_layer.0.weight"].T + W["model.aggregate_layer.0.bias"])
            w = torch.softmax((a @ W["model.aggregate_layer.2.weight"].T + W["model.aggregate_layer.2.bias"]).float(), -1)
            w = w * (1 - smooth) + smooth / P
            final = (hs * w[:, None, :]).sum(-1).to(hs.dtype)
        else:
            final = finals[0]
        out[b, real] = final @ lm_head.T
    return out
