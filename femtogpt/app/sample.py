"""Generate text from a trained model: `femtogpt sample` / `python -m femtogpt.sample`.

Text streams to stdout as it is generated. The model continues the prompt
with a KV cache, so each new token costs one position's work.
"""
import argparse
import codecs
import os
import sys

import numpy as np

from ..errors import ConfigError, DataError
from .guard import run_guarded


def add_sample_arguments(parser):
    parser.add_argument("--out", metavar="DIR", default="out",
                        help="run directory to sample from: its best model, else its latest "
                             "training state (default: out)")
    parser.add_argument("--checkpoint", metavar="FILE", default=None,
                        help="a checkpoint file to sample from instead of --out")
    parser.add_argument("--prompt", default=None,
                        help="text to continue (default: a newline)")
    parser.add_argument("--prompt-file", metavar="FILE", default=None,
                        help="read the prompt from a UTF-8 file")
    parser.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                        help="tokens to generate per sample (default: 500)")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N",
                        help="independent samples to generate (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.8, metavar="X",
                        help="softmax temperature: lower is more predictable, 0 always takes "
                             "the most likely token (default: 0.8)")
    parser.add_argument("--top-k", type=int, default=200, metavar="K",
                        help="sample only from the K most likely tokens (default: 200)")
    parser.add_argument("--top-p", type=float, default=None, metavar="P",
                        help="sample only from the most likely tokens whose probabilities "
                             "add up to P, in (0, 1] (default: off)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed; the same seed gives the same text (default: random)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="OpenMP threads (default: 0: OMP_NUM_THREADS, else all cores)")
    parser.add_argument("--dtype", default="fp32", metavar="{fp32,bf16,int8}",
                        help="the type the weights are read in while sampling, converted "
                             "once at load: fp32 (default), bf16 (half the bytes), int8 "
                             "(a quarter: symmetric per block of 32, as llama.cpp's q8_0). "
                             "Embeddings and LayerNorms stay fp32")
    parser.add_argument("--stats", action="store_true",
                        help="print on stderr at the end: prompt and decode tokens/s, peak "
                             "memory, dtype, threads")


def _check_sample_args(args):
    if args.max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if not args.temperature >= 0.0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    # (in float32, as the core samples: 1e-300 would be 0 there)
    if args.top_p is not None and not 0.0 < np.float32(args.top_p) <= 1.0:
        raise ConfigError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {args.threads}")
    if args.prompt is not None and args.prompt_file is not None:
        raise ConfigError("give --prompt or --prompt-file, not both")
    check_dtype(args.dtype)


def check_dtype(dtype):
    """--dtype of sample and serve: one line naming the choices."""
    from ..model.config import WEIGHT_DTYPES
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(WEIGHT_DTYPES)}")


def stats_line(model, totals):
    """`femtogpt sample --stats`: what llama.cpp prints at the end of a run."""
    import resource
    from .. import _core

    def rate(tokens, seconds):
        return f"{tokens / seconds:,.1f} tok/s" if seconds > 0 else "- tok/s"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    try:
        with open("/proc/self/statm") as f:         # resident pages now (Linux)
            now = f"{int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 2**20:,.0f} MiB, "
    except (OSError, ValueError, IndexError):
        now = ""
    return (f"prompt: {totals['prompt_tokens']:,} tokens in {totals['prompt_seconds']:.3f} s "
            f"({rate(totals['prompt_tokens'], totals['prompt_seconds'])}); "
            f"decode: {totals['decode_tokens']:,} tokens in {totals['decode_seconds']:.3f} s "
            f"({rate(totals['decode_tokens'], totals['decode_seconds'])}); "
            f"memory {now}peak {peak:,.0f} MiB (weights {model.weights_bytes / 2**20:,.0f} MiB); "
            f"dtype {model.weights_dtype}; threads {_core.get_num_threads()}")


def stream_sample(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=200,
                  top_p=None, seed=None, out=None, end="\n"):
    """Print the prompt and its continuation to out as tokens arrive, then end;
    returns the text (without end). `femtogpt serve` streams the same calls."""
    out = out or sys.stdout
    ids = tokenizer.encode(prompt, what="prompt")
    if not ids:
        raise DataError("the prompt is empty; give at least one character")
    # Bytes become text only when a whole character has arrived (byte tokenizer).
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [prompt]
    out.write(prompt)

    def emit(tokens):
        text = decoder.decode(tokenizer.decode_bytes([int(tokens[0])]))
        if text:
            pieces.append(text)
            out.write(text)
            out.flush()

    top_k = None if top_k is None or top_k >= model.config.vocab_size else top_k
    model.generate(np.array([ids], dtype=np.int64), max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, seed=seed, callback=emit)
    tail = decoder.decode(b"", final=True)
    if tail:
        pieces.append(tail)
        out.write(tail)
    if end:
        out.write(end)
    out.flush()
    return "".join(pieces)


def sample_command(args):
    from .. import _core
    from ..files import load
    from ..text.textfile import read_text
    _check_sample_args(args)
    if args.threads:
        _core.set_num_threads(args.threads)
    model, tokenizer = load(args.checkpoint if args.checkpoint is not None else args.out,
                            dtype=args.dtype)
    if args.prompt_file is not None:
        prompt = read_text(args.prompt_file, what="prompt file")
    else:
        prompt = "\n" if args.prompt is None else args.prompt
    seed = args.seed
    if seed is None:
        seed = int(np.random.SeedSequence().entropy % 2**63)
    totals = dict.fromkeys(("prompt_tokens", "prompt_seconds", "decode_tokens",
                            "decode_seconds"), 0)
    for i in range(args.num_samples):
        if i:
            print("---------------")
        stream_sample(model, tokenizer, prompt, args.max_new_tokens, args.temperature,
                      args.top_k, args.top_p, seed + i)
        for key, value in model.last_generate_stats.items():
            totals[key] += value
    if args.stats:
        print(stats_line(model, totals), file=sys.stderr)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m femtogpt.sample",
        description="Generate text from a trained femtogpt model, streaming it to stdout.")
    add_sample_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    args = parser.parse_args(argv)
    return run_guarded(sample_command, args)


if __name__ == "__main__":
    sys.exit(main())
