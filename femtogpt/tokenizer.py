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

New kinds subclass ``Tokenizer`` and register in ``_FROM_DICT`` and
``TOKENIZER_KINDS``.
"""
from __future__ import annotations

import abc
import heapq
import re
from collections import Counter

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

    def encode_utf8(self, data, what: str = "text") -> np.ndarray:
        """The ids (uint32) of a whole text given as valid UTF-8 bytes, in C."""
        from ._text import char_ids
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


# ----------------------------------------------------------------------------- bpe

#: build_tokenizer's BPE vocabulary size when none is given.
DEFAULT_BPE_VOCAB = 512

#: Largest BPE vocabulary: ids then still fit in uint16, and a bigger embedding
#: table would dwarf any model this project trains on a CPU.
MAX_BPE_VOCAB = 65536

#: Longest BPE token, in bytes. Training never merges past it, and a merge list
#: that would (only a damaged one can) is rejected: without a limit, a chain of
#: merges such as [97, 97], [256, 256], [257, 257], ... would build tokens that
#: double in length at each step. With it the vocabulary's bytes stay below
#: MAX_BPE_VOCAB * MAX_TOKEN_BYTES (16 MB) whatever the checkpoint says.
MAX_TOKEN_BYTES = 256

# The pre-split: BPE merges never cross the boundaries of these chunks, so a
# token is always (part of) a word, a number, a run of punctuation or a run of
# whitespace, never "word + following comma". GPT-2's pattern without its
# English contractions, in classes the re module understands:
#   [^\W\d_]    a letter (\w minus digits and "_"; re has no \p{L})
#   \d          a decimal digit, in any script
#   [^\s\w]|_   anything else that is not whitespace (punctuation, symbols,
#               emoji, combining marks, "_", lone surrogates)
# Each of the first three may take one leading space, which is how " the"
# becomes one token. A whitespace run gives up its last character when a
# non-space follows (\s+(?!\S)), so that character can lead the next chunk.
# Every character is whitespace, a letter, a digit or "anything else", so the
# chunks cover the text exactly once: "".join(findall(text)) == text.
_PRESPLIT = re.compile(
    r" ?[^\W\d_]+"
    r"| ?\d+"
    r"| ?(?:[^\s\w]|_)+"
    r"|\s+(?!\S)"
    r"|\s+"
)

_SURROGATE = re.compile("[\ud800-\udfff]")

# encode_array hands texts of at least this many characters to the C encoder.
_NATIVE_MIN_CHARS = 1 << 14

# Chunks longer than this many bytes are encoded by the heap-based merge,
# O(n log n), instead of the simple rescanning loop, O(n * merges applied).
_LONG_CHUNK = 48


def _presplit_text(text: str) -> str:
    """text, made safe to split and encode chunk by chunk with "surrogateescape".

    Text without surrogates is returned as is. Otherwise it becomes the str
    whose "surrogateescape" encoding is exactly _to_utf8(text), the bytes the
    byte tokenizer would produce (the choice between surrogateescape and
    surrogatepass is made once for the whole text, as _to_utf8 does).
    """
    if _SURROGATE.search(text) is None:
        return text
    return _to_utf8(text).decode("utf-8", errors="surrogateescape")


def _chunk_bytes(chunk: str) -> bytes:
    return chunk.encode("utf-8", errors="surrogateescape")


def _merge_pair(seq: list, a: int, b: int, new_id: int) -> list:
    """seq with every occurrence of the pair (a, b), scanned left to right, replaced by new_id."""
    out = []
    i, n = 0, len(seq)
    while i < n:
        if i + 1 < n and seq[i] == a and seq[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def _train_merges(text: str, vocab_size: int) -> list[tuple[int, int]]:
    """The merges of a BPE vocabulary of (at most) vocab_size tokens learned from text.

    Works on the distinct chunks of the pre-split, each weighted by how often
    it occurs. Pair counts are kept up to date incrementally: merging a pair
    only rewrites the chunks that contain it (found through an index from pair
    to chunks), and a heap with lazy deletion yields the most frequent pair.
    Ties go to the smallest pair (a, b), so the result depends only on the
    text and vocab_size. A pair whose token would be longer than
    MAX_TOKEN_BYTES is never merged.
    """
    chunk_counts = Counter(_PRESPLIT.findall(_presplit_text(text)))
    # Single-byte chunks have no pair: they can never take part in a merge.
    words = [list(_chunk_bytes(c)) for c in chunk_counts]
    counts = list(chunk_counts.values())
    keep = [i for i, w in enumerate(words) if len(w) >= 2]
    words = [words[i] for i in keep]
    counts = [counts[i] for i in keep]

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}
    for w, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + count
            where.setdefault(pair, set()).add(w)
    heap = [(-count, a, b) for (a, b), count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    lengths = [1] * 256  # bytes in each token
    too_long: set[tuple[int, int]] = set()
    new_id = 256
    while new_id < vocab_size:
        # The first entry whose count is still current is the best pair; the
        # others were pushed before a later count change, or for pairs since merged.
        while heap:
            neg_count, a, b = heapq.heappop(heap)
            if pair_counts.get((a, b)) == -neg_count:
                if lengths[a] + lengths[b] <= MAX_TOKEN_BYTES:
                    break
                too_long.add((a, b))  # counted still, but never pushed again
        else:
            break  # no pair left anywhere: the text is exhausted
        pair = (a, b)
        del pair_counts[pair]
        delta: dict[tuple[int, int], int] = {}
        for w in where.pop(pair):
            word, count = words[w], counts[w]
            new_word = _merge_pair(word, a, b, new_id)
            old_pairs = list(zip(word, word[1:]))
            new_pairs = list(zip(new_word, new_word[1:]))
            for p in old_pairs:
                delta[p] = delta.get(p, 0) - count
            for p in new_pairs:
                delta[p] = delta.get(p, 0) + count
            old_set, new_set = set(old_pairs), set(new_pairs)
            for p in old_set - new_set:
                chunks = where.get(p)
                if chunks is not None:
                    chunks.discard(w)
            for p in new_set - old_set:
                where.setdefault(p, set()).add(w)
            words[w] = new_word
        delta.pop(pair, None)
        for p, d in delta.items():
            if d == 0:
                continue
            count = pair_counts.get(p, 0) + d
            if count > 0:
                pair_counts[p] = count
                if p not in too_long:
                    heapq.heappush(heap, (-count, p[0], p[1]))
            else:
                pair_counts.pop(p, None)
                where.pop(p, None)
        merges.append(pair)
        lengths.append(lengths[a] + lengths[b])
        new_id += 1
    return merges


def _check_merges(merges) -> list[tuple[int, int]]:
    """Validate a merge list (from a possibly damaged checkpoint); return it as tuples.

    Merge i creates token 256 + i from two tokens that already exist, so both
    ids must be below 256 + i; a pair may be merged only once; no token may
    be longer than MAX_TOKEN_BYTES.
    """
    if not isinstance(merges, (list, tuple)):
        raise TokenizerError(f"bpe tokenizer merges must be a list, got {type(merges).__name__}")
    if len(merges) > MAX_BPE_VOCAB - 256:
        raise TokenizerError(
            f"bpe tokenizer has {len(merges)} merges, more than the limit of {MAX_BPE_VOCAB - 256} "
            f"(a vocabulary of {MAX_BPE_VOCAB})"
        )
    checked: list[tuple[int, int]] = []
    seen: dict[tuple[int, int], int] = {}
    lengths = [1] * 256
    for i, merge in enumerate(merges):
        if not isinstance(merge, (list, tuple)) or len(merge) != 2:
            raise TokenizerError(f"bpe tokenizer merge {i} must be a pair of token ids, got {merge!r}")
        for token in merge:
            if isinstance(token, bool) or not isinstance(token, int):
                raise TokenizerError(f"bpe tokenizer merge {i} must be a pair of integers, got {merge!r}")
            if token < 0 or token >= 256 + i:
                raise TokenizerError(
                    f"bpe tokenizer merge {i} {list(merge)} refers to token {token}, which does not "
                    f"exist yet (merge {i} creates token {256 + i})"
                )
        pair = (int(merge[0]), int(merge[1]))
        if pair in seen:
            raise TokenizerError(
                f"bpe tokenizer merge {i} {list(pair)} is a duplicate of merge {seen[pair]}"
            )
        length = lengths[pair[0]] + lengths[pair[1]]
        if length > MAX_TOKEN_BYTES:
            raise TokenizerError(
                f"bpe tokenizer merge {i} {list(pair)} makes a token of {length} bytes, "
                f"more than the limit of {MAX_TOKEN_BYTES}"
            )
        lengths.append(length)
        seen[pair] = i
        checked.append(pair)
    return checked


class BPETokenizer(Tokenizer):
    """Byte-level byte-pair encoding, GPT-2 style.

    Ids 0..255 are the byte values; id 256 + i is merge i, the concatenation
    of the two tokens merges[i]. Text is cut into chunks by a GPT-2-like
    pre-split (words with their leading space, numbers, punctuation,
    whitespace runs), each chunk's UTF-8 bytes are turned into byte ids, and
    the merges are applied in the order they were learned. Any str encodes,
    so encoding never fails; decoding shows invalid or incomplete UTF-8 as
    U+FFFD.
    """

    kind = "bpe"
    # The pre-split pattern (a subclass may use another one).
    _presplit = _PRESPLIT
    # The same pattern for the C encoder (bulk_encode.py): a regex class for
    # each of letter, number and white space, and whether GPT-2's English
    # contractions come first.
    _presplit_classes = (r"[^\W\d_]", r"\d", r"\s")
    _contractions = False

    def __init__(self, merges=()):
        self._merges = _check_merges(merges)
        # (a, b) -> the id it merges into; ids grow with merge order, so the
        # smallest id among a chunk's pairs is the merge to apply first.
        self._ranks = {pair: 256 + i for i, pair in enumerate(self._merges)}
        vocab = [bytes([b]) for b in range(256)]
        for a, b in self._merges:
            vocab.append(vocab[a] + vocab[b])
        self._vocab = vocab

    @classmethod
    def train(cls, text: str, vocab_size: int = DEFAULT_BPE_VOCAB) -> "BPETokenizer":
        """Learn up to vocab_size - 256 merges from text.

        Training stops early when no chunk of the text has two tokens left to
        merge; the vocabulary is then smaller than vocab_size (at least 256).
        The result depends only on text and vocab_size: ties between equally
        frequent pairs go to the smallest pair of ids.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"expected text as a str, got {type(text).__name__}")
        _check_bpe_vocab_size(vocab_size)
        return cls(_train_merges(text, vocab_size))

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges in the order they were learned: merge i creates id 256 + i."""
        return list(self._merges)

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for."""
        return self.decode_bytes([token_id])

    # -- encoding

    def encode(self, text: str, what: str = "text") -> list[int]:
        ids: list[int] = []
        self._encode_chunks(self._presplit.findall(_presplit_text(text)), ids, {})
        return ids

    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        if len(text) >= _NATIVE_MIN_CHARS and _SURROGATE.search(text) is None:
            return self._encode_utf8_internal(text.encode("utf-8")).astype(self.id_dtype)
        text = _presplit_text(text)
        cache: dict[str, tuple[int, ...]] = {}
        pieces = []
        carry = ""
        for start in range(0, len(text), _CHUNK_CHARS):
            piece = carry + text[start:start + _CHUNK_CHARS]
            chunks = self._presplit.findall(piece)
            if start + _CHUNK_CHARS < len(text):
                # The last chunk may continue in the next slice (or be split
                # differently once the next character is known): keep it for then.
                carry = chunks.pop()
            else:
                carry = ""
            ids: list[int] = []
            self._encode_chunks(chunks, ids, cache)
            pieces.append(np.array(ids, dtype=self.id_dtype))
        if not pieces:
            return np.zeros(0, dtype=self.id_dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def encode_utf8(self, data) -> np.ndarray:
        """The ids (uint32) of a whole text given as valid UTF-8 bytes: those of
        encode_array(data.decode()), computed in C on every OpenMP thread."""
        return self._encode_utf8_internal(data)

    def presplit_class_table(self) -> np.ndarray:
        """The class of every code point in this tokenizer's pre-split (C encoder)."""
        from .bulk_encode import class_table
        return class_table(*self._presplit_classes)

    def _encode_utf8_internal(self, data) -> np.ndarray:
        native = self.__dict__.get("_native")
        if native is None:
            from .bulk_encode import NativeBPE
            native = self._native = NativeBPE(self._merges, self.presplit_class_table(),
                                              self._contractions)
        from ._text import max_threads
        return native.encode(data, max_threads())

    def cut_outside_specials(self, data, cut):
        """cut, or an earlier safe place if cut falls inside a special token
        (BPEStream asks; plain BPE has no special tokens)."""
        return cut

    def _encode_chunks(self, chunks, ids: list, cache: dict) -> None:
        """Append the ids of each chunk to ids; cache maps chunk -> ids.

        A dataset repeats the same few thousand words over and over, so
        after the first occurrence each chunk costs one dict lookup.
        """
        extend = ids.extend
        for chunk in chunks:
            cached = cache.get(chunk)
            if cached is None:
                cached = cache[chunk] = tuple(self._encode_bytes(_chunk_bytes(chunk)))
            extend(cached)

    def _encode_bytes(self, data: bytes) -> list[int]:
        """The ids of one chunk: its bytes with the merges applied in learned order."""
        if len(data) > _LONG_CHUNK:
            return self._encode_long(data)
        ids = list(data)
        ranks = self._ranks
        while len(ids) >= 2:
            best = None
            for pair in zip(ids, ids[1:]):
                rank = ranks.get(pair)
                if rank is not None and (best is None or rank < best):
                    best = rank
            if best is None:
                break
            a, b = self._merges[best - 256]
            ids = _merge_pair(ids, a, b, best)
        return ids

    def _encode_long(self, data: bytes) -> list[int]:
        """Same result as the loop in _encode_bytes, in O(n log n) for a long chunk.

        The chunk is a doubly linked list of tokens; a heap holds (rank,
        position) for each adjacent pair that has a merge. Popping the smallest
        rank, leftmost first, applies the merges in the same order as the
        simple loop: a merge only creates pairs involving its new token, whose
        own merges all rank later. Stale heap entries are skipped.
        """
        ranks = self._ranks
        tokens = list(data)
        n = len(tokens)
        nxt = list(range(1, n + 1))  # n means "no next token"
        prv = list(range(-1, n - 1))
        heap = []
        for i in range(n - 1):
            rank = ranks.get((tokens[i], tokens[i + 1]))
            if rank is not None:
                heap.append((rank, i))
        heapq.heapify(heap)
        merges = self._merges
        while heap:
            rank, i = heapq.heappop(heap)
            j = nxt[i]
            if tokens[i] < 0 or j >= n or (tokens[i], tokens[j]) != merges[rank - 256]:
                continue
            tokens[i] = rank
            tokens[j] = -1
            k = nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                r = ranks.get((rank, tokens[k]))
                if r is not None:
                    heapq.heappush(heap, (r, i))
            h = prv[i]
            if h >= 0:
                r = ranks.get((tokens[h], rank))
                if r is not None:
                    heapq.heappush(heap, (r, h))
        return [t for t in tokens if t >= 0]

    # -- decoding

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        vocab = self._vocab
        return b"".join([vocab[i] for i in _ids_to_array(ids, self.vocab_size).tolist()])

    def to_dict(self) -> dict:
        return {"type": self.kind, "merges": [list(pair) for pair in self._merges]}


def _check_bpe_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
        raise TokenizerError(f"bpe vocab size must be an integer, got {vocab_size!r}")
    if vocab_size < 256:
        raise TokenizerError(
            f"bpe vocab size must be at least 256 (the byte values it starts from), got {vocab_size}"
        )
    if vocab_size > MAX_BPE_VOCAB:
        raise TokenizerError(f"bpe vocab size {vocab_size} is more than the limit of {MAX_BPE_VOCAB}")


# Keys each kind's dict must have (besides "type"); anything else in a dict
# from a file means it is damaged or from an incompatible version.
_DICT_KEYS = {"char": {"type", "chars"}, "byte": {"type"}, "bpe": {"type", "merges"}}

_FROM_DICT = {
    "char": lambda d: CharTokenizer(d["chars"]),
    "byte": lambda d: ByteTokenizer(),
    "bpe": lambda d: BPETokenizer(d["merges"]),
}

# The kinds `femtogpt train --tokenizer` fits to a text (gpt2 comes with its model).
TOKENIZER_KINDS = tuple(sorted(_FROM_DICT))


def _gpt2_from_dict(d):
    from .gpt2_tokenizer import GPT2Tokenizer
    return GPT2Tokenizer(d["byte_ids"], d["merges"], d["specials"])


_DICT_KEYS["gpt2"] = {"type", "byte_ids", "merges", "specials"}
_FROM_DICT["gpt2"] = _gpt2_from_dict


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


def build_tokenizer(kind: str, text: str, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer named by the --tokenizer option, fitted to the training text.

    vocab_size is the size a "bpe" tokenizer trains up to (default
    DEFAULT_BPE_VOCAB, at least 256). If the text runs out of pairs to merge
    first, the tokenizer stops there and its vocab_size is what was reached.
    "char" and "byte" have a vocabulary fixed by the text or by UTF-8, and
    ignore vocab_size.
    """
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
