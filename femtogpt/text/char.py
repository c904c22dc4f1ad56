"""The char tokenizer: one id per distinct character of the training text
(nanoGPT's Shakespeare recipe). A tiny vocabulary, but it cannot represent a
character it never saw: encoding one is refused with the characters named."""
from __future__ import annotations

import numpy as np

from ..errors import TokenizerError
from .tokenizer import (MAX_CHAR_VOCAB, _CHUNK_CHARS, Tokenizer, _describe_unknown,
                        _ids_to_array, _to_utf8)


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

    def encode_utf8(self, data, what: str = "text") -> np.ndarray:
        """The ids (uint32) of a whole text given as valid UTF-8 bytes, in C."""
        from ._native import char_ids
        out = np.empty(len(data), dtype=np.uint32)
        n, first_bad = char_ids(np.frombuffer(data, np.uint8), self._codepoint_lookup(), out)
        if first_bad >= 0:
            raise TokenizerError(_describe_unknown(bytes(data).decode("utf-8", "replace"),
                                                   self._stoi, what))
        return out[:n]

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
