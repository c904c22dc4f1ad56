"""GPT-2's tokenizer, read from the vocab.json and merges.txt of a Hugging Face folder.

GPT-2's byte-level BPE is femtogpt's BPE (tokenizer.py) with three differences,
all kept here so that a pretrained model sees exactly the ids it was trained on:
  * its ids: each byte and each merge has the id vocab.json gives it (GPT-2
    numbers the 256 bytes in its own order), and <|endoftext|> is a token;
  * its pre-split: OpenAI's pattern, with English contractions and Unicode
    letter and number classes (\\p{L}, \\p{N}), which Python's re spells out
    here from unicodedata;
  * vocab.json writes each byte as a printable character (bytes_to_unicode),
    so that a token is a JSON string.
Encoding runs BPETokenizer's merge loop on internal ids (byte b is b, merge r
is 256 + r) and maps the result to GPT-2's ids with one table lookup.
"""
import functools
import json
import os
import re
import unicodedata

import numpy as np

from ..errors import TokenizerError
from .bpe import BPETokenizer
from .tokenizer import _ids_to_array

ENDOFTEXT = "<|endoftext|>"
# Unicode's White_Space property: what \s means to OpenAI's pattern (Python's \s
# also takes U+001C..U+001F, which are not White_Space).
_WHITE_SPACE = ("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000")
# A vocab.json, merges.txt or config.json larger than this is not one (gpt2's are
# 1 MB, 456 KB and 1 KB; tokenizer.json 1.4 MB).
MAX_TOKENIZER_FILE_BYTES = 64 << 20


@functools.lru_cache(maxsize=1)
def bytes_to_unicode():
    """GPT-2's printable stand-in for each byte: [256 one-character strings].

    Bytes that are printable Latin-1 characters stand for themselves; the other
    68 (controls, space, soft hyphen...) take the characters from U+0100 on, in
    byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAC + 1)) \
        | set(range(0xAE, 0xFF + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def _class_ranges(categories):
    """A regex character class body for every code point whose category starts with one of
    `categories` (surrogates excluded)."""
    parts, start, prev = [], None, None
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF or unicodedata.category(chr(cp))[0] not in categories:
            continue
        if prev is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append((start, prev))
        start = prev = cp
    parts.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in parts)


@functools.lru_cache(maxsize=1)
def _gpt2_classes():
    """OpenAI's letter, number and white-space classes, as regex classes."""
    return f"[{_class_ranges('L')}]", f"[{_class_ranges('N')}]", f"[{_WHITE_SPACE}]"


@functools.lru_cache(maxsize=1)
def gpt2_pattern():
    r"""OpenAI's GPT-2 pre-split, compiled for Python's re:
    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
    (built once per process from unicodedata: about a second)."""
    letters, numbers, space = (c[1:-1] for c in _gpt2_classes())
    return re.compile(
        r"'s|'t|'re|'ve|'m|'ll|'d"
        f"| ?[{letters}]+"
        f"| ?[{numbers}]+"
        f"| ?[^{space}{letters}{numbers}]+"
        f"|[{space}]+(?![^{space}])"
        f"|[{space}]+")


# The same pattern in the classes Python's re has built in (\w, \d, \s), which
# it matches about three times faster than the spelled-out Unicode classes.
_FAST_PATTERN = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d"
                           r"| ?[^\W\d_]+"
                           r"| ?\d+"
                           r"| ?(?:[^\s\w]|_)+"
                           r"|\s+(?!\S)"
                           r"|\s+")


@functools.lru_cache(maxsize=1)
def _fast_pattern_differs():
    r"""The characters whose class (letter, number, white space, other) differs
    between the two patterns: Nl and No numbers (\w counts them as letters) and
    U+001C..U+001F (\s counts them as white space). On a text with none of them
    the two patterns split identically, character class by character class."""
    white = set(map(ord, _WHITE_SPACE.replace("\u2000-\u200a", ""))) | set(range(0x2000, 0x200B))
    differs = []
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        c = chr(cp)
        major = unicodedata.category(c)[0]
        exact = (major == "L", major == "N", cp in white)
        fast = (c.isalnum() and not c.isdecimal() and c != "_", c.isdecimal(), c.isspace())
        if exact != fast:
            differs.append(c)
    return frozenset(differs)


