"""The SentencePiece tokenizer: a model of Google's `sentencepiece` library
(the tokenizer of Llama 1-2, T5, Mistral, Gemma), trained here on the corpus
or given as a .model file, and used as it is: encode is the library's own.

Trained here (`--tokenizer sentencepiece`, unigram; `sentencepiece-bpe`, BPE):
byte fallback on, so any UTF-8 text encodes (a character the pieces lack
becomes its bytes, <0xNN>); no normalisation ("identity", no dummy prefix, no
collapsing of white space), so decode(encode(x)) == x. One exception is the
library's: U+2581 (▁) is its word-boundary symbol, so a ▁ in the text comes
back as a space. A given .model keeps its own settings (Llama's adds a dummy
prefix, T5's normalises with NFKC).

The model's bytes are the vocabulary: to_dict holds them (base64) with their
xxh3-128 digest, checked when read back, so a checkpoint carries its
tokenizer whole and a damaged copy is refused.

The kind names the algorithm, as "bpe" and "char" do: sentencepiece (unigram),
sentencepiece-bpe, and for given models sentencepiece-word / -char.
"""
from __future__ import annotations

import base64

import numpy as np
import xxhash

from ..errors import TokenizerError
from . import sentencepiece_proto as proto
from .tokenizer import Tokenizer, _describe_unknown, _ids_to_array, _to_utf8

#: The kind of each SentencePiece model type (to_dict's "type").
KIND_OF_MODEL = {"unigram": "sentencepiece", "bpe": "sentencepiece-bpe",
                 "word": "sentencepiece-word", "char": "sentencepiece-char"}
SP_KINDS = tuple(KIND_OF_MODEL.values())
#: The kinds `femtogpt train --tokenizer` trains (word and char models only come given).
SP_TRAINED = ("sentencepiece", "sentencepiece-bpe")

#: The trainer learns from at most this many bytes of the training text, in
#: SP_SAMPLE_PIECES evenly spaced pieces of whole lines (corpus_sample.py), so
#: that its memory (~15x the sample for unigram) is bounded whatever the
#: corpus: unigram at 1,000 pieces trains on 8 MB in about 15 s here.
SP_SAMPLE_BYTES = 8 << 20
SP_SAMPLE_PIECES = 1024

# The trainer skips longer sentences; a longer line is cut into parts this long.
_SENTENCE_CHARS = 4096
# The trainer's random stream (EM's sampling, BPE's ties), fixed: the same
# sample gives the same model, so a prepared cache and a run agree.
_TRAINER_SEED = 1337

# The bulk encoder hands the library segments of about this many bytes, cut
# at safe places, and lets it encode them on every thread at once.
_SEGMENT_BYTES = 1 << 16
_WS = b"\t\n\x0b\x0c\r "
_ASCII_PRINTABLE = bytes(range(0x21, 0x7F))


def _spm():
    try:
        import sentencepiece
    except ImportError:       # (a dependency: only a broken install lacks it)
        raise TokenizerError("the SentencePiece tokenizer needs the sentencepiece package: "
                             "pip install sentencepiece") from None
    return sentencepiece


