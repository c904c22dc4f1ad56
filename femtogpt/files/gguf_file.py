"""GGUF files: a model as llama.cpp (and ollama, LM Studio) reads it.

`femtogpt export RUN --to model.gguf [--dtype f32|bf16|q8_0]` writes GGUF v3
with the `gguf` package (the format's own Python library, from llama.cpp's
repository), in llama.cpp's GPT-2 architecture:

  metadata   general.architecture = gpt2 and gpt2.context_length,
             embedding_length, feed_forward_length, block_count,
             attention.head_count, attention.layer_norm_epsilon; general.file_type
  tensors    the parameter table's GGUF names (model/params.py), plus
             output.weight: llama.cpp's GPT-2 wants the lm_head as a tensor of
             its own, a copy of token_embd.weight (its converter writes the same)
  tokenizer  tokenizer.ggml.*: tokens, token types, merges, pre-tokenizer, bos/eos

Shapes: GGUF lists dimensions fastest first, so a numpy (rows, cols) array is
ggml's {cols, rows}. femtogpt keeps every weight as (out, in), which is what
llama.cpp wants ({n_embd, 3 n_embd} for attn_qkv): nothing is transposed
(Hugging Face's Conv1D weights are, on the way in: files/hf.py).

Types follow llama.cpp's convert_hf_to_gguf.py for gpt2: 1-D tensors (LayerNorm
weights and every bias) and position_embd stay f32; token_embd, output and the
four matrices per layer take --dtype. q8_0 is ggml's block of 32 values along
the reduction axis (a row's last dimension) with an fp16 scale, amax / 127,
and values round(x / scale) (gguf.quants.Q8_0: the same arithmetic as ggml's
reference quantizer, checked bit for bit in tests/test_gguf.py); a row whose
length is not a multiple of 32 falls back to f16, as the converter does.

Tokenizers, each mapped only where llama.cpp then gives the same ids for the
same text:
  gpt2   GPT-2's byte-level BPE: tokenizer.ggml.model "gpt2", pre-tokenizer
         "gpt-2" (llama.cpp's name for GPT-2's split), tokens as GPT-2's
         byte-to-unicode strings, merges as "a b".
  byte   "rwkv": llama.cpp's greedy longest match over byte strings. With 256
  char   one-byte tokens (byte), or one token per character (char: UTF-8 is
         prefix-free, so the longest match is always exactly one character),
         it gives femtogpt's ids. (llama.cpp's "gpt2" BPE would too, without
         merges, but it then takes token 11 as end-of-text when the file names
         none, and a byte or char vocabulary has none: generation would stop
         at id 11. "rwkv" has no default end-of-text.)
  bpe    refused: femtogpt's pre-split is GPT-2's without the English
         contractions, and none of llama.cpp's pre-tokenizers splits that way
         (each of them either has the contractions or differs more), so its
         ids would differ for text such as "'tis".
  sentencepiece  refused: not mapped yet (llama.cpp's "llama" vocabulary would
         need its scores and byte tokens checked against the library's ids).

The file appears whole or not at all: written under a temporary name in the
same folder, synced, then renamed over --to.
"""
from __future__ import annotations

import os
from dataclasses import replace

import numpy as np

from ..errors import ConfigError
from ..model.params import state_names
from .hf import LAYER_NORM_EPS

ARCH = "gpt2"
DTYPES = ("f32", "bf16", "q8_0")
# llama.cpp's name for the lm_head (tied in femtogpt: a copy of token_embd).
OUTPUT_NAME = "output.weight"
GPT2_PRE = "gpt-2"           # llama.cpp's pre-tokenizer for GPT-2's split
ENDOFTEXT = "<|endoftext|>"


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ConfigError("writing GGUF needs the gguf package: pip install "
                          "'femtogpt[gguf]' (or pip install gguf)") from None
    return gguf


# --------------------------------------------------------------------------- checks


def check_dtype(dtype) -> str:
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not a GGUF type femtogpt writes: choose "
                          f"{', '.join(DTYPES)}")
    return dtype


def check_model(config):
    """Refuse, by name, what llama.cpp's gpt2 architecture would compute otherwise."""
    if config.gelu != "tanh":
        raise ConfigError(f"the model uses the {config.gelu} GELU; llama.cpp's gpt2 "
                          f"architecture computes GPT-2's tanh form, so it would give other "
                          f"numbers: a GGUF export needs a model trained with --gelu tanh "
                          f"(the femto preset, or any GPT-2)")


def check_target(path, overwrite):
    """--to must be a new file (or, with overwrite, an existing one) in a writable
    folder: checked before anything is computed."""
    if os.path.isdir(path):
        raise ConfigError(f"--to {path} is a folder; give a FILE.gguf")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"--to {path} exists: choose another file, or --overwrite to "
                          f"replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot write {path}: {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write {path}: {parent} is not writable")


# --------------------------------------------------------------------------- tokenizer


def rwkv_escape(data: bytes) -> str:
    """A token's bytes as llama.cpp's rwkv vocabulary spells them: printable ASCII
    as itself, a backslash doubled, any other byte as \\xhh (lower-case hex: the
    only form llama_unescape_rwkv_token reads)."""
    out = []
    for b in data:
        if b == 0x5C:
            out.append("\\\\")
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return "".join(out)


