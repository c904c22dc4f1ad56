"""The byte tokenizer: one id per UTF-8 byte value (256 ids). It represents
any text at all, at the cost of several ids for each non-ASCII character."""
from __future__ import annotations

import numpy as np

from .tokenizer import Tokenizer, _ids_to_array, _to_utf8


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

    def encode_utf8(self, data, what: str = "text") -> np.ndarray:
        """The ids of a whole text given as UTF-8 bytes: the bytes."""
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids) -> str:
        # The model can emit any byte sequence, including a character cut in
        # half or bytes that are never valid UTF-8: show U+FFFD, don't crash.
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        return _ids_to_array(ids, self.vocab_size).astype(np.uint8).tobytes()

    def to_dict(self) -> dict:
        return {"type": self.kind}