class _Presplit:
    """OpenAI's pattern: the fast spelling when the text allows, else the exact one
    (both compiled on first use: most runs never build a GPT-2 tokenizer)."""

    def findall(self, text):
        if _fast_pattern_differs().isdisjoint(text):
            return _FAST_PATTERN.findall(text)
        return gpt2_pattern().findall(text)


class GPT2Tokenizer(BPETokenizer):
    """GPT-2's byte-level BPE with GPT-2's ids and special tokens.

    byte_ids[b] is the id of byte b; merges[r] = (a, b, new): merge r joins
    tokens a and b into token new (ids as in vocab.json); specials maps a
    special token's text to its id. The ids must be exactly 0..vocab_size-1.
    A special token's text inside the text encodes as that token, as in
    Hugging Face's tokenizer.
    """

    kind = "gpt2"
    _presplit = _Presplit()
    _contractions = True

    @property
    def _presplit_classes(self):
        return _gpt2_classes()

    def __init__(self, byte_ids, merges, specials):
        byte_ids, merges, specials = _check_parts(byte_ids, merges, specials)
        to_internal = {ext: b for b, ext in enumerate(byte_ids)}
        internal_merges = []
        for r, (a, b, new) in enumerate(merges):
            if a not in to_internal or b not in to_internal:
                missing = a if a not in to_internal else b
                raise TokenizerError(f"gpt2 tokenizer merge {r} uses token {missing} before "
                                     f"any byte or earlier merge makes it")
            if new in to_internal:
                raise TokenizerError(f"gpt2 tokenizer merge {r} makes token {new}, which "
                                     f"already exists")
            internal_merges.append((to_internal[a], to_internal[b]))
            to_internal[new] = 256 + r
        super().__init__(internal_merges)
        for text, ext in specials.items():
            if ext in to_internal:
                raise TokenizerError(f"gpt2 special token {text!r} has id {ext}, which a "
                                     f"byte or merge already has")
            to_internal[ext] = len(to_internal)
        n = len(to_internal)
        if sorted(to_internal) != list(range(n)):
            raise TokenizerError(f"gpt2 tokenizer ids are not exactly 0..{n - 1}")
        self._byte_ids, self._ext_merges, self._specials = byte_ids, merges, specials
        self._to_external = np.zeros(n, dtype=np.int64)
        for ext, internal in to_internal.items():
            self._to_external[internal] = ext
        # Each id's bytes: a byte's or merge's from BPETokenizer, a special's text.
        vocab = [b""] * n
        for ext, internal in to_internal.items():
            if internal < len(self._vocab):
                vocab[ext] = self._vocab[internal]
        for text, ext in specials.items():
            vocab[ext] = text.encode("utf-8")
        self._ext_vocab = vocab
        self._special_split = (re.compile("(" + "|".join(map(re.escape, sorted(
            specials, key=len, reverse=True))) + ")") if specials else None)

    # -- reading a Hugging Face folder

    @classmethod
    def from_files(cls, vocab_path, merges_path):
        """GPT-2's tokenizer from vocab.json ({token: id}) and merges.txt ("a b" per line)."""
        vocab = read_small_json(vocab_path)
        pairs = []
        for lineno, line in enumerate(read_small_text(merges_path).split("\n"), 1):
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise TokenizerError(f"{merges_path}:{lineno}: expected two tokens separated "
                                     f"by one space, got {line[:80]!r}")
            pairs.append((parts[0], parts[1], f"{merges_path}:{lineno}"))
        return cls._from_vocab_and_merges(vocab, pairs, vocab_path)

    @classmethod
    def from_tokenizer_json(cls, path):
        """GPT-2's tokenizer from a Hugging Face tokenizer.json (a byte-level BPE
        with GPT-2's pre-split); any other kind of tokenizer is refused by name."""
        d = read_small_json(path)
        model = d.get("model") if isinstance(d, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise TokenizerError(f"{path}: not a BPE tokenizer (model.type is "
                                 f"{model.get('type') if isinstance(model, dict) else None!r})")
        pre = d.get("pre_tokenizer")
        if not (isinstance(pre, dict) and pre.get("type") == "ByteLevel"
                and not pre.get("add_prefix_space", False) and pre.get("use_regex", True)):
            raise TokenizerError(f"{path}: its pre_tokenizer is not GPT-2's (ByteLevel, "
                                 f"use_regex, no added prefix space)")
        if d.get("normalizer") is not None:
            raise TokenizerError(f"{path}: has a normalizer, which GPT-2's tokenizer has not")
        # Options of the BPE model that change the ids; GPT-2's are all off.
        for name, off in (("dropout", None), ("continuing_subword_prefix", ""),
                          ("end_of_word_suffix", ""), ("byte_fallback", False),
                          ("ignore_merges", False)):
            if model.get(name, off) not in (off, None):
                raise TokenizerError(f"{path}: model.{name} is {model[name]!r:.40}, which "
                                     f"GPT-2's tokenizer does not use")
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise TokenizerError(f"{path}: model.vocab is not an object")
        vocab = dict(vocab)
        added, merges = d.get("added_tokens") or [], model.get("merges") or []
        if not isinstance(added, list) or not isinstance(merges, list):
            raise TokenizerError(f"{path}: added_tokens and model.merges must be lists")
        for token in added:
            if not (isinstance(token, dict) and isinstance(token.get("content"), str)
                    and isinstance(token.get("id"), int)):
                raise TokenizerError(f"{path}: malformed added_tokens entry")
            vocab.setdefault(token["content"], token["id"])
        pairs = []
        for i, merge in enumerate(merges):
            # Two spellings: "a b" (tokenizers before 0.20) or ["a", "b"].
            parts = merge.split(" ") if isinstance(merge, str) else merge
            if not (isinstance(parts, list) and len(parts) == 2
                    and all(isinstance(p, str) and p for p in parts)):
                raise TokenizerError(f"{path}: merge {i} is not a pair of tokens: {merge!r:.80}")
            pairs.append((parts[0], parts[1], f"{path}: merge {i}"))
        return cls._from_vocab_and_merges(vocab, pairs, path)

    @classmethod
    def _from_vocab_and_merges(cls, vocab, pairs, vocab_path):
        if not isinstance(vocab, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in vocab.items()):
            raise TokenizerError(f"{vocab_path}: not a GPT-2 vocabulary (expected a JSON "
                                 f"object of token strings to integer ids)")
        to_byte = bytes_to_unicode()
        try:
            byte_ids = [vocab[ch] for ch in to_byte]
        except KeyError as err:
            raise TokenizerError(f"{vocab_path}: has no token for byte "
                                 f"{to_byte.index(err.args[0])} ({err.args[0]!r}): not a "
                                 f"byte-level BPE vocabulary") from None
        merges, used = [], set(to_byte)
        for a, b, where in pairs:
            joined = a + b
            for token in (a, b, joined):
                if token not in vocab:
                    raise TokenizerError(f"{where}: token {token[:60]!r} is not in "
                                         f"{os.path.basename(os.fspath(vocab_path))}")
            merges.append((vocab[a], vocab[b], vocab[joined]))
            used.add(joined)
        specials = {token: i for token, i in vocab.items() if token not in used}
        return cls(byte_ids, merges, specials)

    def vocab_json(self):
        """{token string: id} as vocab.json writes it."""
        to_char = bytes_to_unicode()
        out = {}
        for ext, data in enumerate(self._ext_vocab):
            out[data.decode("utf-8") if ext in self._special_ids
                else "".join(to_char[b] for b in data)] = ext
        return out

    def merges_txt(self):
        """The text of merges.txt."""
        to_char = bytes_to_unicode()
        spell = lambda ext: "".join(to_char[b] for b in self._ext_vocab[ext])  # noqa: E731
        return "#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n"
                                           for a, b, _ in self._ext_merges)

    @functools.cached_property
    def _special_ids(self):
        return set(self._specials.values())

    # -- the Tokenizer interface

    @property
    def vocab_size(self) -> int:
        return len(self._ext_vocab)

    @property
    def specials(self) -> dict:
        return dict(self._specials)

    def _segments(self, text):
        """(text, None) and (None, special id) pieces, in order."""
        if self._special_split is None:
            yield text, None
            return
        for i, piece in enumerate(self._special_split.split(text)):
            if i % 2:
                yield None, self._specials[piece]
            elif piece:
                yield piece, None

    def encode(self, text: str, what: str = "text") -> list[int]:
        return self.encode_array(text, what).tolist()

    def encode_array(self, text: str, what: str = "text") -> np.ndarray:
        pieces = []
        for segment, special in self._segments(text):
            if special is not None:
                pieces.append(np.array([special], dtype=np.int64))
            else:
                internal = BPETokenizer.encode_array(self, segment, what)
                pieces.append(self._to_external[internal.astype(np.int64)])
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        return ids.astype(self.id_dtype)

    def encode_utf8(self, data) -> np.ndarray:
        """encode_array's ids for a whole text given as valid UTF-8 bytes, in C."""
        pieces = []
        for segment, special in self._byte_segments(bytes(data)):
            if special is not None:
                pieces.append(np.array([special], dtype=np.uint32))
            else:
                internal = self._encode_utf8_internal(segment)
                pieces.append(self._to_external[internal].astype(np.uint32))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint32)

    def _byte_segments(self, data):
        if not self._specials:
            yield data, None
            return
        if self.__dict__.get("_special_split_bytes") is None:
            self._special_split_bytes = re.compile(b"(" + b"|".join(
                re.escape(t.encode("utf-8")) for t in sorted(self._specials, key=len,
                                                             reverse=True)) + b")")
        for i, piece in enumerate(self._special_split_bytes.split(data)):
            if i % 2:
                yield None, self._specials[piece.decode("utf-8")]
            elif piece:
                yield piece, None

    def cut_outside_specials(self, data, cut):
        """cut moved back to the start of a special token that spans it (every
        occurrence near the cut is looked at, as tokens may overlap)."""
        moved = True
        while moved and cut:
            moved = False
            for text in self._specials:
                token = text.encode("utf-8")
                start = data.find(token, max(0, cut - len(token) + 1), cut + len(token) - 1)
                while 0 <= start:
                    if start < cut < start + len(token):
                        cut, moved = start, True
                        break
                    start = data.find(token, start + 1, cut + len(token) - 1)
        return cut or None

    def decode_bytes(self, ids) -> bytes:
        vocab = self._ext_vocab
        return b"".join([vocab[i] for i in _ids_to_array(ids, self.vocab_size).tolist()])

    def to_dict(self) -> dict:
        return {"type": self.kind, "byte_ids": list(self._byte_ids),
                "merges": [list(m) for m in self._ext_merges],
                "specials": dict(self._specials)}


