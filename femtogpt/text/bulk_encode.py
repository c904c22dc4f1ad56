"""Byte-level BPE over long UTF-8 texts, in C and on every core (femtogpt/_text.pyx).

BPETokenizer.encode_utf8 and the corpus preparation (token_cache.py) come here;
the result is exactly the Python loop's (tokenizer.py), which stays the
definition and serves short texts such as prompts. Three pieces:

* class_table: each code point's class in a pre-split pattern (letter,
  number, white space, other), read off the pattern's own regex classes, so
  that the C state machine and Python's re agree by construction;
* safe cuts (found in C, _text.last_safe_cut / first_safe_cut): places
  where the pre-split always starts a new chunk, whatever comes before, so
  that a text cut there encodes to the concatenation of its parts' ids. That lets the text be cut into pieces for the threads, and a
  corpus be read block by block;
* BPEStream: a corpus block by block, holding back the text after the last
  safe cut until the next block (or the end) completes it.
"""
from __future__ import annotations

import functools
import re
import threading

import numpy as np

# Code point classes, as _text.pyx numbers them.
LETTER, NUMBER, SPACE, OTHER = 0, 1, 2, 3
N_CODE_POINTS = 0x110000

# A safe cut is a place where the pre-split always starts a chunk, and where
# the text before it ends the same way with or without what follows (the
# rules, in any script, are _text._is_safe_cut's): a text cut there encodes to
# the concatenation of its parts' ids.

# Pieces smaller than this are not worth a thread of their own.
MIN_PIECE_BYTES = 1 << 16
# How far from its ideal place a piece edge is looked for.
CUT_SEARCH_BYTES = 1 << 20


@functools.lru_cache(maxsize=4)
def class_table(letter: str, number: str, space: str) -> np.ndarray:
    """uint8 (0x110000,): the class of every code point, given one regex
    character class for each of letter, number and white space (the rest is
    other). Surrogates, which UTF-8 cannot hold, are other. Raises if a code
    point falls in two classes (the pattern's alternatives would then overlap).
    """
    low, high = "".join(map(chr, range(0xD800))), "".join(map(chr, range(0xE000, N_CODE_POINTS)))
    text = low + high
    code_points = np.concatenate([np.arange(0xD800), np.arange(0xE000, N_CODE_POINTS)])
    table = np.full(N_CODE_POINTS, OTHER, dtype=np.uint8)
    for cls, pattern in ((LETTER, letter), (NUMBER, number), (SPACE, space)):
        member = np.zeros(len(text), dtype=bool)
        for m in re.finditer(f"(?:{pattern})+", text):
            member[m.start():m.end()] = True
        hits = code_points[member]
        if (table[hits] != OTHER).any():
            raise RuntimeError(f"pre-split classes overlap ({pattern!r})")
        table[hits] = cls
    table.setflags(write=False)
    return table


def cut_after(data, pos: int, limit: int, classes) -> int | None:
    """The first safe cut in data[pos:limit], or None."""
    from ._native import first_safe_cut
    cut = first_safe_cut(np.frombuffer(data, np.uint8), pos, limit, classes)
    return None if cut < 0 else cut


def last_cut(data, classes) -> int | None:
    """The last safe cut of data that has text after it, or None."""
    from ._native import last_safe_cut
    cut = last_safe_cut(np.frombuffer(data, np.uint8), classes)
    return None if cut <= 0 else cut


def piece_bounds(data, n_pieces: int, classes) -> np.ndarray:
    """int64 edges that cut data into about n_pieces parts at safe cuts."""
    n = len(data)
    edges = [0]
    for k in range(1, n_pieces):
        target = max(edges[-1] + 1, n * k // n_pieces)
        if target >= n:
            break
        cut = cut_after(data, target, min(n, target + CUT_SEARCH_BYTES), classes)
        if cut is not None and cut > edges[-1]:
            edges.append(cut)
    edges.append(n)
    return np.array(edges, dtype=np.int64)


class NativeBPE:
    """The C encoder for one tokenizer's merges and pre-split classes."""

    def __init__(self, merges, classes: np.ndarray, contractions: bool):
        from . import _native as _text
        pairs = np.array(merges, dtype=np.int32).reshape(-1, 2)
        self.classes = classes
        self._encoder = _text.Encoder(np.ascontiguousarray(pairs), classes, bool(contractions))
        # The encoder's word caches are one per OpenMP thread of one call: two
        # Python threads encoding at once would share them.
        self._lock = threading.Lock()

    def encode(self, data, threads: int) -> np.ndarray:
        """Internal ids (uint32) of data, UTF-8 bytes of a complete text."""
        data = np.frombuffer(data, dtype=np.uint8)
        n = len(data)
        if n == 0:
            return np.zeros(0, dtype=np.uint32)
        pieces = max(1, min(4 * threads, n // MIN_PIECE_BYTES)) if threads > 1 else 1
        bounds = piece_bounds(data.data, pieces, self.classes) if pieces > 1 \
            else np.array([0, n], np.int64)
        out = np.empty(n, dtype=np.uint32)
        counts = np.zeros(len(bounds) - 1, dtype=np.int64)
        with self._lock:
            self._encoder.encode(data, bounds, out, counts)
        if len(counts) == 1:
            return out[:counts[0]].copy()
        return np.concatenate([out[a:a + c] for a, c in zip(bounds[:-1].tolist(),
                                                             counts.tolist())])


class BPEStream:
    """Encode a text given block by block: feed() returns the ids of the text
    up to the last safe cut seen so far, finish() those of the rest.

    A block without any safe cut (megabytes without a single space or line
    break between two words) is held until one comes: memory then grows with
    that stretch of text.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.classes = tokenizer.presplit_class_table()
        self.carry = b""

    def feed(self, block: bytes) -> np.ndarray:
        data = self.carry + block if self.carry else block
        cut = last_cut(data, self.classes)
        cut = self.tokenizer.cut_outside_specials(data, cut) if cut is not None else None
        if cut is None:
            self.carry = data
            return np.zeros(0, dtype=np.uint32)
        self.carry = data[cut:]
        return self.tokenizer.encode_utf8(data[:cut])

    def finish(self) -> np.ndarray:
        data, self.carry = self.carry, b""
        return self.tokenizer.encode_utf8(data)
