"""The few settings of a SentencePiece model that femtogpt needs to know,
read from its protobuf bytes by hand (the library does not expose them, and
protobuf's own package would be a dependency for five fields).

It also refuses a damaged model before the library sees it: protobuf's wire
format says each field's length, so a model cut short fails here, and one
cut exactly between fields lacks its trainer and normalizer specs (which a
serialized model always holds, after its pieces).

Fields (sentencepiece_model.proto): ModelProto 1 pieces, 2 trainer_spec,
3 normalizer_spec; TrainerSpec 3 model_type, 35 byte_fallback; NormalizerSpec
1 name, 3 add_dummy_prefix, 4 remove_extra_whitespaces.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import TokenizerError

_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


@dataclass(frozen=True)
class ModelInfo:
    model_type: str                 # unigram, bpe, word, char
    byte_fallback: bool
    normalizer: str                 # "identity", "nmt_nfkc", ... ("" for a custom map)
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    n_pieces: int


class _Damaged(Exception):
    pass


def _varint(data, i):
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise _Damaged()
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(data):
    """(field number, wire type, value) of each field: an int, or the bytes of
    a length-delimited one."""
    i, n = 0, len(data)
    while i < n:
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Damaged()
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if i + size > n:
                raise _Damaged()
            value, i = data[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > n:
                raise _Damaged()
            value, i = data[i:i + size], i + size
        else:
            raise _Damaged()
        yield field, wire, value


def read_model_info(data: bytes, what: str) -> ModelInfo:
    """The settings of a serialized ModelProto; TokenizerError (one line) if
    the bytes are not a whole model."""
    try:
        pieces, trainer, normalizer = 0, None, None
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                pieces += 1
            elif field == 2 and wire == 2:
                trainer = dict((f, v) for f, w, v in _fields(value))
            elif field == 3 and wire == 2:
                normalizer = dict((f, v) for f, w, v in _fields(value))
    except _Damaged:
        raise TokenizerError(f"{what} is damaged or truncated (not a whole SentencePiece "
                             f"model)") from None
    if trainer is None or normalizer is None or pieces == 0:
        raise TokenizerError(f"{what} is damaged or truncated (no pieces, trainer or "
                             f"normalizer settings: not a whole SentencePiece model)")
    model_type = _MODEL_TYPES.get(trainer.get(3, 1))
    if model_type is None:
        raise TokenizerError(f"{what} has an unknown SentencePiece model type {trainer[3]}")
    name = normalizer.get(1, b"")
    try:
        name = name.decode("utf-8") if isinstance(name, bytes) else ""
    except UnicodeDecodeError:
        raise TokenizerError(f"{what} is damaged (its normalizer's name is not text)") from None
    return ModelInfo(model_type=model_type, byte_fallback=bool(trainer.get(35, 0)),
                     normalizer=name, add_dummy_prefix=bool(normalizer.get(3, 1)),
                     remove_extra_whitespaces=bool(normalizer.get(4, 1)), n_pieces=pieces)
