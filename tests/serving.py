"""Helpers for the serving tests and benchmark: a tiny checkpoint directory with a byte-level BPE
tokenizer and a ChatML chat template, and an in-process server on a free 127.0.0.1 port."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
        "The quick brown fox jumps over the lazy dog. Hello, world! Ünïcödé € 你好\n",
        "import os\nimport sys\nfor i in range(10):\n    print(i, os.getcwd(), sys.argv)\n"] * 20


def write_model_dir(path: Path, *, streams=(2, 4), hidden=32, layers=2, context=128, seed=0,
                    vocab_size=300, chat_template=True, dtype=torch.float32) -> Path:
    """A random ParScale checkpoint (active P = 1, stream sets ``streams``) with its tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from parscale import ParScaleConfig, ParScaleForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      show_progress=False))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"eos_token": "<|im_end|>", "bos_token": None}
    if chat_template:
        config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    cfg = ParScaleConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, prefix_tokens=3,
                         max_position_embeddings=context, streams=1, stream_sets=[1, *streams],
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = ParScaleForCausalLM(cfg).to(dtype)
    with torch.no_grad():  # peakier distributions (greedy varies, sampling is not uniform noise)
        model.model.embed_tokens.weight.mul_(20)
        model.lm_head.weight.mul_(20)
        for s in model.stream_sets.values():
            s.aggregate_layer[2].weight.normal_()
    model.save_pretrained(path)
    return path


class LocalServer:
    """``parscale serve``'s app in a background thread on 127.0.0.1 (a free port)."""

    def __init__(self, model_dir: Path, *, model_id: str = "tiny", dtype=None, **kw):
        import uvicorn

        from parscale import ParScaleForCausalLM
        from parscale.serve import build_app, load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.model = ParScaleForCausalLM.from_pretrained(model_dir, dtype=dtype)
        self.app, self.engine = build_app(self.model, self.tokenizer, model_id=model_id, **kw)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LocalServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def wait_idle(self, timeout: float = 10.0) -> dict:
        """Engine stats once nothing is running, queued or remembered (or after ``timeout``: then
        the stats show what leaked). Rows are released just after their last event is sent, so
        a client can finish a moment before its row is forgotten."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.engine.stats()
            if not (s["running"] or s["queued"] or s["rows"] or s["owned"]) or time.monotonic() > deadline:
                return s
            time.sleep(0.01)