def _check_parts(byte_ids, merges, specials):
    def is_id(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < 1 << 20
    if not isinstance(byte_ids, (list, tuple)) or len(byte_ids) != 256 or not all(
            is_id(v) for v in byte_ids) or len(set(byte_ids)) != 256:
        raise TokenizerError("gpt2 tokenizer byte_ids must be 256 distinct ids")
    if not isinstance(merges, (list, tuple)) or not all(
            isinstance(m, (list, tuple)) and len(m) == 3 and all(is_id(v) for v in m)
            for m in merges):
        raise TokenizerError("gpt2 tokenizer merges must be a list of [a, b, new] ids")
    if not isinstance(specials, dict) or not all(
            isinstance(k, str) and k and is_id(v) for k, v in specials.items()):
        raise TokenizerError("gpt2 tokenizer specials must map token text to an id")
    return ([int(v) for v in byte_ids], [tuple(int(v) for v in m) for m in merges],
            {k: int(v) for k, v in specials.items()})


def read_small_text(path, what="a tokenizer file", error=TokenizerError):
    """A UTF-8 file of at most MAX_TOKENIZER_FILE_BYTES as a str; every problem
    (missing, too large, not UTF-8) is one `error` naming the file. (hf.py reads
    config.json and the weight index with it too, raising CheckpointError.)"""
    try:
        size = os.path.getsize(path)
        if size > MAX_TOKENIZER_FILE_BYTES:
            raise error(f"{path}: {size} bytes is too large for {what}")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as err:
        raise error(f"cannot read {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise error(f"{path} is not UTF-8 text (byte {err.start})") from None


def read_small_json(path, what="a tokenizer file", error=TokenizerError):
    """read_small_text, parsed as JSON; bad JSON, nesting too deep for the parser
    and integers too long for Python are each one `error`."""
    text = read_small_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    except (ValueError, RecursionError) as err:
        raise error(f"{path} is not {what} ({str(err)[:200]})") from None
