#!/usr/bin/env python
"""GPT-2 124M's shape: sampling speed beside transformers, and GPT-2 tokenizer speed.

    python scripts/gpt2_probe.py [--rounds 3] [--tokens 100] [--threads 2]

Sampling: femtogpt's generate (KV cache) and transformers' GPT2LMHeadModel
.generate (its KV cache, do_sample) on random weights of GPT-2 124M's shape,
batch 1, from a one-token prompt, each in its own process, rounds alternated;
tokens per second, median. (Training steps at this shape are bench.py's
`--presets gpt2-t256,gpt2-t1024 --vs-torch`.) Tokenizer: femtogpt's GPT-2
tokenizer encoding Tiny Shakespeare (1.1 MB) on one thread, MB/s, beside the
`tokenizers` library's where installed; the vocabulary is a byte-level BPE of
--vocab merges learned from the text by `tokenizers` (no download: GPT-2's own
files are the user's). Needs torch and transformers for the sampling side.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "femtogpt", "data", "tinyshakespeare.txt")

_FEMTO = r"""
import json, sys, time, numpy as np
from femtogpt import GPT, GPTConfig
n = int(sys.argv[1])
m = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                  bias=True, gelu="tanh"), seed=0)
m.eval()
prompt = np.array([[50256]])
m.generate(prompt, 4, temperature=1.0, seed=0)
t0 = time.perf_counter(); m.generate(prompt, n, temperature=1.0, seed=1)
print(json.dumps({"tokens_per_s": n / (time.perf_counter() - t0)}))
"""

_HF = r"""
import json, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
n, threads = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(threads)
m = GPT2LMHeadModel(GPT2Config()).eval()
ids = torch.tensor([[50256]])
kw = dict(do_sample=True, pad_token_id=50256)
with torch.no_grad():
    m.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
print(json.dumps({"tokens_per_s": n / (time.perf_counter() - t0)}))
"""


def run(code, *args, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=3600, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens_per_s"]


def tokenizer_speed(vocab, threads=1, repeat=10):
    """GPT-2-style tokenizer encoding Tiny Shakespeare (repeated `repeat` times),
    femtogpt on `threads` OpenMP threads against `tokenizers` on one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from femtogpt import _core
    from femtogpt.text.gpt2 import GPT2Tokenizer, gpt2_pattern
    text = open(TEXT, encoding="utf-8").read()
    folder = tempfile.mkdtemp()
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf.model.save(folder)
    ours = GPT2Tokenizer.from_files(os.path.join(folder, "vocab.json"),
                                    os.path.join(folder, "merges.txt"))
    gpt2_pattern()          # built once per process; not part of encoding
    ours.encode_array("warm: the class tables are built on first use " * 1000)
    text = text * repeat
    mb = len(text.encode("utf-8")) / 1e6
    previous = _core.get_num_threads()
    _core.set_num_threads(threads)
    t0 = time.perf_counter()
    ids = ours.encode_array(text)
    ours_s = time.perf_counter() - t0
    _core.set_num_threads(previous)
    os.environ["RAYON_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    theirs = hf.encode(text).ids
    hf_s = time.perf_counter() - t0
    return {"vocab": ours.vocab_size, "mb": mb, "femtogpt_mb_s": mb / ours_s,
            "tokenizers_mb_s": mb / hf_s, "same_ids": ids.tolist() == theirs}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8000)
    args = ap.parse_args(argv)
    speeds = {"femtogpt": [], "transformers": []}
    for r in range(args.rounds):
        speeds["femtogpt"].append(run(_FEMTO, args.tokens, threads=args.threads))
        speeds["transformers"].append(run(_HF, args.tokens, args.threads, threads=args.threads))
        print(f"round {r + 1}: femtogpt {speeds['femtogpt'][-1]:.1f} tok/s, transformers "
              f"{speeds['transformers'][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    f, t = (statistics.median(v) for v in speeds.values())
    print(f"sampling GPT-2 124M shape, batch 1, {args.tokens} tokens, {args.threads} threads, "
          f"median of {args.rounds}: femtogpt {f:.1f} tok/s (KV cache), transformers generate "
          f"{t:.1f} tok/s: {f / t:.2f}x")
    tok = tokenizer_speed(args.vocab)
    print(f"GPT-2 tokenizer, {tok['vocab']} tokens, Tiny Shakespeare x10 ({tok['mb']:.2f} MB), "
          f"one thread: femtogpt {tok['femtogpt_mb_s']:.2f} MB/s, tokenizers "
          f"{tok['tokenizers_mb_s']:.2f} MB/s; same ids: {tok['same_ids']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
