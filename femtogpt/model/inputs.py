"""The token arrays a GPT takes, checked before the core sees them: the
kernels index embedding rows with the ids."""
import numpy as np


def check_tokens(name, arr, cfg, shape=None):
    """An integer array (B, T) of ids in [0, vocab_size), 1 <= T <= block_size."""
    arr = np.asarray(arr)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T), got shape {arr.shape}")
    B, T = arr.shape
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} like idx")
    if B < 1:
        raise ValueError(f"{name} must have at least one row, got shape {arr.shape}")
    if not 1 <= T <= cfg.block_size:
        raise ValueError(f"{name} has T={T}; it must be in [1, block_size={cfg.block_size}]")
    lo, hi = arr.min(), arr.max()
    if lo < 0 or hi >= cfg.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {int(bad)} outside "
                         f"[0, vocab_size={cfg.vocab_size})")
    return np.ascontiguousarray(arr, dtype=np.int32)
