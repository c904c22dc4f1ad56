"""`femtogpt verify RUN_OR_FILE`: which of a run's files are intact.

Every tensor of every checkpoint is read and checked against its digest (and
every header against its own); a model checkpoint must also describe a model
femtogpt can build. A run's token cache (or a --cache-dir) is checked too:
its manifest and every token file against their digests, and its sources
against the manifest (a cache whose text has changed since is stale: the
next run rebuilds it). Nothing is written. A file from before digests can only be
checked for structure; a Hugging Face folder carries no digest at all, so its
safetensors files are checked for structure, completeness and finite values,
and the report says so.
"""
from __future__ import annotations

import glob
import json
import os
import warnings

import numpy as np

from .checkpoint import model_from_file
from .rundir import BEST_NAME, LATEST_NAME
from .tensorfile import TensorFile
from .tensorfile import FLOAT_KINDS
from ..errors import CheckpointError, FemtoGPTError, UnverifiedCheckpointWarning
from ..text.token_cache import MANIFEST, check_entry, find_entries

INTACT, UNVERIFIED, STALE, DAMAGED = "intact", "unverified", "stale", "DAMAGED"


def verify(path) -> list[tuple[str, str, str]]:
    """[(file, status, detail)] for a run directory, a checkpoint file or a
    Hugging Face model folder; FemtoGPTError if there is nothing to check."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"nothing to verify: {path} does not exist")
    if not os.path.isdir(path):
        return [_verify_file(path)]
    files = [os.path.join(path, name) for name in (BEST_NAME, LATEST_NAME)
             if os.path.isfile(os.path.join(path, name))]
    caches = [_verify_cache(folder) for folder in find_entries(path)]
    if files or caches:
        return [_verify_file(f) for f in files] + caches
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if os.path.isfile(os.path.join(path, "config.json")) and shards:
        return _verify_foreign_folder(path, shards)
    raise CheckpointError(f"nothing to verify in {path}: no {BEST_NAME} or {LATEST_NAME} "
                          f"(a femtogpt run), no token cache and no config.json with "
                          f".safetensors files (a Hugging Face model)")


def _verify_cache(folder):
    ok, stale, detail = check_entry(folder)
    return (os.path.join(folder, MANIFEST), STALE if stale else INTACT if ok else DAMAGED,
            "token cache: " + detail)


def _verify_file(file: str) -> tuple[str, str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
            with TensorFile(file) as f:
                n_bytes = _read_everything(f)
                detail = _describe(f)
                verified = f.verified
    except FemtoGPTError as err:
        return file, DAMAGED, str(err)
    size = f"{len(f.names)} tensors, {n_bytes / 1e6:,.1f} MB"
    if not verified:
        return file, UNVERIFIED, (f"{size}; written before checkpoints carried digests: its "
                                  f"structure is sound and {detail}, but damage to its values "
                                  f"cannot be detected")
    return file, INTACT, f"{size}, every digest matches; {detail}"


def _read_everything(f: TensorFile) -> int:
    total = 0
    for name in f.names:
        array = f.read(name)       # checks the digest; one tensor in memory at a time
        total += array.nbytes
    return total


def _describe(f: TensorFile) -> str:
    meta = f.meta
    if "model_config" not in meta:
        return "it holds no model"
    model, tokenizer = model_from_file(f)
    what = "a training state" if meta.get("kind") == "train_state" else "a model"
    at = f" at iteration {meta['iter']}" if isinstance(meta.get("iter"), int) else ""
    if meta.get("kind") == "train_state":
        missing = [n for n in model.state_views()
                   if f"optimizer.exp_avg.{n}" not in f.names
                   or f"optimizer.exp_avg_sq.{n}" not in f.names]
        if missing:
            raise CheckpointError(f"{f.path}: training state lacks the optimizer moments of "
                                  f"{missing[0]}")
    return (f"{what}{at}: {model.num_parameters() / 1e6:.2f}M parameters, "
            f"{tokenizer.to_dict()['type']} tokenizer")


def _verify_foreign_folder(folder: str, shards: list[str]) -> list[tuple[str, str, str]]:
    report = []
    config = os.path.join(folder, "config.json")
    try:
        with open(config, encoding="utf-8") as fh:
            json.load(fh)
        report.append((config, UNVERIFIED, "valid JSON (Hugging Face files carry no digest)"))
    except (OSError, ValueError) as err:
        report.append((config, DAMAGED, f"not readable JSON: {err}"))
    for shard in shards:
        try:
            with TensorFile(shard, foreign=True) as f:
                n_bytes = 0
                for name in f.names:
                    floating = f.kind(name) in FLOAT_KINDS
                    array = f.read_float32(name) if floating else f.read(name)
                    n_bytes += array.nbytes
                    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
                        raise CheckpointError(f"{shard}: tensor {name} holds NaN or infinite "
                                              f"values")
            report.append((shard, UNVERIFIED,
                           f"{len(f.names)} tensors, {n_bytes / 1e6:,.1f} MB: structure sound, "
                           f"complete and finite (Hugging Face files carry no digest, so damage "
                           f"to the values cannot be detected)"))
        except FemtoGPTError as err:
            report.append((shard, DAMAGED, str(err)))
    return report
