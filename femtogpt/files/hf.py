"""Hugging Face GPT-2 folders: read one as a femtogpt model and tokenizer, write one.

A folder as Hugging Face publishes gpt2, gpt2-medium, gpt2-large, gpt2-xl and
distilgpt2 (the user downloads it; femtogpt never does):
  config.json                    GPT2Config: the architecture
  model.safetensors              the weights, or model.safetensors.index.json
                                 and the shards it lists (gpt2-xl)
  vocab.json, merges.txt         the tokenizer (gpt2_tokenizer.py), or tokenizer.json
Hugging Face's GPT-2 stores its linear layers as Conv1D, weight (in, out):
they are transposed into femtogpt's (out, in), nanoGPT's and PyTorch's
Linear layout. The weights may be float32, float16 or bfloat16; femtogpt
computes in float32. A folder with only pytorch_model.bin is refused: that
file is a pickle, and loading a pickle can run any code it holds.

These files carry no digest: their structure, shapes, dtypes and values (no
NaN or infinity) are checked; damage that keeps a value finite cannot be seen.
"""
import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np

from .rundir import BEST_NAME, LATEST_NAME
from ..errors import CheckpointError, ConfigError
from ..model import GPT, GPTConfig
from ..model.params import PARAMS, present, state_names
from .tensorfile import TensorFile, save_tensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
VOCAB_NAME, MERGES_NAME, TOKENIZER_JSON = "vocab.json", "merges.txt", "tokenizer.json"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
LAYER_NORM_EPS = 1e-5        # the core's (_core.pyx: LN_EPS), GPT-2's and PyTorch's default
# GPT-2's activation names -> femtogpt's GELU form (gelu_new, gelu_fast and
# gelu_pytorch_tanh are the same tanh formula; gelu is the exact erf form).
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh",
               "gelu": "exact"}
# Conv1D weights, stored (in, out) by Hugging Face: the name endings of the
# parameter table's transposed rows (".attn.c_attn.weight", ...).
TRANSPOSED = tuple("." + p.name.split(".", 3)[-1] for p in PARAMS if p.hf_transposed)
# Buffers that Hugging Face's GPT-2 saves beside its weights: the causal mask.
SKIPPED = (".attn.bias", ".attn.masked_bias")


def is_hf_folder(path) -> bool:
    """A Hugging Face model folder, and not a femtogpt run that happens to hold a
    config.json (a run's checkpoints decide)."""
    return (os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))
            and not any(os.path.exists(os.path.join(path, name))
                        for name in (BEST_NAME, LATEST_NAME)))


# --------------------------------------------------------------------------- reading


def _read_json(path, what):
    from ..text.gpt2 import read_small_json
    return read_small_json(path, what, CheckpointError)


