"""Sampling batches of training windows.

Batches follow nanoGPT: a batch is ``batch_size`` windows of ``block_size + 1``
consecutive ids at uniformly random starts; the model reads the first
``block_size`` ids of a window (x) and predicts the last ``block_size`` (y).
The random generator is always passed in, so training can save its state in a
checkpoint and a resumed run draws exactly the batches the original would have.
"""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError


def check_split_size(ids: np.ndarray, block_size: int, split_name: str) -> None:
    """Fail early, with advice, if a split cannot hold a single training window."""
    needed = block_size + 1
    if len(ids) < needed:
        raise DataError(
            f"{split_name} split has {len(ids)} tokens, needs at least block_size + 1 = {needed}; "
            f"use a smaller --block-size or more text"
        )


def get_batch(
    ids: np.ndarray,
    batch_size: int,
    block_size: int,
    rng: np.random.Generator,
    split_name: str = "data",
) -> tuple[np.ndarray, np.ndarray]:
    """A random batch of inputs x and next-token targets y, both int64 (batch_size, block_size).

    y[b, t] is the id that follows x[b, t] in ids. Both arrays are C-contiguous
    (the compiled core indexes them as plain buffers).
    """
    if batch_size < 1 or block_size < 1:
        raise ConfigError(f"batch size and block size must be at least 1, got {batch_size} and {block_size}")
    check_split_size(ids, block_size, split_name)
    # Exactly nanoGPT's draw, so a run is reproducible from its seed / saved RNG state.
    starts = rng.integers(0, len(ids) - block_size, size=batch_size)
    # One gather of every window, each block_size + 1 long: x and y are its two
    # overlapping slices, so each id is read once. A token cache's file
    # (token_cache.TokenFile) reads them through a memmap.
    if hasattr(ids, "windows"):
        windows = ids.windows(starts, block_size + 1)
    else:
        offsets = np.arange(block_size + 1)
        windows = np.asarray(ids)[starts[:, None] + offsets[None, :]].astype(np.int64)
    x = np.ascontiguousarray(windows[:, :-1])
    y = np.ascontiguousarray(windows[:, 1:])
    return x, y
