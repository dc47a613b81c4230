"""`parscale generate`: complete a prompt with a checkpoint (ours, official ParScale, HF Qwen2/Llama)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # greedy completion with the model's own tokenizer.json
  parscale generate --model runs/demo/model --prompt "def fibonacci(n):" --max-new-tokens 64

  # sample 4 completions at P = 4 (a dynamic-P checkpoint holding several stream sets)
  parscale generate --model runs/frozen/model --streams 4 --prompt "import os" \\
      --do-sample --temperature 0.8 --top-p 0.95 --seed 0 --num-return-sequences 4

  # one chat turn: --prompt is the user message, rendered with the model's chat template
  parscale generate --model runs/smollm2 --chat --prompt "What is the capital of France?"

  # faster on CPU: bfloat16 weights, or weight-only int8 (see docs/inference.md)
  parscale generate --model runs/demo/model --prompt "import os" --dtype bfloat16 --threads 2
  parscale generate --model runs/demo/model --prompt "import os" --quantize int8
  # long outputs: each decode step as one compiled graph (the first step compiles, ~1 min)
  parscale generate --model runs/demo/model --prompt "import os" --dtype bfloat16 --compile-decode
  # fastest steps: weights frozen into the graph for inductor's own matmul kernels (+1 weight copy)
  parscale generate --model runs/demo/model --prompt "import os" --quantize int8 --compile-decode frozen

  # no tokenizer.json: pass token ids, get ids back
  parscale generate --model path/to/ckpt --ids "1 2 3" --max-new-tokens 8
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ._common import add_kernel_arguments, add_threads_argument, dtype_type

    p = sub.add_parser("generate", help="complete a prompt with a checkpoint", epilog=EXAMPLE,
                       formatter_class=HelpFormatter,
                       description="Generate text (or token ids) from a checkpoint directory.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in --model or --tokenizer)")
    src.add_argument("--ids", help="prompt as space-separated token ids")
    p.add_argument("--tokenizer", help="directory or file with tokenizer.json (default: --model)")
    p.add_argument("--chat", action="store_true",
                   help="--prompt is a user message: render it with the tokenizer's chat template, print the reply")
    p.add_argument("--system", help="with --chat: a system message before the prompt")
    p.add_argument("--streams", type=int, help="pick a stored stream set P (dynamic P)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--dtype", type=dtype_type(extra=("auto",)), default=None,
                   help="float32 (default), bfloat16, float16 (fp32/bf16/fp16 accepted), or auto")
    add_threads_argument(p)
    add_kernel_arguments(p)
    p.set_defaults(func=run)


def _tokenizer(path: Path):
    from ..tokenizer import Tokenizer

    f = path / "tokenizer.json" if path.is_dir() else path
    if not f.is_file():
        raise ParScaleError(f"{f}: no tokenizer.json (pass --tokenizer, or --ids instead of --prompt)")
    return Tokenizer.from_pretrained(f)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..generation import default_eos_ids
    from ..model import ParScaleForCausalLM
    from ._common import (apply_threads, check_checkpoint_path, check_generation_budget, check_sampling_flags,
                          check_utf8_text, kernel_kwargs)

    if args.prompt is not None:
        check_utf8_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1:
        raise ParScaleError("--max-new-tokens must be >= 1")
    if args.num_return_sequences < 1:
        raise ParScaleError("--num-return-sequences must be >= 1")
    if args.streams is not None and args.streams < 1:
        raise ParScaleError(f"--streams must be >= 1 (got {args.streams})")
    if args.chat and args.prompt is None:
        raise ParScaleError("--chat needs --prompt (the user message)")
    if args.system is not None and not args.chat:
        raise ParScaleError("--system goes with --chat")
    check_sampling_flags(args)
    check_checkpoint_path(args.model, "--model")
    apply_threads(args.threads)
    tok = None
    if args.prompt is not None:
        tok = _tokenizer(Path(args.tokenizer or args.model))
        if args.chat:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                [{"role": "user", "content": args.prompt}]
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        else:
            ids = tok.encode(args.prompt)
    model = ParScaleForCausalLM.from_pretrained(args.model, streams=args.streams, dtype=args.dtype,
                                                **kernel_kwargs(args))
    if args.prompt is None:
        try:
            ids = [int(x) for x in args.ids.replace(",", " ").split()]
        except ValueError:
            raise ParScaleError(f"--ids must be integers separated by spaces (got {args.ids!r})") from None
    if not ids:
        raise ParScaleError("the prompt is empty")
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise ParScaleError(f"token id {bad[0]} is outside the vocabulary (size {model.config.vocab_size})")
    check_generation_budget(model.config, len(ids), args.max_new_tokens, rows=args.num_return_sequences,
                            device=model.device, dtype_bytes=model.dtype.itemsize)
    eos = default_eos_ids(model, tok)  # every EOS id of the config, generation_config and tokenizer
    out = model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         eos_token_id=eos, num_return_sequences=args.num_return_sequences,
                         return_dict=True)
    for r, new in enumerate(out.result.tokens):
        if args.num_return_sequences > 1:
            print(f"--- sample {r} ({out.result.finish_reason[r]})")
        if tok is not None:
            text = tok.decode([t for t in new if t not in eos], skip_special_tokens=args.chat)
            print(text if args.chat else args.prompt + text)
        else:
            print(" ".join(map(str, ids + new)))
    return 0
