"""parscale against the official ParScale implementation, side by side on the same weights.

The official code (``modeling_qwen2_parscale.py`` and ``configuration_qwen2_parscale.py`` from
github.com/QwenLM/ParScale or any ParScale checkpoint on the Hub) is a Hugging Face ``transformers``
model written for transformers 4.51; it does not import under transformers 5. So it runs in a
worker process under a Python that has it (``--official-python``), and this script talks to it
over a pipe. Neither the official code nor that Python is a dependency of parscale: without them
the script prints why and exits 0.

For each config (random weights, bench_decode's shapes, 48 prefix tokens) and each P, parscale
builds the model, writes it in the official checkpoint layout (``save_pretrained``), and both
engines load that directory: the same weights, float32, the same threads, batch 1. Per round each
engine

* prefills a ``--prompt``-token prompt (timed: time to first token; the official forward returns
  logits for every prompt position, parscale for the last), then
* runs ``--steps`` single-token decode steps, feeding a fixed token (timed: ms per token), the
  official one through ``forward(past_key_values=...)`` with its own ``ParscaleCache``.

Rounds interleave the engines (each sleeps while the other runs, so idle OpenMP threads stop
spinning) and the minimum over rounds is reported. After the timings, greedy tokens from both
``generate`` calls are compared.

    python benchmarks/bench_official.py --official-dir DIR --official-python /path/to/venv/bin/python
    python benchmarks/bench_official.py --official-dir DIR --official-python PY --configs 33M --streams 1 8 \\
        --variants float32 float32+frozen --threads 2

A Python for the official code: ``python -m venv V && V/bin/pip install torch transformers==4.51.3 einops``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time


# -- the worker: runs under --official-python; only torch, transformers and the official code ---------------------


def _worker(official_dir: str, threads: int) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    # The official modeling file imports its config relatively: load the folder as a package.
    sys.path.insert(0, os.path.dirname(os.path.abspath(official_dir)))
    pkg = os.path.basename(os.path.abspath(official_dir))
    try:
        import transformers

        cls = importlib.import_module(f"{pkg}.modeling_qwen2_parscale").Qwen2ParScaleForCausalLM
    except ImportError as e:  # transformers 5 dropped modules the official code imports
        version = getattr(sys.modules.get("transformers"), "__version__", "not installed")
        sys.stderr.write(f"bench_official: the official code does not import under {sys.executable} "
                         f"(transformers {version}): {e}; pass --official-python, a Python with "
                         "transformers 4.51\n")
        sys.exit(2)

    models = {}
    say = sys.stdout
    say.write(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                          "threads": torch.get_num_threads()}) + "\n")
    say.flush()
    for line in sys.stdin:
        req = json.loads(line)
        with torch.inference_mode():
            if req["op"] == "load":
                m = cls.from_pretrained(req["path"], torch_dtype=torch.float32).eval()
                models[req["key"]] = m
                reply = {"attn": m.config._attn_implementation, "P": m.config.parscale_n}
            elif req["op"] == "time":
                m, ids = models[req["key"]], torch.tensor([req["ids"]])
                tok = ids[:, -1:]
                t0 = time.perf_counter()
                out = m(input_ids=ids, use_cache=True)
                t1 = time.perf_counter()
                pkv = out.past_key_values
                for _ in range(req["steps"]):
                    pkv = m(input_ids=tok, past_key_values=pkv, use_cache=True).past_key_values
                t2 = time.perf_counter()
                reply = {"prefill_ms": (t1 - t0) * 1e3, "ms": (t2 - t1) / req["steps"] * 1e3}
            elif req["op"] == "greedy":
                m, ids = models[req["key"]], torch.tensor([req["ids"]])
                out = m.generate(ids, max_new_tokens=req["n"], min_new_tokens=req["n"], do_sample=False)
                reply = {"tokens": out[0, ids.shape[1]:].tolist()}
            elif req["op"] == "drop":
                models.pop(req["key"], None)
                reply = {}
            else:
                reply = {"error": f"unknown op {req['op']}"}
        say.write(json.dumps(reply) + "\n")
        say.flush()


# -- the parent: parscale, and the worker behind a pipe -----------------------------------------------------------


class Official:
    """The official engine in its worker process."""

    def __init__(self, python: str, official_dir: str, threads: int):
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--worker", official_dir,
                                      "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"bench_official: the official worker exited (code {self.proc.wait()}); "
                             "its error is above")
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-dir", help="a folder holding modeling_qwen2_parscale.py and "
                                           "configuration_qwen2_parscale.py (the official code)")
    ap.add_argument("--official-python", default=sys.executable,
                    help="a Python with torch and transformers 4.51 for the official code (default: this one)")
    ap.add_argument("--configs", nargs="+", default=["174M", "33M"])
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=["float32", "float32+frozen"],
                    help="parscale variants (bench_decode's names: float32 / bfloat16 / int8, optionally "
                         "+prepack, +torchmm, +compile or +frozen); the official engine runs float32")
    ap.add_argument("--threads", type=int, default=0, help="threads for both engines (0: torch's default)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timing")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--check", type=int, default=16, help="greedy tokens compared between engines (0: skip)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.threads)
        return 0
    files = ("modeling_qwen2_parscale.py", "configuration_qwen2_parscale.py")
    if not args.official_dir or not all(os.path.isfile(os.path.join(args.official_dir, f)) for f in files):
        print(f"bench_official: skipped (needs --official-dir, a folder with {' and '.join(files)})")
        return 0
    if not os.access(args.official_python, os.X_OK):
        raise SystemExit(f"bench_official: --official-python {args.official_python} is not an executable")

    import platform
    import tempfile

    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_decode import CONFIGS, load

    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"bench_official: unknown config {unknown[0]} (choose from {', '.join(CONFIGS)})")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    pkg = tempfile.mkdtemp(prefix="bench_official-")  # the two files as a package: they import relatively
    os.mkdir(os.path.join(pkg, "official_parscale"))
    for f in files + ("__init__.py",):
        src = os.path.join(args.official_dir, f)
        with open(os.path.join(pkg, "official_parscale", f), "w") as out:
            out.write(open(src).read() if os.path.exists(src) else "")
    off = None
    try:
        off = Official(args.official_python, os.path.join(pkg, "official_parscale"), threads)
        print(f"bench_official: parscale on torch {torch.__version__}; official code on torch {off.info['torch']}, "
              f"transformers {off.info['transformers']}; {platform.processor() or platform.machine()}, "
              f"threads {threads} / {off.info['threads']}; {load()}")
        for name in args.configs:
            _run_config(name, args, off)
        print(f"\n{load()}")
    finally:
        if off is not None:
            off.close()
        shutil.rmtree(pkg, ignore_errors=True)
    return 0


def _run_config(name: str, args, off: Official) -> None:
    import tempfile

    import torch
    from bench_decode import CONFIGS, load, variants
    from bench_llamacpp import Parscale, timed

    from parscale import ParScaleConfig, ParScaleForCausalLM

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIGS[name]["vocab_size"], (args.prompt,), generator=g).tolist()
    engines = []  # (label, P, time function, greedy function)
    keep = []
    with tempfile.TemporaryDirectory() as tmp:
        for P in args.streams:
            torch.manual_seed(P)
            cfg = ParScaleConfig(**CONFIGS[name], prefix_tokens=48, streams=P, max_position_embeddings=4096)
            model = ParScaleForCausalLM(cfg).eval()
            path = os.path.join(tmp, f"P{P}")
            model.save_pretrained(path)
            base = ParScaleForCausalLM.from_pretrained(path).eval()
            key = f"{name}-P{P}"
            info = off.ask(op="load", key=key, path=path)
            engines.append((f"official (attn {info['attn']})", P,
                            lambda k=key: off.ask(op="time", key=k, ids=ids, steps=args.steps),
                            lambda n, k=key: off.ask(op="greedy", key=k, ids=ids, n=n)["tokens"]))
            for v, m in variants(base, args.variants).items():
                keep.append(m)
                ours = Parscale(m, v, P)
                engines.append((f"parscale {v}", P,
                                lambda e=ours: dict(zip(("prefill_ms", "ms"), timed(e, ids, args.steps))),
                                lambda n, e=ours: e.greedy(ids, n, exact=True)))
            del model, base
    nonemb = keep[0].num_parameters(non_embedding=True) if keep else float("nan")
    print(f"\n== {name}: {nonemb / 1e6:.1f}M non-embedding params, float32 weights, batch 1, "
          f"{args.prompt}-token prompt; {load()}")
    first = {}
    for label, P, fn, _ in engines:  # warm-up: compiled variants compile here
        t0 = time.perf_counter()
        fn()
        first[(label, P)] = time.perf_counter() - t0
        time.sleep(0.3)
    times = {(label, P): [] for label, P, _, _ in engines}
    for _ in range(args.rounds):
        for label, P, fn, _ in engines:
            times[(label, P)].append(fn())
            time.sleep(0.3)
    best = {k: (min(r["prefill_ms"] for r in v), min(r["ms"] for r in v)) for k, v in times.items()}
    print(f"min of {args.rounds} rounds × {args.steps} decode steps")
    print(f"{'engine':<34} {'P':>2} {'ms/token':>9} {'official ÷ this':>16} {'÷ own P=1':>10} "
          f"{'prefill ms':>11} {'warm-up s':>10}")
    offl = {P: best[(lb, P)][1] for lb, P, _, _ in engines if lb.startswith("official")}
    for label, P, _, _ in engines:
        pf, ms = best[(label, P)]
        own1 = best.get((label, min(args.streams)), (0, float("nan")))[1]
        print(f"{label:<34} {P:>2} {ms:>9.2f} {offl[P] / ms:>16.2f} {ms / own1:>10.2f} {pf:>11.1f} "
              f"{first[(label, P)]:>10.1f}")
    if args.check:
        print(f"greedy tokens ({args.check}, generate with do_sample=False), each against the official engine's:")
        ref = {}
        for label, P, _, greedy in engines:
            got = greedy(args.check)
            if label.startswith("official"):
                ref[P] = got
                continue
            lead = next((i for i, (a, b) in enumerate(zip(ref[P], got)) if a != b), len(got))
            print(f"  {label:<32} P={P}: first {lead} of {len(got)} tokens identical")
    for label, P, _, _ in engines:
        if label.startswith("official"):
            off.ask(op="drop", key=f"{name}-P{P}")


if __name__ == "__main__":
    sys.exit(main())
