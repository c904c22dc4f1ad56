#!/usr/bin/env python
"""Save and load time and peak memory of a training state at GPT-2 124M's shape.

    python scripts/checkpoint_probe.py [--dir DIR] [--rounds 3]

Writes one training state (weights plus both AdamW moments: 3 x 124M float32,
1.5 GB) with femtogpt's own writer, then in fresh processes (so that each peak
RSS is that step's alone) measures:
  * save: the model and optimizer built, then save_checkpoint of their views;
  * load: reading it back into a new model and optimizer, every digest checked
    (Run's resume path: model_from_file, AdamW.load_from);
  * baseline: building the same model and optimizer without touching a file,
    the memory the loaded state needs anyway.
The file is read from the page cache after the first round: the figures are
the cost of femtogpt's reading and hashing, not of the disk.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

GPT2_124M = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768,
                 bias=True, gelu="tanh")


def build():
    from femtogpt import GPT, GPTConfig
    from femtogpt.train import AdamW
    model = GPT(GPTConfig(**GPT2_124M), seed=0)
    optimizer = AdamW(model)
    optimizer.exp_avg[:] = 1e-3         # not zeros: pages really held, as after training
    optimizer.exp_avg_sq[:] = 1e-6
    return model, optimizer


def child(task, path):
    t0 = time.perf_counter()
    if task == "baseline":
        build()
    elif task == "save":
        from femtogpt.files.checkpoint import model_meta, save_checkpoint
        model, optimizer = build()
        t0 = time.perf_counter()
        tensors = dict(model.state_views(), **optimizer.state_views())
        save_checkpoint(path, tensors, dict(model_meta(model, _tokenizer()), kind="train_state"))
    else:
        from femtogpt.files.checkpoint import model_from_file
        from femtogpt.files import TensorFile
        from femtogpt.train import AdamW
        with TensorFile(path) as f:
            model, _ = model_from_file(f)
            AdamW(model).load_from(f)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def _tokenizer():
    # GPT-2's vocabulary size in a character vocabulary (the tokenizer is metadata
    # only; its form does not change the cost of the 1.5 GB of tensors).
    from femtogpt.text import CharTokenizer
    return CharTokenizer("".join(chr(c) for c in range(32, 32 + GPT2_124M["vocab_size"])))


def run(task, path):
    proc = subprocess.run([sys.executable, __file__, "--child", task, path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{task} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="femtogpt-probe-") as tmp:
        path = os.path.join(tmp, "ckpt.safetensors")
        results = {"baseline": [], "save": [], "load": []}
        for _ in range(args.rounds):
            for task in ("baseline", "save", "load"):
                results[task].append(run(task, path))
        size = os.path.getsize(path)
    print(f"GPT-2 124M training state: {size / 1e9:.2f} GB, median of {args.rounds} rounds")
    for task, rs in results.items():
        print(f"  {task:8s} {statistics.median(r['seconds'] for r in rs):6.2f} s, peak RSS "
              f"{statistics.median(r['peak_rss_mb'] for r in rs):7,.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
