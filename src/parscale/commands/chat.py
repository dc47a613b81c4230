"""`parscale chat`: an interactive chat with a model's chat template, at any P.

Lines come from stdin (a terminal or a pipe); each is a user message. The conversation is
rendered with the tokenizer's chat template and the reply is printed token by token as it is
decoded (never a broken UTF-8 character). History is kept in the KV cache: each turn prefills
only the tokens after the longest prefix the cache already holds (the re-rendered history can
differ from what was generated where the template re-tokenises a reply; the cache is cut back to
the common prefix then), so a long chat does not pay for its whole history every turn.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

from ..errors import ParScaleError
from ..paths import check_utf8_text

EXAMPLE = """\
examples:
  # chat with a converted SmolLM2 (see docs/chat.md); /reset starts over, /exit or Ctrl-D quits
  parscale chat --model runs/smollm2 --system "You are a concise assistant."

  # sampled replies at P = 4 (a checkpoint holding a P = 4 stream set), per-turn statistics
  parscale chat --model runs/frozen/model --streams 4 --do-sample --temperature 0.7 --top-p 0.9 --stats

  # scripted: one user message per line from a pipe
  printf 'Hi!\\nWhat is 2 + 2?\\n' | parscale chat --model runs/smollm2 --max-new-tokens 64
