"""The tokenizer kinds by name: `--tokenizer KIND` builds one fitted to a
text, and a checkpoint's tokenizer dict rebuilds the one a model was trained
with. It sits above every kind, so no tokenizer module imports another's.
"""
from __future__ import annotations

from ..errors import TokenizerError
from .bpe import DEFAULT_BPE_VOCAB, BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .gpt2 import GPT2Tokenizer
from .sentencepiece_tokenizer import (SP_KINDS, SP_TRAINED, SentencePieceTokenizer,
                                      is_model_path)
from .tokenizer import Tokenizer


# Keys each kind's dict must have (besides "type"); anything else in a dict
# from a file means it is damaged or from an incompatible version.
_DICT_KEYS = {"char": {"type", "chars"}, "byte": {"type"}, "bpe": {"type", "merges"},
              "gpt2": {"type", "byte_ids", "merges", "specials"},
              **{kind: {"type", "model", "digest"} for kind in SP_KINDS}}

_FROM_DICT = {
    "char": lambda d: CharTokenizer(d["chars"]),
    "byte": lambda d: ByteTokenizer(),
    "bpe": lambda d: BPETokenizer(d["merges"]),
    "gpt2": lambda d: GPT2Tokenizer(d["byte_ids"], d["merges"], d["specials"]),
    **{kind: SentencePieceTokenizer.from_dict for kind in SP_KINDS},
}

# The kinds `femtogpt train --tokenizer` fits to a text (gpt2 comes with its model;
# `--tokenizer PATH.model` names an existing SentencePiece model instead).
TOKENIZER_KINDS = ("bpe", "byte", "char") + SP_TRAINED

#: The SentencePiece vocabulary when none is given.
DEFAULT_SP_VOCAB = 1000


def tokenizer_matches(name: str, tokenizer: Tokenizer) -> bool:
    """Whether --tokenizer NAME describes tokenizer: its kind, or for a
    SentencePiece model the .model file it came from (the same bytes)."""
    if name == tokenizer.kind:
        return True
    if is_model_path(name) and isinstance(tokenizer, SentencePieceTokenizer):
        try:
            return SentencePieceTokenizer.from_file(name).digest == tokenizer.digest
        except TokenizerError:
            return False
    return False


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
    "sentencepiece" (unigram) and "sentencepiece-bpe" train a SentencePiece
    model of vocab_size pieces (default DEFAULT_SP_VOCAB); a kind ending in
    .model is that file's model, as it is. "char" and "byte" have a vocabulary
    fixed by the text or by UTF-8, and ignore vocab_size.
    """
    if kind == "char":
        return CharTokenizer.from_text(text)
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        return BPETokenizer.train(text, DEFAULT_BPE_VOCAB if vocab_size is None else vocab_size)
    if kind in SP_TRAINED:
        return SentencePieceTokenizer.train(
            text, DEFAULT_SP_VOCAB if vocab_size is None else vocab_size,
            "bpe" if kind == "sentencepiece-bpe" else "unigram")
    if is_model_path(kind):
        return SentencePieceTokenizer.from_file(kind)
    raise TokenizerError(f"unknown tokenizer {kind!r}; choose one of: {', '.join(TOKENIZER_KINDS)}")
