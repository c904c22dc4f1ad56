"""Byte-level byte-pair encoding (the GPT-2 family): the 256 byte values plus
tokens learned from the training text by repeatedly merging the most frequent
adjacent pair. It represents any text, in fewer ids than the byte tokenizer.

Training is Python over word counts; encoding long texts goes to the C
encoder (bulk_encode.py over _native.pyx), short ones stay in Python."""
from __future__ import annotations

import heapq
import re
from collections import Counter

import numpy as np

from ..errors import TokenizerError
from .tokenizer import _CHUNK_CHARS, Tokenizer, _ids_to_array, _to_utf8


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
        from ._native import max_threads
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
