"""The sampling benchmarks' shared first step: a tiny model trained on an offline task's training
text (evaluation problems held out), or the one a previous run left in ``OUT/train/model``."""

from __future__ import annotations

import time
from pathlib import Path

from parscale import ParScaleForCausalLM
from parscale.data.tokenizer import load_tokenizer
from parscale.sampling import write_training_corpus
from parscale.training.options import TrainConfig
from parscale.training.trainer import train


def task_model(task, out: Path, held, *, difficulty: int, train_problems: int, train_tokens: int, threads: int,
               size: str = "small", seq_len: int = 64, batch_size: int = 32, eval_every: int = 500):
    """(model, tokenizer) for ``task``: trained here on ``train_problems`` problems (seed 0) that
    exclude ``held``, unless ``out/train/model`` already holds one."""
    model_dir = out / "train" / "model"
    if not (model_dir / "config.json").exists():
        corpus = out / f"{task.name}.jsonl"
        write_training_corpus(task, train_problems, seed=0, difficulty=difficulty, path=corpus,
                              exclude=[p.prompt for p in held])
        cfg = TrainConfig(data=str(corpus), out=str(out / "train"), size=size, vocab_size=320, seq_len=seq_len,
                          batch_size=batch_size, tokens=train_tokens, lr=3e-3, min_lr=3e-4, warmup_steps=50,
                          eval_every=eval_every, checkpoint_every=500, prefix_tokens=8, threads=threads,
                          resume=True)
        t0 = time.perf_counter()
        res = train(cfg)
        print(f"trained {res.params:,} non-embedding params on {res.tokens:,} tokens in "
              f"{time.perf_counter() - t0:.0f} s; val loss {res.val_loss:.3f}")
    return ParScaleForCausalLM.from_pretrained(model_dir), load_tokenizer(model_dir)
