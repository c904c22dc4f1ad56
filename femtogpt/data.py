"""Reading a small text file, and sampling batches of training windows.

(A corpus is read, encoded and split by corpus.py and token_cache.py.)

Batches follow nanoGPT: a batch is ``batch_size`` windows of ``block_size + 1``
consecutive ids at uniformly random starts; the model reads the first
``block_size`` ids of a window (x) and predicts the last ``block_size`` (y).
The random generator is always passed in, so training can save its state in a
checkpoint and a resumed run draws exactly the batches the original would have.
"""
from __future__ import annotations

import os

import numpy as np

from femtogpt.errors import ConfigError, DataError

_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path, what: str = "data file") -> str:
    """The contents of a UTF-8 text file, minus any byte order mark.

    Newlines are kept byte for byte (no universal-newline translation): the
    model should learn the file as it is. `what` names the file in errors.
    """
    raw = _read_bytes(path, what)
    name = os.fspath(path)
    if not raw:
        raise DataError(f"{what} is empty: {name}")
    offset = 0
    if raw.startswith(_UTF8_BOM):
        # Editors on Windows add it; it is not part of the text.
        raw, offset = raw[len(_UTF8_BOM):], len(_UTF8_BOM)
        if not raw:
            raise DataError(f"{what} is empty (it holds only a byte order mark): {name}")
    _reject_binary(raw, name, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start]
        raise DataError(
            f"{what} is not UTF-8 text: invalid byte 0x{bad:02x} at byte offset "
            f"{err.start + offset}: {name}"
        ) from None


def _read_bytes(path, what: str) -> bytes:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise DataError(f"{what} is a directory, not a text file: {name}")
    try:
        with open(name, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {name}") from None
    except PermissionError:
        raise DataError(f"{what} is not readable (permission denied): {name}") from None
    except OSError as err:
        raise DataError(f"could not read {what} {name}: {err.strerror or err}") from None


def _reject_binary(raw: bytes, name: str, what: str) -> None:
    """Refuse files that are not text before the UTF-8 check gives a less helpful message.

    Text never contains NUL, while executables, images and archives nearly
    always do. UTF-16 text also does, so it gets its own hint.
    """
    if raw.startswith(_UTF16_BOMS):
        raise DataError(f"{what} is UTF-16 text; convert it to UTF-8 first: {name}")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{what} looks binary (NUL byte at byte offset {nul}), not UTF-8 text: {name}")


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