def _max_threads():
    from ._native import max_threads
    return max(1, max_threads())


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, from its serialized bytes (a .model file's content)."""

    def __init__(self, model: bytes, what: str = "the SentencePiece model"):
        if not isinstance(model, (bytes, bytearray)) or not model:
            raise TokenizerError(f"{what} is empty")
        self._model = bytes(model)
        self.info = proto.read_model_info(self._model, what)
        try:
            sp = _spm().SentencePieceProcessor()
            sp.LoadFromSerializedProto(self._model)
        except (RuntimeError, OSError, ValueError) as err:
            raise TokenizerError(f"{what} is not a SentencePiece model the library reads "
                                 f"({str(err).splitlines()[0] if str(err) else 'refused'})") \
                from None
        if sp.get_piece_size() < 1 or sp.get_piece_size() > 1 << 24:
            raise TokenizerError(f"{what} has {sp.get_piece_size()} pieces")
        self._sp = sp
        self.kind = KIND_OF_MODEL[self.info.model_type]
        self._unk = sp.unk_id()
        self._piece_bytes = None
        self._cut = self._cut_rule()

    # ----------------------------------------------------------------------------- making one

    @classmethod
    def from_file(cls, path) -> "SentencePieceTokenizer":
        """An existing .model file, as it is."""
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 30)
        except OSError as err:
            raise TokenizerError(f"cannot read the SentencePiece model {path}: "
                                 f"{err.strerror or err}") from None
        return cls(data, what=f"{path}")

    @classmethod
    def train(cls, text: str, vocab_size: int, model_type: str = "unigram"):
        """A model of vocab_size pieces learned from text (a bounded sample:
        the caller bounds it). Deterministic for a given text."""
        spm = _spm()
        if model_type not in ("unigram", "bpe"):
            raise TokenizerError(f"--sp-type must be unigram or bpe, got {model_type!r}")
        sentences = [part for line in text.split("\n")
                     for part in _parts(line, _SENTENCE_CHARS) if part]
        if not sentences:
            raise TokenizerError("cannot train a SentencePiece model on empty text")
        out = _Sink()
        spm.set_random_generator_seed(_TRAINER_SEED)
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=out,
                vocab_size=int(vocab_size), model_type=model_type,
                # Any text round-trips: missing characters become bytes.
                byte_fallback=True, character_coverage=0.9995,
                # No change to the text: identity, no dummy prefix, spaces kept.
                normalization_rule_name="identity", add_dummy_prefix=False,
                remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
                split_digits=False, max_sentence_length=4 * _SENTENCE_CHARS + 16,
                # A small text may not hold vocab_size pieces: stop where it runs out.
                hard_vocab_limit=False,
                num_threads=_max_threads(), minloglevel=2)
        except RuntimeError as err:
            message = str(err).strip().splitlines()[-1] if str(err).strip() else "failed"
            raise TokenizerError(f"SentencePiece training failed: {message}") from None
        return cls(out.data)

    # ----------------------------------------------------------------------------- the interface

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def model_bytes(self) -> bytes:
        """The serialized model (what a .model file holds)."""
        return self._model

    @property
    def digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(self._model)

    def encode(self, text: str, what: str = "text") -> list[int]:
        ids = self._sp.encode(self._as_str(text))
        if self.info.byte_fallback is False and self._unk in ids:
            raise TokenizerError(self._unknown(text, what))
        return ids

    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        return self.encode_utf8(_to_utf8(text), what=what)

    def encode_utf8(self, data, what: str = "text") -> np.ndarray:
        """The ids of a whole text given as UTF-8 bytes: the library's encode of
        each segment of it, the segments cut at the text's canonical safe
        places (cut_points) and encoded at once, on every thread.

        A text of up to _SEGMENT_BYTES is one segment: its ids are encode's. A
        longer one is not encoded in one call because the library's unigram
        search sums float scores from the start of the text, so that which of
        two equally likely orders of the same pieces wins (a run of spaces as
        "▁ ▁▁▁▁" or "▁▁▁▁ ▁") depends on how far into the text it is; cut
        where no piece can span, the ids depend on the text alone, never on
        block sizes or threads."""
        data = bytes(data)
        return self._encode_segments(data, self.cut_points(data, _SEGMENT_BYTES), what)

    def _encode_segments(self, data, cuts, what="text"):
        skip = 1 if self._cut == "drop" else 0
        edges = list(zip([0] + cuts, cuts + [len(data)]))
        # (bytes in, int32 arrays out: no Python str or list of ints per id)
        segments = [data[a + (skip if i else 0):b] for i, (a, b) in enumerate(edges)]
        arrays = self._sp.encode(segments, out_type="numpy", num_threads=_max_threads())
        ids = np.concatenate(arrays).astype(self.id_dtype) if arrays else \
            np.zeros(0, self.id_dtype)
        if self.info.byte_fallback is False and len(ids) and (ids == self._unk).any():
            raise TokenizerError(self._unknown(data.decode("utf-8", "replace"), what))
        return ids

    def decode(self, ids) -> str:
        data = self.decode_bytes(ids)
        if self.info.add_dummy_prefix and data.startswith(b" "):
            data = data[1:]     # the space the dummy prefix added (the library drops it too)
        return data.decode("utf-8", errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Each id's bytes, joined (a piece's ▁ is a space, a byte piece its
        byte, a control piece nothing): per token, for a streaming sampler."""
        table = self._table()
        return b"".join(table[i] for i in _ids_to_array(ids, self.vocab_size).tolist())

    def to_dict(self) -> dict:
        return {"type": self.kind, "model": base64.b64encode(self._model).decode("ascii"),
                "digest": self.digest}

    @classmethod
    def from_dict(cls, d) -> "SentencePieceTokenizer":
        """Inverse of to_dict, for a dict read from a file: the model's bytes
        must match their digest and their type the dict's."""
        if not isinstance(d.get("model"), str) or not isinstance(d.get("digest"), str):
            raise TokenizerError("SentencePiece tokenizer description has no model bytes")
        try:
            model = base64.b64decode(d["model"].encode("ascii"), validate=True)
        except (ValueError, UnicodeEncodeError):
            raise TokenizerError("SentencePiece tokenizer description: the model is not "
                                 "base64 (damaged)") from None
        if xxhash.xxh3_128_hexdigest(model) != d["digest"]:
            raise TokenizerError("SentencePiece model does not match its digest (damaged "
                                 "or edited)")
        tok = cls(model)
        if tok.kind != d["type"]:
            raise TokenizerError(f"SentencePiece tokenizer description says {d['type']!r} but "
                                 f"its model is {tok.kind!r}")
        return tok

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.info.model_type}, vocab_size={self.vocab_size})"

    # ----------------------------------------------------------------------------- pieces

    def piece(self, i: int) -> str:
        """The library's own name of piece i (with ▁, <0xNN>)."""
        return self._sp.id_to_piece(int(i))

    def _table(self):
        if self._piece_bytes is None:
            sp, table = self._sp, []
            for i in range(sp.get_piece_size()):
                piece = sp.id_to_piece(i)
                if sp.is_byte(i):
                    table.append(bytes([int(piece[3:5], 16)]))
                elif sp.is_control(i):
                    table.append(b"")
                elif sp.is_unknown(i):
                    table.append(" \u2047 ".encode())     # the library's unk surface
                else:
                    table.append(piece.replace("\u2581", " ").encode("utf-8"))
            self._piece_bytes = table
        return self._piece_bytes

    def _as_str(self, text):
        if not isinstance(text, str):
            raise TokenizerError(f"expected text as a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
            return text
        except UnicodeEncodeError:      # lone surrogates (argv): the user's bytes, as text
            return _to_utf8(text).decode("utf-8", "replace")

    def _unknown(self, text, what):
        known = {ch for ch in set(text)
                 if self._unk not in self._sp.encode(ch)}
        return _describe_unknown(text, known, what)

    # ----------------------------------------------------------------------------- safe cuts

    def _cut_rule(self):
        """How a text may be cut so that its ids are its parts' ids joined:
        "keep" (cut before a space, the space leads the next part), "drop" (a
        dummy-prefix model: the part after the cut starts past the space, and
        the prefix puts it back) or None (never: the model has a piece that
        joins a character to a following ▁, so no space is a boundary)."""
        for i in range(self.vocab_size):
            if self._sp.is_byte(i) or self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            piece = self._sp.id_to_piece(i).lstrip("\u2581")
            if "\u2581" in piece:
                return None
        if self.info.add_dummy_prefix:
            return "drop"
        if self.info.remove_extra_whitespaces:
            return None         # (a leading space of a part would be dropped)
        return "keep"

    def _safe_spaces(self, data: bytes) -> np.ndarray:
        """Byte offsets where data may be cut: a U+0020 between two characters
        that are not white space (nor ▁), so no piece can span it (trained
        pieces never hold a ▁ after another character). A model that
        normalises (NFKC...) is cut only between printable ASCII, which
        normalisation leaves alone."""
        a = np.frombuffer(data, np.uint8)
        if self._cut is None or len(a) < 3:
            return np.zeros(0, np.int64)
        space = np.flatnonzero(a[1:-1] == 0x20) + 1
        before, after = a[space - 1], a[space + 1]
        if self.info.normalizer == "identity":
            ok = ~np.isin(before, np.frombuffer(_WS + b"\x81", np.uint8)) \
                & ~np.isin(after, np.frombuffer(_WS + b"\xe2", np.uint8))
        else:
            printable = np.frombuffer(_ASCII_PRINTABLE, np.uint8)
            ok = np.isin(before, printable) & np.isin(after, printable)
        return space[ok]

    def cut_points(self, data: bytes, every: int) -> list:
        """The canonical cuts of data: the first safe cut at least `every`
        bytes after the previous one (after 0 for the first). Each depends
        only on the text from the previous cut on, so a stream that starts at
        a cut finds the same ones, whatever its blocks."""
        if len(data) <= every:
            return []
        good = self._safe_spaces(data)
        cuts, at = [], every
        while at < len(data):
            k = int(np.searchsorted(good, at))
            if k >= len(good):
                break
            cuts.append(int(good[k]))
            at = cuts[-1] + every
        return cuts

    def stream(self):
        return SentencePieceStream(self)


class SentencePieceStream:
    """Encode a text given block by block (the token cache's second pass):
    feed() returns the ids of the text up to its last safe cut, finish() those
    of the rest. A model with no safe cut (see _cut_rule) holds the whole text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.carry, self.started = tokenizer, b"", False

    def feed(self, block: bytes) -> np.ndarray:
        data = self.carry + block if self.carry else bytes(block)
        # The cuts from the start of the carry, which is always a cut: the
        # same as the whole text's (cut_points depends on the text alone).
        cuts = self.tokenizer.cut_points(data, _SEGMENT_BYTES)
        if not cuts:
            self.carry = data
            return np.zeros(0, dtype=np.uint32)
        self.carry = data[cuts[-1]:]
        return self._part(data[:cuts[-1]], cuts[:-1])

    def finish(self) -> np.ndarray:
        data, self.carry = self.carry, b""
        return self._part(data, self.tokenizer.cut_points(data, _SEGMENT_BYTES))

    def _part(self, data, cuts):
        # In "drop" mode a part after a cut starts at its space, which the
        # dummy prefix stands for: the library encodes it from the next byte.
        if self.started and self.tokenizer._cut == "drop" and data.startswith(b" "):
            data, cuts = data[1:], [c - 1 for c in cuts]
        self.started = self.started or bool(data)
        return self.tokenizer._encode_segments(data, cuts)


class _Sink:
    """The trainer's model_writer: receives the serialized model."""

    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += bytes(data)


def _parts(line, size):
    return [line[i:i + size] for i in range(0, len(line), size)] if len(line) > size else [line]


def is_model_path(name) -> bool:
    """Whether --tokenizer names a .model file rather than a kind."""
    return isinstance(name, str) and name.endswith(".model")