"""

CAPACITY_STEP = 256  # the cache grows in steps of this many tokens


def register(sub) -> None:
    from ..cli import HelpFormatter
    from ._common import add_kernel_arguments, add_threads_argument, dtype_type

    p = sub.add_parser("chat", help="interactive chat with a model's chat template", epilog=EXAMPLE,
                       formatter_class=HelpFormatter,
                       description="Chat with a model: one user message per stdin line; replies stream as "
                                   "they are decoded; /reset clears the history, /exit (or end of input) quits.")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json + safetensors + tokenizer)")
    p.add_argument("--tokenizer", help="directory with tokenizer.json + tokenizer_config.json (default: --model)")
    p.add_argument("--streams", type=int, help="pick a stored stream set P (dynamic P)")
    p.add_argument("--dtype", type=dtype_type(extra=("auto",)), default=None,
                   help="float32 (default), bfloat16, float16, or auto")
    p.add_argument("--system", help="system message at the start of the conversation")
    add_sampling_args(p)
    add_threads_argument(p)
    p.add_argument("--stats", action="store_true",
                   help="after each reply, print tokens prefilled / reused from the cache and speed to stderr")
    add_kernel_arguments(p)
    p.set_defaults(func=run)


def add_sampling_args(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


@dataclass
class Turn:
    reply: str
    tokens: list[int]  # the reply's tokens (EOS included when it ended the reply)
    finish_reason: str
    prompt_tokens: int  # the whole rendered conversation
    reused_tokens: int  # of those, already in the cache
    wall_s: float


class ChatSession:
    """A multi-turn conversation over one model and tokenizer, its history kept in a KV cache."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_new_tokens: int = 256,
                 reuse_cache: bool = True, **sampling):
        if tokenizer.chat_template is None:
            raise ParScaleError(f"{tokenizer.name}: no chat template (tokenizer_config.json has no "
                                "'chat_template'); this model is not set up for chat")
        if max_new_tokens < 1:
            raise ParScaleError("--max-new-tokens must be >= 1")
        self.model, self.tok, self.system = model, tokenizer, system
        self.max_new_tokens, self.reuse_cache, self.sampling = max_new_tokens, reuse_cache, sampling
        self.context = model.config.max_position_embeddings
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache = None
        self.cached: list[int] = []  # the token ids whose keys/values the cache holds

    def _cache_for(self, ids: list[int]) -> int:
        """Make the cache hold a prefix of ``ids`` with room for the rest and a reply; returns
        how many tokens of ``ids`` it already holds."""
        keep = 0
        if self.cache is not None and self.reuse_cache:
            limit = min(len(self.cached), len(ids) - 1)  # at least one token to prefill
            while keep < limit and self.cached[keep] == ids[keep]:
                keep += 1
        need = len(ids) + self.max_new_tokens
        if keep == 0:
            self.cache = self.model.new_cache(1, -(-need // CAPACITY_STEP) * CAPACITY_STEP)
        else:
            self.cache.truncate(keep)
            if self.cache.capacity < need:
                self.cache.grow(-(-need // CAPACITY_STEP) * CAPACITY_STEP)
        return keep

    def send(self, text: str, on_text=None) -> Turn:
        """Add a user message, generate the reply (``on_text(piece)`` as it is decoded), keep both."""
        import torch

        from ..generation import default_eos_ids, generate

        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True)
        if len(ids) + self.max_new_tokens > self.context:
            raise ParScaleError(f"the conversation ({len(ids)} tokens) plus a reply of up to {self.max_new_tokens} "
                                f"no longer fits the model's context ({self.context}); /reset to start over")
        reused = self._cache_for(ids)
        eos = set(default_eos_ids(self.model, self.tok))
        stream = self.tok.stream_decoder(skip_special_tokens=True)

        def on_token(row, token):
            if on_text is not None and token not in eos:
                piece = stream.put(token)
                if piece:
                    on_text(piece)

        t0 = time.perf_counter()
        device = self.model.model.embed_tokens.weight.device
        out = generate(self.model, torch.tensor([ids], device=device), max_new_tokens=self.max_new_tokens,
                       eos_token_id=sorted(eos), tokenizer=self.tok, streamer=on_token,
                       past_key_values=self.cache, return_dict=True, **self.sampling)
        if on_text is not None:
            rest = stream.flush()
            if rest:
                on_text(rest)
        tokens = out.result.tokens[0]
        reply = self.tok.decode([t for t in tokens if t not in eos], skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": reply}]
        self.cached = ids + tokens[:-1]  # the last token was chosen but never fed to the model
        assert self.cache.length == len(self.cached)
        return Turn(reply, tokens, out.result.finish_reason[0], len(ids), reused, time.perf_counter() - t0)


def sampling_kwargs(args) -> dict:
    """generate()'s sampling arguments from the flags, checked (before any model is loaded)."""
    from ._common import check_sampling_flags

    check_sampling_flags(args)
    return dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    from ..model import ParScaleForCausalLM
    from ..tokenizer import Tokenizer
    from ._common import apply_threads, check_checkpoint_path, kernel_kwargs

    if args.system is not None:
        check_utf8_text(args.system, "--system")
    if args.streams is not None and args.streams < 1:
        raise ParScaleError(f"--streams must be >= 1 (got {args.streams})")
    if args.max_new_tokens < 1:
        raise ParScaleError("--max-new-tokens must be >= 1")
    sampling = sampling_kwargs(args)
    check_checkpoint_path(args.model, "--model")
    tok = Tokenizer.from_pretrained(args.tokenizer or args.model)
    if tok.chat_template is None:
        raise ParScaleError(f"{tok.name}: no chat template (tokenizer_config.json has no 'chat_template')")
    # a template that does not compile or raises on a plain conversation: say so once, up front
    # (not once per input line with exit status 0)
    tok.apply_chat_template(([{"role": "system", "content": args.system}] if args.system else [])
                            + [{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    apply_threads(args.threads)
    model = ParScaleForCausalLM.from_pretrained(args.model, streams=args.streams, dtype=args.dtype,
                                                **kernel_kwargs(args))
    if args.max_new_tokens >= model.config.max_position_embeddings:
        raise ParScaleError(f"--max-new-tokens {args.max_new_tokens}: a reply that long cannot fit the model's "
                            f"context of {model.config.max_position_embeddings} tokens")
    if tok.vocab_size > model.config.vocab_size:
        raise ParScaleError(f"the tokenizer has {tok.vocab_size} ids but the model's vocab_size is "
                            f"{model.config.vocab_size}")
    session = ChatSession(model, tok, system=args.system, max_new_tokens=args.max_new_tokens, **sampling)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"parscale chat: {args.model} at P = {model.streams}; /reset clears the history, /exit quits",
              file=sys.stderr)

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        raw = getattr(sys.stdin, "buffer", sys.stdin).readline()
        if not raw:  # end of input
            return 0
        try:
            line = raw.decode("utf-8") if isinstance(raw, bytes) else check_utf8_text(raw, "input")
        except (UnicodeDecodeError, ParScaleError):
            print("parscale chat: that line is not valid UTF-8 text; skipped", file=sys.stderr)
            continue
        text = line.rstrip("\r\n")
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            session.reset()
            print("parscale chat: history cleared", file=sys.stderr)
            continue
        if not text.strip():
            continue
        try:
            turn = session.send(text, on_text=write)
        except ParScaleError as e:  # e.g. the context is full: say so, keep the session
            print(f"parscale chat: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C stops this reply (it is not kept), not the chat
            print("\nparscale chat: reply interrupted", file=sys.stderr)
            continue
        write("\n")
        if args.stats:
            fed = turn.prompt_tokens - turn.reused_tokens
            print(f"[{turn.prompt_tokens} prompt tokens ({turn.reused_tokens} from the cache, {fed} prefilled), "
                  f"{len(turn.tokens)} new ({turn.finish_reason}), {turn.wall_s:.2f} s, "
                  f"{len(turn.tokens) / max(turn.wall_s, 1e-9):.1f} tok/s]", file=sys.stderr)
