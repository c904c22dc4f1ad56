"""The training state's schema: what a checkpoint holds besides the weights,
written and read here and nowhere else.

OUT/ckpt.safetensors carries the model, AdamW's moments and, in its metadata,
the loop's counters and every random stream (one data stream per rank of the
run that saved), so that a resumed run continues exactly where the saved one
stood. OUT/best.safetensors carries the best model and enough of the run's
identity to recognise a run killed before its first training state.
"""
import math
import os
from dataclasses import asdict

import numpy as np

from ..errors import CheckpointError

TRAIN_STATE = "train_state"     # meta["kind"] of a training state
MODEL = "model"                 # meta["kind"] of a best model


def identity(cfg):
    """What makes two runs the same run: the config, but where --out is, how
    many threads compute it and where its cache lives."""
    out = asdict(cfg)
    out["data"] = os.path.abspath(out["data"])
    for name in ("out", "threads", "cache_dir"):
        out.pop(name)
    return out


def train_stream(seed, rank):
    """The data-sampling random stream of one rank. Rank 0's is a single-process
    run's own, so a one-rank distributed run is that run."""
    return np.random.default_rng([seed, 0] if rank == 0 else [seed, 0, rank])


def rng_from_state(state):
    rng = np.random.default_rng()
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ValueError("unsupported RNG state")
    rng.bit_generator.state = state
    return rng


def state_meta(run, streams, threads):
    """The training state's metadata: run's counters, `streams` (every rank's
    data stream state, rank order) and the thread count that computed it."""
    return {
        "kind": TRAIN_STATE,
        "train_config": asdict(run.cfg),
        "iter": run.iter,
        "optimizer_step": run.optimizer.step_count,
        "last_eval_iter": run.last_eval_iter,
        "best_val_loss": run.best_val_loss if math.isfinite(run.best_val_loss) else 1e30,
        "elapsed_s": run.elapsed,
        "dropout_seed": run.dropout_seed,
        "dropout_calls": run.model.dropout_calls,
        "rng_train": streams[0],
        "rng_train_ranks": streams,
        "world_size": len(streams),
        "rng_eval": run.rng_eval.bit_generator.state,
        "data": run.data_info,
        "init_from": run.init_from,
        "threads": threads,
    }


def best_meta(run, val_loss):
    """The best model's metadata: its evaluation, and the run's identity so that
    a run killed before its first training state is recognised (folder.py)."""
    return {"kind": MODEL, "iter": run.iter, "val_loss": val_loss,
            "train_config": identity(run.cfg), "init_from": run.init_from}


def restore(run, meta, path):
    """Set run's counters and random streams from a training state's metadata.

    Returns (how many ranks saved it, the thread count that computed it or
    None). A missing or malformed field is a CheckpointError naming `path`.
    """
    try:
        run.optimizer.step_count = int(meta["optimizer_step"])
        run.iter = int(meta["iter"])
        run.last_eval_iter = int(meta["last_eval_iter"])
        run.best_val_loss = float(meta["best_val_loss"])
        run.elapsed = float(meta["elapsed_s"])
        run.dropout_seed = int(meta["dropout_seed"])
        run.model.dropout_calls = int(meta["dropout_calls"])
        # One data stream per rank of the run that saved (one: a single process).
        saved_streams = meta.get("rng_train_ranks") or [meta["rng_train"]]
        rank = run.comm.rank
        if rank < len(saved_streams):
            run.rng_train = rng_from_state(saved_streams[rank])
        else:
            # A rank the saved run did not have: a stream of its own that
            # does not replay the data the run started with.
            run.rng_train = np.random.default_rng([run.cfg.seed, 0, rank, run.iter])
        run.rng_eval = rng_from_state(meta["rng_eval"])
        run.saved_data_info = dict(meta.get("data") or {})
        return len(saved_streams), meta.get("threads")
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: training state is incomplete ({err})") from None
