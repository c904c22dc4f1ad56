"""`femtogpt eval`: a model's loss and bits per character on a whole text.

Like llama.cpp's perplexity tool, every token of the text is scored, once,
deterministically: the text's ids are cut into consecutive, non-overlapping
windows of block_size predictions (the last one shorter), each window's
tokens predicted from the window's earlier tokens only, windows batched B at
a time on every thread. The result is the mean over every token, not an
estimate from random batches.

Why non-overlapping windows and not llama.cpp's scoring of each window's
second half only (or a sliding stride): a window scored whole is exactly what
training's val loss samples (random windows of block_size, every position
scored), so `femtogpt eval` on a run gives that figure without its sampling
noise, every token costs one position of work, and the loss of a token does
not depend on where a window happens to start. A stride would score more
context per token (a lower loss) at block_size / stride times the work.

The text: by default the run's held-out split, the one training evaluated on
(the token cache of the run's own --data, tokenizer and split; reused when it
is still there, rebuilt the same way when not); with --data, the whole of that
file, folder or glob, tokenized with the model's tokenizer.

bits_per_token = loss / ln 2; bits_per_char = loss * tokens / (chars * ln 2),
where tokens are the tokens scored (all but the text's first, which only
serves as context) and chars the characters of the text: the bits the model
needs to encode the text, per character, so runs with different tokenizers
compare.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from ..errors import ConfigError, DataError

from ..model.config import WEIGHT_DTYPES as DTYPES
# Activations of one batch stay below this (the window count adapts to the model).
BATCH_BYTES = 256 << 20
MAX_WINDOWS = 128


def batch_windows(config) -> int:
    """Windows per forward: as many as fit in BATCH_BYTES of activations (a rough
    count per token: each layer's ~16 C floats and its attention rows, the logits
    and their softmax), at most MAX_WINDOWS, at least one."""
    c = config
    per_token = 4 * (c.n_layer * (16 * c.n_embd + c.n_head * c.block_size) + 2 * c.vocab_size)
    return max(1, min(MAX_WINDOWS, BATCH_BYTES // (per_token * c.block_size)))


def window_loss(model, ids, windows_per_batch=None):
    """(mean loss in nats, tokens scored) of model on ids: every id after the first
    predicted once, in non-overlapping windows of block_size predictions."""
    ids = np.asarray(ids)
    n = len(ids) - 1
    if n < 1:
        raise DataError("the text has fewer than 2 tokens: nothing to predict")
    T = model.config.block_size
    B = windows_per_batch or batch_windows(model.config)
    full = n // T
    total = 0.0
    if full:
        x = ids[:full * T].reshape(full, T)
        y = ids[1:full * T + 1].reshape(full, T)
        for start in range(0, full, B):
            xb, yb = x[start:start + B], y[start:start + B]
            total += model.loss(xb, yb) * xb.size
    rest = n - full * T
    if rest:
        total += model.loss(ids[None, full * T:n], ids[None, full * T + 1:]) * rest
    return total / n, n


# --------------------------------------------------------------------------- the text


def _run_settings(path):
    """(run folder, the training settings, the saved data fingerprint) of the run
    that path (a run folder or one of its checkpoints) belongs to."""
    from ..files.rundir import LATEST_NAME, checkpoint_path
    from ..files.tensorfile import TensorFile
    model_file = checkpoint_path(path)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    # The training state has every setting (the cache folder too); a best model
    # has the run's identity (its data and tokenizer).
    latest = os.path.join(folder, LATEST_NAME)
    for candidate in (latest, model_file):
        if os.path.isfile(candidate):
            with TensorFile(candidate) as f:
                meta = f.meta
            settings = meta.get("train_config")
            if isinstance(settings, dict) and isinstance(settings.get("data"), str):
                return folder, settings, (meta.get("data") or {}).get("digest")
    raise ConfigError(f"{path} does not say which text it was trained on: give --data")


def run_split(path, tokenizer, log):
    """(ids, chars, description) of the held-out split of the run at path, from
    the run's token cache: the same split training evaluated."""
    from ..text.token_cache import open_tokens
    folder, settings, digest = _run_settings(path)
    kind = settings.get("tokenizer", tokenizer.kind)
    vocab_size = settings.get("vocab_size")
    cache = settings.get("cache_dir") or ""
    if not cache or not os.path.isdir(cache):
        cache = os.path.join(folder, "cache")
    tokens = open_tokens(settings["data"], kind, vocab_size, tokenizer=tokenizer,
                         cache_dir=cache, prefer_fit=(kind, vocab_size), exclude=[folder],
                         progress=False, log=log)
    if digest is not None and tokens.digest != digest:
        log(f"note: {settings['data']} has changed since the run was trained: this is the "
            f"held-out split of the text as it is now")
    return (np.asarray(tokens.val.read()), int(tokens.val_chars),
            f"the held-out split of {settings['data']}")