def config_from_hf(folder) -> GPTConfig:
    """config.json as a GPTConfig; a setting femtogpt's model cannot represent is
    refused by name."""
    path = os.path.join(folder, CONFIG_NAME)
    d = _read_json(path, "a model config")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")

    def refuse(problem):
        raise CheckpointError(f"{path}: {problem}; femtogpt's GPT cannot represent it")

    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        refuse(f"model_type is {model_type!r}, not 'gpt2'")

    def integer(*names):
        for name in names:
            if name in d:
                value = d[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise CheckpointError(f"{path}: {name} must be a positive integer, "
                                          f"got {value!r}")
                return value
        raise CheckpointError(f"{path} has no {names[0]}")

    n_embd = integer("n_embd")
    activation = d.get("activation_function", "gelu_new")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        refuse(f"activation_function is {activation!r:.80} (femtogpt has "
               f"{', '.join(sorted(ACTIVATIONS))})")
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * n_embd:
        refuse(f"n_inner is {n_inner!r}, not 4 * n_embd = {4 * n_embd}")
    eps = d.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, LAYER_NORM_EPS,
                                                              rel_tol=1e-9):
        refuse(f"layer_norm_epsilon is {eps!r}, not {LAYER_NORM_EPS}")
    for name, wanted in (("tie_word_embeddings", True), ("scale_attn_weights", True),
                         ("scale_attn_by_inverse_layer_idx", False),
                         ("reorder_and_upcast_attn", False), ("add_cross_attention", False)):
        if d.get(name, wanted) != wanted:
            refuse(f"{name} is {d[name]!r}")
    try:
        return GPTConfig(vocab_size=integer("vocab_size"),
                         block_size=integer("n_positions", "n_ctx"),
                         n_layer=integer("n_layer"), n_head=integer("n_head"), n_embd=n_embd,
                         dropout=0.0, bias=True, gelu=ACTIVATIONS[activation])
    except (ValueError, ConfigError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def _weight_files(folder):
    """[path] of the safetensors files that hold the weights."""
    single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, INDEX_NAME)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        d = _read_json(index, "a weight index")
        weight_map = d.get("weight_map") if isinstance(d, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: has no weight_map of tensor names to files")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            # Only plain file names in this folder: an index must not point elsewhere.
            if os.path.basename(shard) != shard or shard in ("", ".", ".."):
                raise CheckpointError(f"{index}: shard {shard!r} is not a file name in "
                                      f"this folder")
            if not os.path.isfile(os.path.join(folder, shard)):
                raise CheckpointError(f"{index} lists {shard}, which is not in {folder}")
        return [os.path.join(folder, shard) for shard in shards]
    pickles = [n for n in PICKLES if os.path.isfile(os.path.join(folder, n))]
    if pickles:
        raise CheckpointError(
            f"{folder} has its weights only as {pickles[0]}, a Python pickle: loading a pickle "
            f"can run any code it holds, so femtogpt never opens one. Convert it once, where "
            f"you trust it, with transformers: GPT2LMHeadModel.from_pretrained(folder)"
            f".save_pretrained(folder) writes {WEIGHTS_NAME}")
    raise CheckpointError(f"{folder} has no {WEIGHTS_NAME} (nor {INDEX_NAME})")


def read_hf_weights(folder, model) -> None:
    """Fill model's parameters from the folder's safetensors files."""
    files = [TensorFile(path, foreign=True) for path in _weight_files(folder)]
    try:
        where = {}
        for f in files:
            for name in f.names:
                if name in where:
                    raise CheckpointError(f"tensor {name} is in both {where[name].path} and "
                                          f"{f.path}")
                where[name] = f
        views = model.state_views()
        wanted = {}
        for ours in views:
            bare = ours[len("transformer."):] if ours.startswith("transformer.") else ours
            present = [k for k in (ours, bare) if k in where]
            if not present:
                raise CheckpointError(f"{folder}: the weights have no tensor {ours} (nor {bare})")
            if len(present) == 2:
                raise CheckpointError(f"{folder}: the weights hold both {ours} and {bare}")
            wanted[present[0]] = ours
        for name in where:
            if name not in wanted and name != "lm_head.weight" and not name.endswith(SKIPPED):
                raise CheckpointError(f"{where[name].path}: unexpected tensor {name} (not part "
                                      f"of a GPT-2 language model)")
        for key, ours in wanted.items():
            f, view = where[key], views[ours]
            want = view.shape[::-1] if ours.endswith(TRANSPOSED) else view.shape
            if f.shape(key) != want:
                raise CheckpointError(f"{f.path}: tensor {key} has shape {list(f.shape(key))}, "
                                      f"expected {list(want)} for this config.json")
            value = f.read_float32(key)
            view[...] = value.T if ours.endswith(TRANSPOSED) else value
            if not np.all(np.isfinite(view)):
                raise CheckpointError(f"{f.path}: tensor {key} holds NaN or infinite values "
                                      f"(as float32)")
        if "lm_head.weight" in where:
            f = where["lm_head.weight"]
            wte = views["transformer.wte.weight"]
            if f.shape("lm_head.weight") != wte.shape or not np.array_equal(
                    f.read_float32("lm_head.weight"), wte):
                raise CheckpointError(f"{f.path}: lm_head.weight differs from the token "
                                      f"embedding; femtogpt's head is tied to it")
    finally:
        for f in files:
            f.close()


def read_hf_tokenizer(folder):
    from ..errors import TokenizerError
    from ..text.gpt2 import GPT2Tokenizer
    vocab, merges = os.path.join(folder, VOCAB_NAME), os.path.join(folder, MERGES_NAME)
    tokenizer_json = os.path.join(folder, TOKENIZER_JSON)
    try:
        if os.path.isfile(vocab) and os.path.isfile(merges):
            return GPT2Tokenizer.from_files(vocab, merges)
        if os.path.isfile(tokenizer_json):
            return GPT2Tokenizer.from_tokenizer_json(tokenizer_json)
    except TokenizerError as err:
        raise CheckpointError(str(err)) from None
    raise CheckpointError(f"{folder} has no tokenizer: GPT-2's is read from {VOCAB_NAME} and "
                          f"{MERGES_NAME}, or from {TOKENIZER_JSON}")


def load_hf(folder):
    """(model, tokenizer) from a Hugging Face GPT-2 folder."""
    config = config_from_hf(folder)
    tokenizer = read_hf_tokenizer(folder)
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but "
                              f"config.json says vocab_size {config.vocab_size}")
    try:
        model = GPT(config, init=False)
    except MemoryError:
        raise CheckpointError(f"{os.path.join(folder, CONFIG_NAME)}: a model of this size "
                              f"({config.n_layer} layers, {config.n_embd} wide, vocabulary "
                              f"{config.vocab_size}) does not fit in memory") from None
    read_hf_weights(folder, model)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- writing


def special_ids(tokenizer):
    """(bos, eos) ids for config.json: GPT-2's <|endoftext|>, a
    SentencePiece model's own <s> and </s>, else None. Left out, transformers
    would assume GPT-2's 50256, which another vocabulary does not have."""
    specials = getattr(tokenizer, "specials", None)
    if isinstance(specials, dict) and "<|endoftext|>" in specials:
        end = specials["<|endoftext|>"]
        return end, end
    sp = getattr(tokenizer, "_sp", None)
    if sp is not None:
        bos, eos = sp.bos_id(), sp.eos_id()
        return (bos if bos >= 0 else None), (eos if eos >= 0 else None)
    return None, None


