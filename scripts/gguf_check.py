#!/usr/bin/env python
"""Does llama.cpp continue a prompt as femtogpt does? Greedy, token for token.

    python scripts/gguf_check.py MODEL --llama-simple PATH [--prompt TEXT ...]
                                 [--tokens 32] [--dtypes f32,bf16,q8_0]
    python scripts/gguf_check.py --make-gpt2 DIR [--vocab 2000] [--layers 2] [--width 64]
                                 [--context 128]

MODEL is anything `femtogpt export` takes (a run, a checkpoint, a Hugging Face
GPT-2 folder). For each --dtype the model is exported to a temporary .gguf,
llama.cpp's llama-simple (greedy) continues each prompt by --tokens tokens, and
femtogpt's generate(temperature=0) does the same from the same prompt ids; the
line printed says how many of the first tokens agree (compared as the bytes
each femtogpt token decodes to, against the bytes llama-simple printed).

--make-gpt2 DIR writes a small Hugging Face GPT-2 folder with random weights
(non-trivial biases and LayerNorms) and a GPT-2 tokenizer: vocab.json and
merges.txt of a byte-level BPE learned from Tiny Shakespeare by femtogpt,
spelled with GPT-2's byte-to-unicode table and its ids shuffled, plus
<|endoftext|>. (GPT-2's own vocabulary files are not downloaded.)

llama.cpp: build it from source (e.g. shared/tools/build-llama-cpp); its
context is the prompt plus --tokens, which must fit the model's block_size.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "femtogpt", "data", "tinyshakespeare.txt")


def make_gpt2(folder, vocab=2000, layers=2, width=64, context=128, seed=0):
    from femtogpt.files.hf import TRANSPOSED
    from femtogpt.model import GPT, GPTConfig
    from femtogpt.files.tensorfile import save_tensors
    from femtogpt.text import BPETokenizer
    from femtogpt.text.gpt2 import bytes_to_unicode
    os.makedirs(folder, exist_ok=True)
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    bpe = BPETokenizer.train(text[:300_000], vocab - 1)
    n = bpe.vocab_size
    perm = np.random.default_rng(seed).permutation(n + 1)
    to_char = bytes_to_unicode()
    spell = lambda i: "".join(to_char[b] for b in bpe.token_bytes(i))  # noqa: E731
    table = {spell(i): int(perm[i]) for i in range(n)}
    table["<|endoftext|>"] = int(perm[n])
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(table, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n" for a, b in bpe.merges))
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": n + 1,
              "n_positions": context, "n_ctx": context, "n_embd": width, "n_layer": layers,
              "n_head": max(1, width // 64), "activation_function": "gelu_new",
              "layer_norm_epsilon": 1e-5}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    model = GPT(GPTConfig(vocab_size=n + 1, block_size=context, n_layer=layers,
                          n_head=config["n_head"], n_embd=width, bias=True, gelu="tanh"),
                seed=seed)
    rng = np.random.default_rng(seed + 1)
    for view in model.state_views().values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.05
    tensors = {name: (value.T.copy() if name.endswith(TRANSPOSED) else value)
               for name, value in model.state_dict().items()}
    save_tensors(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    print(f"wrote {folder}: GPT-2 layout, {layers} layers, {width} wide, context {context}, "
          f"vocabulary {n + 1}")


def agreement(model, tokenizer, gguf_path, llama_simple, prompt, n):
    """(tokens that agree, n, llama.cpp's continuation, femtogpt's)."""
    ids = tokenizer.encode(prompt)
    if len(ids) + n > model.config.block_size:
        # llama.cpp's gpt2 has no window to slide: past the position table it aborts
        raise SystemExit(f"{prompt!r} ({len(ids)} tokens) + {n} tokens is more than the "
                         f"model's context ({model.config.block_size})")
    ours = model.generate(np.array([ids]), n, temperature=0.0)[0, len(ids):]
    run = subprocess.run([llama_simple, "-m", gguf_path, "-n", str(n), prompt],
                         capture_output=True, timeout=600)
    if run.returncode != 0:
        raise SystemExit(f"llama-simple failed:\n{run.stderr.decode(errors='replace')[-2000:]}")
    out = run.stdout
    want = prompt.encode("utf-8")
    if not out.startswith(want):
        raise SystemExit(f"llama-simple did not echo the prompt: {out[:200]!r}")
    theirs = out[len(want):]
    if theirs.endswith(b"\n"):
        theirs = theirs[:-1]           # llama-simple ends with a newline of its own
    pos, agreed = 0, 0
    for token in ours.tolist():
        piece = tokenizer.decode_bytes([token])
        if theirs[pos:pos + len(piece)] != piece:
            break
        pos += len(piece)
        agreed += 1
    return agreed, theirs, tokenizer.decode_bytes(ours.tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--llama-simple", default="/work/tmp/llama/build/bin/llama-simple")
    parser.add_argument("--prompt", action="append")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--dtypes", default="f32,bf16,q8_0")
    parser.add_argument("--make-gpt2", metavar="DIR")
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    if args.make_gpt2:
        make_gpt2(args.make_gpt2, args.vocab, args.layers, args.width, args.context)
        return 0
    import femtogpt
    from femtogpt.files.gguf_file import export_gguf
    model, tokenizer = femtogpt.load(args.model)
    prompts = args.prompt or ["ROMEO:", "First Citizen:\nWe are"]
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes.split(","):
            path = os.path.join(tmp, f"model-{dtype}.gguf")
            export_gguf(model, tokenizer, path, dtype)
            for prompt in prompts:
                agreed, theirs, ours = agreement(model, tokenizer, path, args.llama_simple,
                                                 prompt, args.tokens)
                print(f"{dtype:5s} {prompt!r:28s} agree on {agreed:3d} of {args.tokens} tokens"
                      + ("" if agreed == args.tokens else
                         f"\n      llama.cpp: {theirs!r}\n      femtogpt:  {ours!r}"))
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
