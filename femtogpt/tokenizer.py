"""Tokenizers: turn text into integer ids for the model, and back.

Training encodes the whole dataset once (``encode_array``), sampling encodes a
short prompt (``encode``) and decodes generated ids (``decode`` /
``decode_bytes``). A checkpoint stores ``to_dict()`` so that sampling later
rebuilds exactly the tokenizer the model was trained with
(``tokenizer_from_dict``).

Two kinds exist today:

* ``char``: one id per distinct character of the training text (nanoGPT's
  Shakespeare recipe). Tiny vocabulary, but it cannot represent a character it
  never saw.
* ``byte``: one id per UTF-8 byte value (256 ids). Represents any text at all,
  at the cost of several ids for each non-ASCII character.

New kinds (BPE) subclass ``Tokenizer`` and register in ``_FROM_DICT`` and
``TOKENIZER_KINDS``.
"""
from __future__ import annotations

import abc

import numpy as np

from femtogpt.errors import TokenizerError

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


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is a sorted string of distinct characters."""

    kind = "char"

    def __init__(self, chars: str):
        _check_chars(chars)
        self._chars = chars
        self._stoi = {ch: i for i, ch in enumerate(chars)}
        # Codepoints in id order: decoding is an array lookup, not a Python loop.
        self._codepoints = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        self._lookup = None  # built on the first encode_array call

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """The vocabulary of text: its distinct characters, sorted by codepoint."""
        if not isinstance(text, str):
            raise TokenizerError(f"expected text as a str, got {type(text).__name__}")
        distinct = set(text)
        if not distinct:
            raise TokenizerError("cannot build a character vocabulary from empty text")
        if len(distinct) > MAX_CHAR_VOCAB:
            raise TokenizerError(
                f"text has {len(distinct)} distinct characters, more than the character "
                f"tokenizer's limit of {MAX_CHAR_VOCAB}; use --tokenizer byte"
            )
        return cls("".join(sorted(distinct)))

    @property
    def chars(self) -> str:
        """The vocabulary: character i has id i."""
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    def encode(self, text: str, what: str = "text") -> list[int]:
        try:
            return [self._stoi[ch] for ch in text]
        except KeyError:
            raise TokenizerError(_describe_unknown(text, self._stoi, what)) from None

    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        lookup = self._codepoint_lookup()
        out = np.empty(len(text), dtype=self.id_dtype)
        for start in range(0, len(text), _CHUNK_CHARS):
            piece = text[start:start + _CHUNK_CHARS]
            codepoints = np.frombuffer(piece.encode("utf-32-le", "surrogatepass"), dtype="<u4")
            # Codepoints above the table's end all map to its last slot, which is "unknown".
            ids = lookup[np.minimum(codepoints, len(lookup) - 1)]
            if (ids < 0).any():
                raise TokenizerError(_describe_unknown(text, self._stoi, what))
            out[start:start + len(piece)] = ids
        return out

    def _codepoint_lookup(self) -> np.ndarray:
        """Table from codepoint to id, -1 where the vocabulary lacks the codepoint.

        Sized by the largest codepoint in the vocabulary (at most ~4 MB for
        emoji), plus one trailing -1 slot that stands for every larger codepoint.
        """
        if self._lookup is None:
            table = np.full(int(self._codepoints.max()) + 2, -1, dtype=np.int32)
            table[self._codepoints] = np.arange(self.vocab_size, dtype=np.int32)
            self._lookup = table
        return self._lookup

    def decode(self, ids) -> str:
        array = _ids_to_array(ids, self.vocab_size)
        return self._codepoints[array].tobytes().decode("utf-32-le", "surrogatepass")

    def decode_bytes(self, ids) -> bytes:
        return _to_utf8(self.decode(ids))

    def to_dict(self) -> dict:
        return {"type": self.kind, "chars": self._chars}

    def __repr__(self) -> str:
        preview = self._chars if len(self._chars) <= 20 else self._chars[:20] + "..."
        return f"CharTokenizer(vocab_size={self.vocab_size}, chars={preview!r})"


def _check_chars(chars) -> None:
    """A char vocabulary must be a non-empty string of strictly increasing characters.

    Strictly increasing rules out duplicates and also pins down the id of each
    character: a vocabulary read from a damaged file that is merely permuted
    would silently scramble every token, so it is rejected too.
    """
    if not isinstance(chars, str):
        raise TokenizerError(f"char tokenizer vocabulary must be a string, got {type(chars).__name__}")
    if not chars:
        raise TokenizerError("char tokenizer vocabulary is empty")
    if len(chars) > MAX_CHAR_VOCAB:
        raise TokenizerError(
            f"char tokenizer vocabulary has {len(chars)} characters, more than the limit of {MAX_CHAR_VOCAB}"
        )
    for i in range(1, len(chars)):
        if chars[i - 1] == chars[i]:
            raise TokenizerError(f"char tokenizer vocabulary has a duplicate character {chars[i]!r}")
        if chars[i - 1] > chars[i]:
            raise TokenizerError(
                f"char tokenizer vocabulary is not sorted: {chars[i - 1]!r} comes before {chars[i]!r}"
            )


class ByteTokenizer(Tokenizer):
    """One id per byte of the UTF-8 encoding: represents any text, never fails to encode."""

    kind = "byte"

    @property
    def vocab_size(self) -> int:
        return 256

    def encode(self, text: str, what: str = "text") -> list[int]:
        return list(_to_utf8(text))

    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        # bytearray, not bytes: frombuffer then gives a writable array without a second copy.
        return np.frombuffer(bytearray(_to_utf8(text)), dtype=np.uint8)

    def decode(self, ids) -> str:
        # The model can emit any byte sequence, including a character cut in
        # half or bytes that are never valid UTF-8: show U+FFFD, don't crash.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return _ids_to_array(ids, self.vocab_size).astype(np.uint8).tobytes()

    def to_dict(self) -> dict:
        return {"type": self.kind}


# Keys each kind's dict must have (besides "type"); anything else in a dict
# from a file means it is damaged or from an incompatible version.
_DICT_KEYS = {"char": {"type", "chars"}, "byte": {"type"}}

_FROM_DICT = {
    "char": lambda d: CharTokenizer(d["chars"]),
    "byte": lambda d: ByteTokenizer(),
}

TOKENIZER_KINDS = tuple(sorted(_FROM_DICT))


def tokenizer_from_dict(d) -> Tokenizer:
    """Rebuild a tokenizer from to_dict()'s output, as read back from a checkpoint.

    The dict comes from a file that may be damaged, so every field is checked
    and every problem is a TokenizerError.
    """
    if not isinstance(d, dict):
        raise TokenizerError(f"tokenizer description must be an object, got {type(d).__name__}")
    kind = d.get("type")
    if not isinstance(kind, str):
        raise TokenizerError("tokenizer description has no \"type\" string")
    if kind not in _FROM_DICT:
        raise TokenizerError(f"unknown tokenizer type {kind!r}; known types: {', '.join(TOKENIZER_KINDS)}")
    keys = set(d)
    expected = _DICT_KEYS[kind]
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        problem = f"missing {missing}" if missing else f"unexpected {extra}"
        raise TokenizerError(f"{kind} tokenizer description has {problem} keys")
    return _FROM_DICT[kind](d)


def build_tokenizer(kind: str, text: str) -> Tokenizer:
    """The tokenizer named by the --tokenizer option, fitted to the training text."""
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
