"""A bounded sample of a corpus's training text, for a tokenizer to learn
from: its memory is the sample's, whatever the corpus's size."""
from __future__ import annotations

import numpy as np

from . import corpus
from ..errors import DataError


def sample_training_text(sources, blocks, train_chars, sample_bytes, n_pieces):
    """The text a tokenizer learns from: the training text itself when it is
    at most sample_bytes, else n_pieces evenly spaced pieces of it, together
    sample_bytes, each cut to whole lines. Deterministic: the same corpus gives the same sample,
    and so the same merges.

    blocks: pass 1's (first character, characters, source, offset, bytes).
    """
    approx = sum(n for start, _, _, _, n in blocks if start < train_chars)
    if approx <= sample_bytes:
        text, got = [], 0
        for block in corpus.read_blocks(sources):
            take = block.text[:train_chars - got]
            text.append(take)
            got += len(take)
            if got >= train_chars:
                break
        return "".join(text)
    # Blocks wholly inside the training text (the one the split cuts is left out).
    inside = [(source, offset, n) for start, chars, source, offset, n in blocks
              if start + chars <= train_chars]
    starts = np.cumsum([0] + [n for _, _, n in inside])
    train_bytes = int(starts[-1])
    piece = sample_bytes // n_pieces
    pieces, handles = [], {}
    try:
        for i in range(n_pieces):
            at = (train_bytes - piece) * i // (n_pieces - 1)
            b = int(np.searchsorted(starts, at, side="right") - 1)
            source, offset, n = inside[b]
            within = at - int(starts[b])
            f = handles.get(source)
            if f is None:
                f = handles[source] = open(sources[source].path, "rb")
            f.seek(offset + within)
            raw = f.read(min(piece, n - within))
            # Whole lines where the piece has them; else whole characters.
            first, last = raw.find(b"\n"), raw.rfind(b"\n")
            if 0 <= first < last:
                raw = raw[first + 1:last + 1]
            pieces.append(raw.decode("utf-8", errors="ignore"))
    except OSError as err:
        raise DataError(f"cannot read the corpus to sample it: {err.strerror or err}") from None
    finally:
        for f in handles.values():
            f.close()
    return "".join(pieces)
