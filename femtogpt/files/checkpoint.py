"""femtogpt checkpoints: a run's files, and models read from them.

A checkpoint is a tensor file (femtogpt/tensorfile.py: safetensors with
digests, written atomically, read as hostile input) holding the model's
tensors under their nanoGPT names and, in its metadata, "model_config"
(GPTConfig's fields) and "tokenizer" (its to_dict()). A training state
(train.py) adds AdamW's moments as "optimizer.exp_avg.<name>" /
"optimizer.exp_avg_sq.<name>" and the loop's state in the metadata.

Models are read straight into their own parameter block, tensor by tensor,
each checked against its digest as it is read: loading a model costs its
memory once, not twice.
"""
from __future__ import annotations

import warnings

import numpy as np

from ..errors import CheckpointError, UnverifiedCheckpointWarning
from .tensorfile import (FORMAT_VERSION, MAX_HEADER_BYTES, TensorFile,  # noqa: F401
                                 load_tensors, save_tensors)

# The names the rest of femtogpt (and its tests) use for the file operations.
save_checkpoint = save_tensors
load_checkpoint = load_tensors

# --------------------------------------------------------------------------- models

def note_if_unverified(f: TensorFile) -> None:
    """Say (once per file) that a file from before digests cannot be checked."""
    if not f.verified:
        warnings.warn(f"{f.path} was written before femtogpt checkpoints carried digests: "
                      f"it loads, but damage to it cannot be detected", UnverifiedCheckpointWarning,
                      stacklevel=3)


def model_from_file(f: TensorFile):
    """(model, tokenizer) from an open checkpoint, the weights read straight into
    the new model's parameter block; CheckpointError for anything wrong."""
    from ..errors import FemtoGPTError
    from ..model import GPT, GPTConfig
    from ..text import tokenizer_from_dict

    path, meta = f.path, f.meta
    config_dict = meta.get("model_config")
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{path} is not a femtogpt model checkpoint (no model_config)")
    try:
        config = GPTConfig(**config_dict)
        tokenizer = tokenizer_from_dict(meta.get("tokenizer"))
    except (TypeError, FemtoGPTError) as err:
        raise CheckpointError(f"{path} has an invalid model description: {err}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model's vocab_size is {config.vocab_size}")
    model = GPT(config, init=False)
    read_tensors_into(f, model.state_views(), "")
    if "lm_head.weight" in f.names:
        # Tied to wte: a copy saved by another tool must equal it.
        if not np.array_equal(f.read("lm_head.weight"), model.state_views()["transformer.wte.weight"]):
            raise CheckpointError(f"{path}: lm_head.weight differs from transformer.wte.weight, "
                                  f"but they are tied in this model")
    note_if_unverified(f)
    return model, tokenizer


def read_tensors_into(f: TensorFile, views: dict, prefix: str) -> None:
    """Read tensor prefix + name into each float32 view, refusing missing,
    misshaped and non-finite tensors by name."""
    names = set(f.names)
    for name, view in views.items():
        key = prefix + name
        if key not in names:
            raise CheckpointError(f"{f.path} is missing tensor {key}")
        if f.dtype(key) != np.float32:
            raise CheckpointError(f"{f.path}: tensor {key} has dtype {f.dtype(key)}, expected float32")
        if f.shape(key) != view.shape:
            raise CheckpointError(f"{f.path}: tensor {key} has shape {f.shape(key)}, "
                                  f"expected {view.shape}")
        f.read_into(key, view)
        if not np.all(np.isfinite(view)):
            raise CheckpointError(f"{f.path}: tensor {key} holds NaN or infinite values")


def model_meta(model, tokenizer) -> dict:
    return {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
