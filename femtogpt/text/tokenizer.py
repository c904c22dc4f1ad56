"""Tokenizers: turn text into integer ids for the model, and back.

Training encodes the whole dataset once (``encode_array``), sampling encodes a
short prompt (``encode``) and decodes generated ids (``decode`` /
``decode_bytes``). A checkpoint stores ``to_dict()`` so that sampling later
rebuilds exactly the tokenizer the model was trained with
(``tokenizer_from_dict``).

Three kinds exist:

* ``char``: one id per distinct character of the training text (nanoGPT's
  Shakespeare recipe). Tiny vocabulary, but it cannot represent a character it
  never saw.
* ``byte``: one id per UTF-8 byte value (256 ids). Represents any text at all,
  at the cost of several ids for each non-ASCII character.
* ``bpe``: byte-level byte-pair encoding (the GPT-2 family): the 256 byte
  values plus tokens learned from the training text by repeatedly merging the
  most frequent adjacent pair. Represents any text, in fewer ids than ``byte``.

This module holds what they share (the ``Tokenizer`` interface and the id
arrays); each kind has its own module (char.py, byte.py, bpe.py, gpt2.py),
and registry.py, above them all, names the kinds and rebuilds one from a
checkpoint. A new kind subclasses ``Tokenizer`` and registers there.
"""
from __future__ import annotations

import abc

import numpy as np

from ..errors import TokenizerError

# A vocabulary this large means the text is not the kind of text a char-level
# model suits (and the embedding table alone would dwarf a small model).
MAX_CHAR_VOCAB = 65536

# How many distinct offending characters an error message shows; beyond that
# the message would stop being one readable line.
_MAX_SHOWN = 10

# encode_array works on slices of this many characters so that its temporary
# UTF-32 buffers stay a few MB even for a dataset of hundreds of MB.
_CHUNK_CHARS = 1 << 22


def compact_id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that can hold every id of a vocabulary.

    A Shakespeare-sized dataset is ~1M ids; storing them as uint8 instead of
    int64 keeps the encoded dataset 8x smaller in memory.
    """
    largest_id = max(vocab_size - 1, 0)
    for dtype in (np.uint8, np.uint16, np.uint32):
        if largest_id <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


def _ids_to_array(ids, vocab_size: int) -> np.ndarray:
    """Check a sequence of ids before decoding it; return it as an int64 array.

    ids come from the model's sampler, which should never produce a bad one, so
    a bad id means a mismatched checkpoint or a bug: fail loudly rather than
    silently emit garbage.
    """
    if isinstance(ids, (str, bytes)):
        raise TokenizerError(f"ids must be a sequence of integers, not {type(ids).__name__}")
    array = np.asarray(ids)
    if array.size == 0:
        # np.asarray([]) is float64; an empty sequence is valid whatever its dtype.
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise TokenizerError(f"ids must be a flat sequence, got an array of shape {array.shape}")
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TokenizerError(f"ids must be integers, got {array.dtype} values")
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise TokenizerError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")
    return array.astype(np.int64, copy=False)


def _to_utf8(text: str) -> bytes:
    """UTF-8 bytes of any Python str, even one holding lone surrogates.

    A valid file never yields surrogates, but a command-line prompt can: Python
    maps undecodable argv bytes to U+DC80..U+DCFF ("surrogateescape"), which
    this turns back into the user's original bytes. Any other lone surrogate is
    written as its 3-byte form rather than raising.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return text.encode("utf-8", errors="surrogatepass")


def _describe_unknown(text: str, known, what: str) -> str:
    """One-line message listing the characters of text that are not in known.

    Characters are listed in order of first appearance (the first problem is
    the one the user will look for), with repr so that '\\n' or a non-breaking
    space is visible.
    """
    shown: dict[str, None] = {}
    for ch in text:
        if ch not in known and ch not in shown:
            shown[ch] = None
            if len(shown) == _MAX_SHOWN:
                break
    total = len(set(text).difference(known))
    listed = ", ".join(repr(ch) for ch in shown)
    more = f" (and {total - len(shown)} more)" if total > len(shown) else ""
    return f"{what} has characters the tokenizer does not know: {listed}{more}"


class Tokenizer(abc.ABC):
    """What training and sampling need from a tokenizer.

    ``what`` in the encode methods names the text in error messages
    ("prompt", "training text"), since the messages go to users as-is.
    """

    #: The "type" written by to_dict and accepted by build_tokenizer.
    kind: str = ""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; ids are 0 .. vocab_size - 1."""

    @property
    def id_dtype(self) -> np.dtype:
        """dtype of encode_array's result (the smallest that holds every id)."""
        return compact_id_dtype(self.vocab_size)

    @abc.abstractmethod
    def encode(self, text: str, what: str = "text") -> list[int]:
        """ids of text, as a Python list (for prompts)."""

    @abc.abstractmethod
    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        """ids of text as a compact numpy array (for whole datasets)."""

    @abc.abstractmethod
    def decode(self, ids) -> str:
        """The text of a sequence of ids."""

    @abc.abstractmethod
    def decode_bytes(self, ids) -> bytes:
        """UTF-8 bytes of a sequence of ids.

        A streaming sampler feeds these to an incremental UTF-8 decoder
        (codecs.getincrementaldecoder("utf-8")(errors="replace")) so it can
        print each character as soon as its last byte has been generated.
        """

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """A JSON-serialisable description; tokenizer_from_dict inverts it."""

    def __eq__(self, other) -> bool:
        if not isinstance(other, Tokenizer):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self.to_dict()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"
