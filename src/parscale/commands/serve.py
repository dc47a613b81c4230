"""`parscale serve`: an OpenAI-compatible HTTP server (continuous batching, streaming) for a checkpoint."""

from __future__ import annotations

import argparse
import signal
import socket

from ..errors import ParScaleError

EXAMPLE = """\
examples:
  # serve a checkpoint (config.json + safetensors + tokenizer.json [+ tokenizer_config.json])
  parscale serve --model runs/demo/model --port 8000

  # then, from another shell: a completion, and a streamed chat completion at P = 4
  curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
      -d '{"model": "model", "prompt": "def fibonacci(n):", "max_tokens": 32, "temperature": 0}'
  curl -sN http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "model", "messages": [{"role": "user", "content": "Hi"}], "stream": true, "streams": 4}'

  # a dynamic-P checkpoint, 32 rows per batch, at most 256 new tokens per request
  parscale serve --model runs/frozen/model --streams 2 --max-batch 32 --max-tokens-per-request 256

  # int8, each decode step one frozen compiled graph (compiled at start-up, before it listens)
  parscale serve --model runs/smollm2 --quantize int8 --compile-decode frozen

SIGTERM or Ctrl-C stops accepting connections, finishes the running requests, then exits.
"""


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ._common import add_kernel_arguments, add_threads_argument, dtype_type

    p = sub.add_parser("serve", help="serve a checkpoint over OpenAI's HTTP API", epilog=EXAMPLE,
                       formatter_class=HelpFormatter,
                       description="An OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health) with continuous batching and streaming. Requests may "
                                   "pick a stored stream set with the extension field \"streams\".")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors + tokenizer.json)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send as \"model\" (default: the directory's name)")
    p.add_argument("--streams", type=int, default=None, help="default stream set P (default: the checkpoint's)")
    p.add_argument("--dtype", type=dtype_type(extra=("auto",)), default=None,
                   help="float32 (default), bfloat16, float16 (fp32/bf16/fp16 accepted), or auto")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together (all requests, all P)")
    p.add_argument("--max-tokens-per-request", type=int, default=1024, help="largest max_tokens a request may ask")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for rows (admitted at the next step); beyond it: HTTP 429")
    add_threads_argument(p)
    add_kernel_arguments(p)
    p.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                   help="with --compile-decode: do not compile the decode steps (batches of 1 and 2 at the "
                        "default P) before taking requests; the first requests compile them instead")
    p.set_defaults(func=run)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (uvicorn listens on it); one-line errors for a host that
    does not resolve and an address that cannot be bound (in use, not this machine's)."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ParScaleError(f"--host {host}: cannot resolve it ({getattr(e, 'strerror', None) or e})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ParScaleError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock


def _serve(server, sock: socket.socket, engine) -> None:
    """uvicorn in a thread, the engine's loop in this one (the thread that loaded the model: see
    ``Engine.host``) until the server has stopped and the engine has drained. SIGTERM or Ctrl-C
    stops the server taking connections (a second Ctrl-C: without waiting for open ones)."""
    import threading

    ended: list[BaseException] = []

    def http() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as e:  # uvicorn's sys.exit on a failed start-up included
            ended.append(e)
        finally:  # however uvicorn ends, the engine drains and returns
            engine.shutdown(timeout=0)

    def stop(signum, frame) -> None:
        server.force_exit = server.should_exit
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=http, name="uvicorn")
    try:
        engine.host()
        thread.start()
        engine.run()
        server.should_exit = True  # the loop ended on its own (an engine bug): stop taking requests too
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if ended:
        e = ended[0]
        raise ParScaleError(f"the HTTP server stopped: {e if not isinstance(e, SystemExit) else 'start-up failed'}")


def run(args: argparse.Namespace) -> int:
    from ._common import apply_threads, at_least, check_checkpoint_path, kernel_kwargs

    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                        ("--max-tokens-per-request", args.max_tokens_per_request, 1), ("--port", args.port, 0),
                        ("--streams", args.streams, 1)):
        at_least(flag, v, lo)
    if args.port > 65535:
        raise ParScaleError(f"--port must be <= 65535 (got {args.port})")
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ParScaleError("--served-model-name must not be empty")
    model_dir = check_checkpoint_path(args.model, "--model")
    if not (model_dir / "tokenizer.json").is_file():
        raise ParScaleError(f"{model_dir}: no tokenizer.json (the server needs the model's tokenizer; "
                            "for a .gguf file run `parscale convert` first)")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise ParScaleError("needs the serve extra: pip install 'parscale[serve]'") from None
    import torch

    from ..model import ParScaleForCausalLM
    from ..serve import build_app, load_tokenizer

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ParScaleError(f"--device: unknown device {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParScaleError("--device cuda: no CUDA device is available")
    if device.type == "cpu":
        apply_threads(args.threads)
    sock = _bind(args.host, args.port)  # a taken port or an unknown host: said before the model loads
    try:
        tokenizer = load_tokenizer(model_dir)
        model = ParScaleForCausalLM.from_pretrained(model_dir, streams=args.streams, dtype=args.dtype,
                                                    device=device, **kernel_kwargs(args))
        name = args.served_model_name or model_dir.resolve().name
        if args.compile_decode and args.warm_up:
            from .. import generation

            print(f"parscale serve: compiling the decode steps (P={model.streams}, batches of 1 and 2) before "
                  "taking requests ...", flush=True)
            times = generation.warm_up(model)
            print(f"parscale serve: compiled in {sum(times.values()):.0f} s", flush=True)
        app, engine = build_app(model, tokenizer, model_id=name, max_batch=args.max_batch, max_queue=args.max_queue,
                                max_tokens_per_request=args.max_tokens_per_request)
        port = sock.getsockname()[1]  # --port 0: the one the system chose
        print(f"parscale serve: {name} (P={model.streams}, stream sets {sorted({1, *model.config.stream_sets})}, "
              f"{device}, torch threads: {torch.get_num_threads()}) on http://{args.host}:{port}/v1", flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                               timeout_graceful_shutdown=None))
        _serve(server, sock, engine)
    finally:
        sock.close()
    print("parscale serve: drained, exiting", flush=True)
    return 0
