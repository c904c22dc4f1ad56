"""A SentencePiece tokenizer in a Hugging Face folder: tokenizer.json (the
`tokenizers` library's format, which AutoTokenizer loads as a fast tokenizer
without sentencepiece or protobuf), tokenizer_config.json, and the model's
own bytes as tokenizer.model for the sentencepiece library.

tokenizer.json says what the SentencePiece model does: its normaliser (spaces
become ▁, a dummy prefix where the model has one), its pieces with their
scores (Unigram) or the merges they imply (BPE, ranked by the merged piece's
score, as transformers' own SentencePiece converter derives them), byte
fallback, and a decoder that undoes the ▁ and joins byte pieces. Nothing is
added around the ids (no <s>), since femtogpt adds nothing either.

Written for the models whose normaliser is identity (all that femtogpt
trains, and Llama's); a model that normalises with NFKC or collapses white
space is left out with a note. Known difference: the tokenizers library
matches a literal "<s>" or "<0x41>" in the text as that piece, the
sentencepiece library does not.
"""
from __future__ import annotations

import json
import os

SPACE = "\u2581"


def exportable(tokenizer) -> str | None:
    """Why tokenizer cannot be written for Hugging Face, or None if it can."""
    info = tokenizer.info
    if info.normalizer != "identity" or info.remove_extra_whitespaces:
        return (f"its SentencePiece model normalises the text ({info.normalizer or 'custom'}"
                f"{', collapsing white space' if info.remove_extra_whitespaces else ''})")
    if info.model_type not in ("unigram", "bpe"):
        return f"its SentencePiece model is of type {info.model_type}"
    return None


def _pieces(tokenizer):
    """(piece, score, kind) of every id, kind: normal, unknown, control or byte."""
    sp = tokenizer._sp
    out = []
    for i in range(tokenizer.vocab_size):
        kind = ("byte" if sp.is_byte(i) else "control" if sp.is_control(i)
                else "unknown" if sp.is_unknown(i) else "normal")
        out.append((sp.id_to_piece(i), float(sp.get_score(i)), kind))
    return out


def _bpe_merges(pieces):
    """The merges a SentencePiece BPE model implies: every split of a piece
    into two pieces, ranked by the piece's score (higher first), then by the
    two halves' ids."""
    ids = {p: i for i, (p, _, kind) in enumerate(pieces) if kind == "normal"}
    merges = []
    for piece, score, kind in pieces:
        if kind != "normal":
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        merges += [(score, a, b) for a, b in local]
    merges.sort(key=lambda m: -m[0])        # (stable: ties keep the order above)
    return [[a, b] for _, a, b in merges]


def tokenizer_json(tokenizer) -> dict:
    info, pieces = tokenizer.info, _pieces(tokenizer)
    unk = tokenizer._sp.unk_id()
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if info.add_dummy_prefix else []) \
        + [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if info.add_dummy_prefix:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    if info.model_type == "unigram":
        model = {"type": "Unigram", "unk_id": unk, "byte_fallback": True,
                 "vocab": [[p, s] for p, s, _ in pieces]}
    else:
        model = {"type": "BPE", "dropout": None, "unk_token": pieces[unk][0],
                 "continuing_subword_prefix": None, "end_of_word_suffix": None,
                 "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": {p: i for i, (p, _, _) in enumerate(pieces)},
                 "merges": _bpe_merges(pieces)}
    added = [{"id": i, "content": p, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}
             for i, (p, _, kind) in enumerate(pieces) if kind in ("control", "unknown")]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": normalizers},
            "pre_tokenizer": None, "post_processor": None,
            "decoder": {"type": "Sequence", "decoders": decoders}, "model": model}


def write_sentencepiece_files(tokenizer, folder, max_length) -> None:
    """tokenizer.json, tokenizer_config.json and tokenizer.model into folder."""
    sp = tokenizer._sp
    special = {}
    for name, i in (("unk_token", sp.unk_id()), ("bos_token", sp.bos_id()),
                    ("eos_token", sp.eos_id()), ("pad_token", sp.pad_id())):
        if i >= 0:
            special[name] = sp.id_to_piece(i)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces":
              False, **special}
    files = {"tokenizer.json": json.dumps(tokenizer_json(tokenizer), ensure_ascii=False),
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n"}
    for name, text in files.items():
        _write(os.path.join(folder, name), text.encode("utf-8"))
    _write(os.path.join(folder, "tokenizer.model"), tokenizer.model_bytes)


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