def gguf_vocabulary(tokenizer) -> dict:
    """The tokenizer.ggml.* fields for this tokenizer, or a ConfigError naming why
    llama.cpp could not tokenize like it."""
    from ..text.gpt2 import GPT2Tokenizer, bytes_to_unicode
    gguf = _gguf()
    NORMAL, CONTROL = int(gguf.TokenType.NORMAL), int(gguf.TokenType.CONTROL)
    kind = tokenizer.kind
    if isinstance(tokenizer, GPT2Tokenizer):
        specials = tokenizer.specials
        if ENDOFTEXT not in specials:
            raise ConfigError(f"the gpt2 tokenizer has no {ENDOFTEXT} token: llama.cpp "
                              f"would then end generation at token 11")
        by_id = {i: text for text, i in tokenizer.vocab_json().items()}
        tokens = [by_id[i] for i in range(tokenizer.vocab_size)]
        special_ids = set(specials.values())
        merges = [line for line in tokenizer.merges_txt().split("\n")[1:] if line]
        return {"model": "gpt2", "pre": GPT2_PRE, "tokens": tokens,
                "types": [CONTROL if i in special_ids else NORMAL
                          for i in range(len(tokens))],
                "merges": merges, "bos": specials[ENDOFTEXT], "eos": specials[ENDOFTEXT]}
    if kind in ("byte", "char"):
        tokens = [rwkv_escape(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size)]
        return {"model": "rwkv", "tokens": tokens, "types": [NORMAL] * len(tokens)}
    if kind == "bpe":
        raise ConfigError(
            "femtogpt's bpe tokenizer cannot be written to GGUF: it splits text with GPT-2's "
            "pattern less the English contractions ('s 't 're 've 'm 'll 'd), and no "
            "llama.cpp pre-tokenizer splits that way (gpt-2's cuts \"'tis\" into \"'t\" "
            "\"is\", femtogpt's into \"'\" \"tis\"), so llama.cpp would give other tokens "
            "for the same text; train with --tokenizer byte or char, or fine-tune GPT-2, "
            "for a model that exports to GGUF")
    raise ConfigError(f"the model's {kind} tokenizer is not mapped to a GGUF vocabulary "
                      f"(femtogpt writes gpt2, byte and char tokenizers)")


# --------------------------------------------------------------------------- tensors


def gguf_tensors(model):
    """[(GGUF name, float32 array)] in the parameter table's order (nanoGPT's), the
    tied output.weight after token_embd; zero biases for a model without them."""
    cfg = model.config
    views = model.state_views()
    full = replace(cfg, bias=True)
    out = []
    for name, p, layer in state_names(full):
        value = views.get(name)
        if value is None:        # a bias the model was trained without: zero computes the same
            value = np.zeros(p.shape(full), np.float32)
        out.append((p.gguf_name(layer), value))
        if p.key == "wte":
            out.append((OUTPUT_NAME, value))
    return out


def tensor_type(gguf, name, array, dtype):
    """The GGML type a tensor is stored in, by convert_hf_to_gguf.py's rules."""
    Q = gguf.GGMLQuantizationType
    if dtype == "f32" or array.ndim <= 1 or name.startswith("position_embd."):
        return Q.F32
    if dtype == "bf16":
        return Q.BF16
    return Q.Q8_0 if array.shape[-1] % 32 == 0 else Q.F16


FILE_TYPES = {"f32": "ALL_F32", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


# --------------------------------------------------------------------------- writing


def export_gguf(model, tokenizer, path, dtype="f32", overwrite=False, name=None) -> list:
    """Write model and tokenizer as a GGUF file at path; returns notes on what was
    adapted. Everything is checked before anything is written; the file appears
    whole or not at all."""
    gguf = _gguf()
    check_dtype(dtype)
    check_model(model.config)
    vocab = gguf_vocabulary(tokenizer)
    if len(vocab["tokens"]) != model.config.vocab_size:
        raise ConfigError(f"the tokenizer has {len(vocab['tokens'])} tokens but the model's "
                          f"vocabulary is {model.config.vocab_size}")
    check_target(path, overwrite)
    notes = []
    if not model.config.bias:
        notes.append("the model has no biases; llama.cpp's gpt2 needs them, so they are "
                      "written as zeros (which computes the same)")
    cfg = model.config
    Q = gguf.GGMLQuantizationType
    planned = [(n, a, tensor_type(gguf, n, a, dtype)) for n, a in gguf_tensors(model)]
    fallback = [n for n, _, q in planned if q == Q.F16]
    if fallback:
        notes.append(f"{len(fallback)} tensor(s) ({fallback[0]}, ...) have rows that are "
                     f"not a multiple of 32 values: stored as f16 instead of q8_0, as "
                     f"llama.cpp's converter does")

    path = os.path.abspath(path)
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(None, ARCH)
    try:
        writer.add_name(name or "femtogpt")
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[dtype])))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model(vocab["model"])
        if "pre" in vocab:
            writer.add_tokenizer_pre(vocab["pre"])
        writer.add_token_list(vocab["tokens"])
        writer.add_token_types(vocab["types"])
        if vocab.get("merges"):
            writer.add_token_merges(vocab["merges"])
        if "bos" in vocab:
            writer.add_bos_token_id(vocab["bos"])
            writer.add_eos_token_id(vocab["eos"])
        # femtogpt never puts a token before the prompt; say so rather than rely on
        # llama.cpp's default for the vocabulary type.
        writer.add_add_bos_token(False)
        for tname, array, qtype in planned:
            data = np.ascontiguousarray(array, dtype=np.float32)
            if qtype != Q.F32:
                data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(tname, data, raw_dtype=qtype)
        writer.write_header_to_file(path=temp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        for fout in writer.fout or ():
            fout.flush()
            os.fsync(fout.fileno())
        writer.close()
        os.replace(temp, path)
    except BaseException as err:
        writer.close()
        try:
            os.remove(temp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise ConfigError(f"could not write {path}: {err.strerror or err}") from None
        raise
    return notes
