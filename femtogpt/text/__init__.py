"""Text: tokenizers (char, byte, BPE, GPT-2's, SentencePiece), reading a corpus of any size,
and the token cache that encodes it once into memory-mapped id files.

May import: femtogpt.errors and its own compiled encoder (_native.pyx), nothing
else of femtogpt (and, outside it, the sentencepiece library): the model, files, training and front ends sit above it.
"""
from .bpe import BPETokenizer
from .byte import ByteTokenizer
from .char import CharTokenizer
from .gpt2 import GPT2Tokenizer
from .registry import TOKENIZER_KINDS, build_tokenizer, tokenizer_from_dict, tokenizer_matches
from .sentencepiece_tokenizer import SentencePieceTokenizer
from .textfile import read_text
from .tokenizer import Tokenizer

__all__ = ["BPETokenizer", "ByteTokenizer", "CharTokenizer", "GPT2Tokenizer",
           "SentencePieceTokenizer", "TOKENIZER_KINDS", "Tokenizer", "build_tokenizer",
           "read_text", "tokenizer_from_dict", "tokenizer_matches"]