def data_text(data, tokenizer):
    """(ids, chars, description) of all of --data (a file, a folder or a glob),
    tokenized with the model's tokenizer."""
    from ..text import corpus
    sources = corpus.list_sources(data)
    text = "".join(block.text for block in corpus.read_blocks(sources))
    ids = tokenizer.encode_array(text, what=f"--data {data}")
    return ids, len(text), corpus.describe(data, sources)


# --------------------------------------------------------------------------- the command


def evaluate(path, data=None, dtype="fp32", threads=0, log=None):
    """The figures `femtogpt eval` prints, as a dict."""
    from .. import _core
    log = log or (lambda message: print(message, file=sys.stderr))
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if threads:
        _core.set_num_threads(threads)
    from ..files import load
    model, tokenizer = load(path, dtype=dtype)
    model.eval()
    if data is None:
        from ..files.hf import is_hf_folder
        if is_hf_folder(path):
            raise ConfigError(f"{path} is a Hugging Face folder, which has no held-out "
                              f"split: give --data")
        ids, chars, described = run_split(path, tokenizer, log)
    else:
        ids, chars, described = data_text(data, tokenizer)
    t0 = time.perf_counter()
    loss, tokens = window_loss(model, ids)
    seconds = time.perf_counter() - t0
    T = model.config.block_size
    return {
        "model": os.path.abspath(path), "data": described, "dtype": dtype,
        "threads": _core.get_num_threads(),
        "loss": loss, "bits_per_token": loss / math.log(2),
        "bits_per_char": loss * tokens / (chars * math.log(2)),
        "perplexity": math.exp(loss), "tokens": tokens, "chars": chars,
        "block_size": T, "windows": -(-tokens // T), "seconds": seconds,
    }


def add_eval_arguments(parser):
    parser.add_argument("--out", metavar="RUN", default="out",
                        help="the model: a run folder (its best model), a checkpoint file or a "
                             "Hugging Face GPT-2 folder (default: out)")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="evaluate on all of this text (a file, a folder or a glob) "
                             "instead of the run's held-out split")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object instead of a line of text")
    parser.add_argument("--dtype", default="fp32", metavar="{fp32,bf16,int8}",
                        help="the type the weights are read in, as `femtogpt sample --dtype`: "
                             "the loss that sampling at that type sees (default: fp32)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="OpenMP threads (default: 0: OMP_NUM_THREADS, else all cores)")


def eval_command(args):
    result = evaluate(args.out, args.data, args.dtype, args.threads)
    if args.json:
        print(json.dumps(result))
    else:
        r = result
        print(f"{r['data']}: loss {r['loss']:.4f} nats/token, {r['bits_per_char']:.4f} bits/char, "
              f"{r['bits_per_token']:.4f} bits/token (perplexity {r['perplexity']:.3f}) over "
              f"{r['tokens']:,} tokens, {r['chars']:,} characters; {r['dtype']}, "
              f"{r['threads']} threads, {r['seconds']:.2f}s")
    return 0
