"""scripts/bench_llama.py's model: a GPT-2 124M-shaped Hugging Face folder made
on this machine (no download), and its GGUF files.

The folder is what `femtogpt.load` and `femtogpt export` read (files/hf.py):
  config.json        GPT2Config: n_layer 12, n_head 12, n_embd 768, n_positions
                     1024, vocab_size 50257, gelu_new
  model.safetensors  random weights: every matrix and embedding N(0, 0.02) from
                     a seeded generator, LayerNorm weights 1, biases 0 (GPT-2's
                     init); Conv1D weights stored (in, out) as Hugging Face does
  vocab.json         a synthetic byte-level BPE vocabulary of exactly 50,257
  merges.txt         ids: GPT-2's 256 byte symbols (bytes_to_unicode, in GPT-2's
                     id order), then 50,000 deterministic merges, each making a
                     new string, then <|endoftext|> as id 50256

Random weights compute the same amount of work as GPT-2's own: the figures
are about speed, not text. The vocabulary is synthetic so that no file needs
fetching, yet valid, so that every tokenizer (femtogpt's, llama.cpp's) loads it.

Everything is written under a temporary name and renamed into place, and the
folder's name carries its recipe, so a rerun with the same --work-dir finds it.
"""
import json
import os
import random
import shutil
import subprocess
import sys

GPT2_124M = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024,
             "vocab_size": 50257}
ENDOFTEXT = "<|endoftext|>"
RECIPE = 1          # bump when the folder's contents change, so caches are rebuilt
INIT_STD = 0.02


def bytes_to_unicode():
    """GPT-2's map from each byte to a printable character, in GPT-2's id order
    (its encoder.py): the printable Latin-1 bytes as themselves, then the others
    shifted past 255."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def synthetic_vocab(vocab_size=GPT2_124M["vocab_size"], seed=0):
    """(vocab {token: id}, merges [(a, b)]) of a byte-level BPE with exactly
    vocab_size ids: 256 byte symbols, vocab_size - 257 merges, <|endoftext|> last.

    Each merge joins an earlier token (often a recent one, so that tokens grow
    into word-like strings) and a byte symbol (mostly a lower-case letter or the
    space symbol Ġ, so that English text takes merges); a pair whose join is
    already a token is drawn again. Deterministic for a seed.
    """
    n_merges = vocab_size - 257
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= 257, got {vocab_size}")
    symbols = list(bytes_to_unicode().values())
    common = [bytes_to_unicode()[b] for b in b" etaoinshrdlucmfwypvbgk"]
    tokens, seen, merges = list(symbols), set(symbols), []
    rng = random.Random(seed)
    while len(merges) < n_merges:
        if rng.random() < 0.5:
            a = rng.choice(common)
        elif rng.random() < 0.5:
            a = tokens[rng.randrange(max(256, len(tokens) - 2000), len(tokens))]
        else:
            a = tokens[rng.randrange(len(tokens))]
        b = rng.choice(common) if rng.random() < 0.9 else rng.choice(symbols)
        if a + b in seen:
            continue
        merges.append((a, b))
        tokens.append(a + b)
        seen.add(a + b)
    tokens.append(ENDOFTEXT)
    return {t: i for i, t in enumerate(tokens)}, merges


def hf_config(shape):
    """config.json as transformers' GPT2Config writes it."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": shape["vocab_size"], "n_positions": shape["n_positions"],
            "n_ctx": shape["n_positions"], "n_embd": shape["n_embd"],
            "n_layer": shape["n_layer"], "n_head": shape["n_head"], "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "initializer_range": INIT_STD, "scale_attn_weights": True, "use_cache": True,
            "tie_word_embeddings": True, "torch_dtype": "float32",
            "bos_token_id": shape["vocab_size"] - 1, "eos_token_id": shape["vocab_size"] - 1}


def hf_tensor_shapes(shape):
    """[(name, shape, init)] of GPT-2's weights as Hugging Face saves them: Conv1D
    weights (in, out); init is "normal", "ones" or "zeros"."""
    C, V, T = shape["n_embd"], shape["vocab_size"], shape["n_positions"]
    out = [("transformer.wte.weight", (V, C), "normal"),
           ("transformer.wpe.weight", (T, C), "normal")]
    for layer in range(shape["n_layer"]):
        h = f"transformer.h.{layer}."
        out += [(h + "ln_1.weight", (C,), "ones"), (h + "ln_1.bias", (C,), "zeros"),
                (h + "attn.c_attn.weight", (C, 3 * C), "normal"),
                (h + "attn.c_attn.bias", (3 * C,), "zeros"),
                (h + "attn.c_proj.weight", (C, C), "normal"),
                (h + "attn.c_proj.bias", (C,), "zeros"),
                (h + "ln_2.weight", (C,), "ones"), (h + "ln_2.bias", (C,), "zeros"),
                (h + "mlp.c_fc.weight", (C, 4 * C), "normal"),
                (h + "mlp.c_fc.bias", (4 * C,), "zeros"),
                (h + "mlp.c_proj.weight", (4 * C, C), "normal"),
                (h + "mlp.c_proj.bias", (C,), "zeros")]
    out += [("transformer.ln_f.weight", (C,), "ones"), ("transformer.ln_f.bias", (C,), "zeros")]
    return out


def write_safetensors(path, shape, seed):
    """model.safetensors, float32, tensor by tensor (the header first, from the
    shapes), so that at most one tensor is in memory."""
    import numpy as np
    tensors = hf_tensor_shapes(shape)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims, _ in tensors:
        size = 4 * int(np.prod(dims))
        header[name] = {"dtype": "F32", "shape": list(dims),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)           # the data starts 8-byte aligned
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for _, dims, init in tensors:
            if init == "normal":
                value = rng.standard_normal(dims, dtype=np.float32) * np.float32(INIT_STD)
            else:
                value = (np.ones if init == "ones" else np.zeros)(dims, np.float32)
            value.astype("<f4", copy=False).tofile(f)


def folder_name(shape, seed):
    return (f"gpt2-L{shape['n_layer']}-H{shape['n_head']}-C{shape['n_embd']}-"
            f"T{shape['n_positions']}-V{shape['vocab_size']}-seed{seed}-r{RECIPE}")


def make_hf_folder(work_dir, shape=GPT2_124M, seed=0, log=print):
    """The folder for (shape, seed) under work_dir, written if it is not there yet."""
    folder = os.path.join(os.path.abspath(work_dir), folder_name(shape, seed))
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    os.makedirs(work_dir, exist_ok=True)
    temp = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(temp)
    try:
        log(f"writing {folder} (random weights, synthetic vocabulary)")
        vocab, merges = synthetic_vocab(shape["vocab_size"], seed)
        with open(os.path.join(temp, "config.json"), "w") as f:
            json.dump(hf_config(shape), f, indent=2)
        with open(os.path.join(temp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(temp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        write_safetensors(os.path.join(temp, "model.safetensors"), shape, seed)
        os.replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def export_gguf(folder, gguf_type, log=print):
    """FOLDER.<type>.gguf beside the folder, made by `femtogpt export` as a user
    types it (once: a rerun finds the file). A refusal is raised with
    femtogpt's own message."""
    path = f"{folder}.{gguf_type}.gguf"
    if os.path.isfile(path):
        return path
    log(f"femtogpt export {os.path.basename(folder)} --to {os.path.basename(path)} "
        f"--dtype {gguf_type}")
    cmd = [sys.executable, "-m", "femtogpt", "export", folder, "--to", path,
           "--dtype", gguf_type]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not os.path.isfile(path):
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return path
