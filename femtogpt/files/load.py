"""femtogpt.load: a model and its tokenizer from whatever a user points at.

A femtogpt run folder or checkpoint file (checkpoint.py) and a Hugging Face
GPT-2 folder (hf.py) are two formats; this one function sits above both so
that neither has to know the other.
"""
from __future__ import annotations

from ..errors import ConfigError
from .checkpoint import model_from_file
from .hf import is_hf_folder, load_hf
from .rundir import BEST_NAME, checkpoint_path
from .tensorfile import TensorFile


def load(path, prefer=BEST_NAME, dtype="fp32"):
    """(model, tokenizer) from a checkpoint file, a run directory or a Hugging
    Face GPT-2 folder (config.json, model.safetensors, vocab.json, merges.txt).

    For a run directory, the best-validation model is used if there is one,
    else the latest training state. dtype "bf16" or "int8" converts the linear
    layers once for sampling and scoring (GPT.convert_weights): the model then
    holds the weights at that type, and cannot be trained or saved.
    """
    from ..model.config import WEIGHT_DTYPES
    if dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {dtype!r}")
    if is_hf_folder(path):
        model, tokenizer = load_hf(path)
    else:
        with TensorFile(checkpoint_path(path, prefer)) as f:
            model, tokenizer = model_from_file(f)
    model.eval()
    model.convert_weights(dtype)
    return model, tokenizer
