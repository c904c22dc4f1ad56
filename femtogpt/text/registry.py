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
from .tokenizer import Tokenizer


# Keys each kind's dict must have (besides "type"); anything else in a dict
# from a file means it is damaged or from an incompatible version.
_DICT_KEYS = {"char": {"type", "chars"}, "byte": {"type"}, "bpe": {"type", "merges"},
              "gpt2": {"type", "byte_ids", "merges", "specials"}}

_FROM_DICT = {
    "char": lambda d: CharTokenizer(d["chars"]),
    "byte": lambda d: ByteTokenizer(),
    "bpe": lambda d: BPETokenizer(d["merges"]),
    "gpt2": lambda d: GPT2Tokenizer(d["byte_ids"], d["merges"], d["specials"]),
}

# The kinds `femtogpt train --tokenizer` fits to a text (gpt2 comes with its model).
TOKENIZER_KINDS = ("bpe", "byte", "char")




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