def hf_config(config, bos_id=None, eos_id=None) -> dict:
    """config.json for a femtogpt model, as transformers' GPT2Config writes it."""
    return {
        "bos_token_id": bos_id, "eos_token_id": eos_id,
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": config.vocab_size, "n_positions": config.block_size,
        "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
        "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new" if config.gelu == "tanh" else "gelu",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout, "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "torch_dtype": "float32",
    }


def hf_tensors(model) -> dict:
    """{Hugging Face name: float32 array}: Conv1D weights transposed, and zero
    biases for a model trained without them (GPT-2 always has biases, and a
    zero bias computes exactly what no bias does)."""
    out = {}
    views = model.state_views()
    for name, view in views.items():
        out[name] = np.ascontiguousarray(view.T) if name.endswith(TRANSPOSED) else view
    if not model.config.bias:
        have = {p.key for p in present(model.config)}
        with_bias = replace(model.config, bias=True)
        for name, p, _ in state_names(with_bias):
            if p.key not in have:
                out[name] = np.zeros(p.shape(with_bias), np.float32)
    return out


def export_hf(model, tokenizer, folder, overwrite=False, meta=None, source=None) -> list:
    """Write a Hugging Face GPT-2 folder; it appears whole or not at all.

    Returns notes on what could not be carried over: a model with femtogpt's
    own tokenizer (char, byte, bpe) gets config.json and the weights, but no
    tokenizer files, since Hugging Face's GPT-2 tokenizer would give other ids
    for the same text. An existing non-empty folder is replaced only with
    overwrite=True; never the folder the model came from (source), nor one
    that holds it.
    """
    from ..text.gpt2 import GPT2Tokenizer
    from .hf_sentencepiece import exportable, write_sentencepiece_files
    notes = []
    sentencepiece = getattr(tokenizer, "model_bytes", None) is not None
    why_not = exportable(tokenizer) if sentencepiece else None
    if why_not:
        notes.append(f"{why_not}: {folder} gets no tokenizer files")
    elif not isinstance(tokenizer, GPT2Tokenizer) and not sentencepiece:
        notes.append(f"the model's {tokenizer.kind} tokenizer has no Hugging Face "
                     f"equivalent: {folder} gets the weights and config.json but no "
                     f"tokenizer files; its {tokenizer.kind} tokenizer stays in femtogpt's "
                     f"checkpoint (femtogpt.load reads it)")
    if not model.config.bias:
        notes.append("the model has no biases; GPT-2's layout has them, so they are "
                     "written as zeros (which computes the same)")
    if os.path.islink(folder):
        raise ConfigError(f"--to {folder} is a symbolic link: give the folder itself")
    folder = os.path.abspath(folder)
    if source is not None:
        inside = os.path.realpath(source)
        if inside == os.path.realpath(folder) or inside.startswith(
                os.path.realpath(folder) + os.sep):
            raise ConfigError(f"--to {folder} holds the model being exported ({source}): "
                              f"choose another folder")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"--to {folder} exists and is not a folder")
    if os.path.isdir(folder) and os.listdir(folder) and not overwrite:
        raise ConfigError(f"--to {folder} is not empty: choose another folder, or "
                          f"--overwrite to replace it")
    parent = os.path.dirname(folder)
    if not os.path.isdir(parent):
        raise ConfigError(f"cannot create {folder}: {parent} does not exist")
    temp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{os.getpid()}")
    shutil.rmtree(temp, ignore_errors=True)
    try:
        os.makedirs(temp)
        save_tensors(os.path.join(temp, WEIGHTS_NAME), hf_tensors(model), meta or {})
        bos_id, eos_id = special_ids(tokenizer)
        files = {CONFIG_NAME: json.dumps(hf_config(model.config, bos_id, eos_id),
                                         indent=2) + "\n"}
        if isinstance(tokenizer, GPT2Tokenizer):
            files[VOCAB_NAME] = json.dumps(tokenizer.vocab_json(), ensure_ascii=False)
            files[MERGES_NAME] = tokenizer.merges_txt()
            files["tokenizer_config.json"] = json.dumps({
                "tokenizer_class": "GPT2Tokenizer",
                "model_max_length": model.config.block_size,
                **{k: t for t in tokenizer.specials for k in
                   ("bos_token", "eos_token", "unk_token")}}, indent=2) + "\n"
        if sentencepiece and not why_not:
            write_sentencepiece_files(tokenizer, temp, model.config.block_size)
        for name, text in files.items():
            with open(os.path.join(temp, name), "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        if os.path.isdir(folder):
            old = temp + "-old"
            os.rename(folder, old)
            try:
                os.rename(temp, folder)
            except BaseException:
                os.rename(old, folder)      # put the previous folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(temp, folder)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, OSError):
            raise ConfigError(f"could not write {folder}: {err.strerror or err}") from None
        raise
    return notes
