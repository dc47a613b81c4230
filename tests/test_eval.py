"""`parscale eval`: the loss is the mean next-token cross-entropy over every token of the text,
computed here independently (one forward per window, by hand) and compared with the command."""

import json
import math

import pytest
import torch

from parscale import ParScaleConfig, ParScaleForCausalLM
from parscale.cli import main
from parscale.data.tokenizer import TextTokenizer

TEXTS = [f"def f_{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    out = {}
    for P in (1, 3):
        torch.manual_seed(P)
        cfg = ParScaleConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, streams=P, prefix_tokens=2,
                             max_position_embeddings=64)
        d = root / f"p{P}"
        ParScaleForCausalLM(cfg).save_pretrained(d)
        tok.save(d)
        out[P] = d
    return out, tok


def reference_loss(model, ids, seq_len):
    """Sum of -log p(token | its window's earlier tokens) / count, window by window."""
    total, count = 0.0, 0
    for s in range(0, len(ids) - 1, seq_len):
        window = ids[s:s + seq_len + 1]
        with torch.no_grad():
            logits = model(torch.tensor([window[:-1]])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        for t in range(len(window) - 1):
            total -= float(logp[t, window[t + 1]])
            count += 1
    return total / count, count


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("seq_len", [7, 16, 64])
@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_eval_loss_matches_a_hand_computation(tmp_path, capsys, model_dirs, P, seq_len, fmt):
    dirs, tok = model_dirs
    docs = TEXTS[:5]
    if fmt == "txt":
        f = tmp_path / "d.txt"
        f.write_text(docs[0])
        docs = docs[:1]
    else:
        f = tmp_path / "d.jsonl"
        f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    ids = [i for d in docs for i in tok.encode(d) + [tok.eos_id]]
    assert main(["eval", "--model", str(dirs[P]), "--data", str(f), "--seq-len", str(seq_len),
                 "--batch-size", "3", "--threads", "1", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    model = ParScaleForCausalLM.from_pretrained(dirs[P])
    want, count = reference_loss(model, ids, min(seq_len, len(ids) - 1))
    assert got["tokens"] == count == len(ids) - 1
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["units"] == "nats/token"
    if P > 1:
        u = got["stream_usage"]
        assert u["P"] == P and len(u["stream_losses"]) == P
        assert sum(u["mean_weights"]) == pytest.approx(1.0, abs=1e-6)
    else:
        assert "stream_usage" not in got


def test_eval_max_tokens_and_text_report(tmp_path, capsys, model_dirs):
    dirs, _ = model_dirs
    f = tmp_path / "d.txt"
    f.write_text("".join(TEXTS))
    assert main(["eval", "--model", str(dirs[3]), "--data", str(f), "--max-tokens", "50", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 49
    assert main(["eval", "--model", str(dirs[3]), "--data", str(f), "--seq-len", "32"]) == 0
    out = capsys.readouterr().out
    assert "nats/token" in out and "perplexity" in out and "each alone" in out


def test_eval_defaults_to_the_training_window(tmp_path, model_dirs):
    from parscale.commands.eval import _trained_seq_len

    dirs, _ = model_dirs
    assert _trained_seq_len(str(dirs[1])) is None  # not inside a run
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "train_config.json").write_text(json.dumps({"seq_len": 24}))
    assert _trained_seq_len(str(run / "model")) == 24
