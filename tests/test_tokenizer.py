import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femtogpt.errors import FemtoGPTError, TokenizerError
from femtogpt.text import ByteTokenizer, CharTokenizer, build_tokenizer, tokenizer_from_dict
from femtogpt.text.tokenizer import MAX_CHAR_VOCAB, compact_id_dtype

# Non-ASCII letters, CJK, an emoji outside the BMP, combining accent, tab, CR/LF, NBSP.
SAMPLE = "Hello, wörld!\nΣπάρτη 東京 😀 e\u0301 \t\r\n\u00a0end"
VOCAB = "".join(sorted(set(SAMPLE)))


@pytest.fixture
def char_tok():
    return CharTokenizer.from_text(SAMPLE)


# ----------------------------------------------------------------------------- char


def test_char_vocab_is_sorted_distinct_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([7, 5, 6, 4, 1]) == "world"


def test_char_vocab_handles_astral_characters(char_tok):
    assert char_tok.chars == VOCAB
    assert char_tok.vocab_size == len(set(SAMPLE))
    # The emoji is one character, hence one id, and sorts last (highest codepoint).
    assert char_tok.encode("😀") == [char_tok.vocab_size - 1]


text_from_vocab = st.text(alphabet=st.sampled_from(VOCAB), max_size=300)


@settings(max_examples=200, deadline=None)
@given(text_from_vocab)
def test_char_round_trip(text):
    tok = CharTokenizer.from_text(SAMPLE)
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    array = tok.encode_array(text)
    assert array.tolist() == ids
    assert array.dtype == np.uint8


@pytest.mark.parametrize("text", ["", " " * 10_000, "\n\n\n", "😀" * 50, SAMPLE * 3])
def test_char_round_trip_edge_cases(char_tok, text):
    assert char_tok.decode(char_tok.encode(text)) == text
    assert char_tok.decode(char_tok.encode_array(text)) == text
    assert char_tok.encode_array(text).tolist() == char_tok.encode(text)


def test_char_encode_array_empty_text(char_tok):
    array = char_tok.encode_array("")
    assert array.shape == (0,)
    assert array.dtype == np.uint8
    assert char_tok.decode([]) == ""
    assert char_tok.decode(np.array([], dtype=np.int64)) == ""


def test_char_encode_array_spans_chunks(monkeypatch, char_tok):
    import femtogpt.text.char as tokenizer_module

    # Force several chunks on a short text to exercise the chunk boundaries.
    monkeypatch.setattr(tokenizer_module, "_CHUNK_CHARS", 7)
    text = SAMPLE * 5
    assert char_tok.encode_array(text).tolist() == char_tok.encode(text)
    with pytest.raises(TokenizerError, match="'Z'"):
        char_tok.encode_array(text + "Z")


@pytest.mark.parametrize(
    "n_chars, dtype",
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16)],
)
def test_char_encode_array_compact_dtype(n_chars, dtype):
    # Skip the surrogate block, which cannot come from a UTF-8 file.
    codepoints = [c for c in range(0x20, 0x20 + n_chars + 2048) if not 0xD800 <= c <= 0xDFFF][:n_chars]
    text = "".join(map(chr, codepoints))
    tok = CharTokenizer.from_text(text)
    assert tok.vocab_size == n_chars
    array = tok.encode_array(text)
    assert array.dtype == dtype
    assert array[0] == 0 and array[-1] == n_chars - 1
    assert np.array_equal(array, np.arange(n_chars))


def test_compact_id_dtype():
    assert compact_id_dtype(256) == np.uint8
    assert compact_id_dtype(257) == np.uint16
    assert compact_id_dtype(65536) == np.uint16
    assert compact_id_dtype(65537) == np.uint32


def test_char_too_many_distinct_characters():
    codepoints = [c for c in range(0x20, 0x20 + MAX_CHAR_VOCAB + 4096) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, codepoints[: MAX_CHAR_VOCAB + 1]))
    with pytest.raises(TokenizerError) as info:
        CharTokenizer.from_text(text)
    message = str(info.value)
    assert f"{MAX_CHAR_VOCAB + 1} distinct characters" in message
    assert "--tokenizer byte" in message


def test_char_from_empty_text_fails():
    with pytest.raises(TokenizerError, match="empty"):
        CharTokenizer.from_text("")


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(TokenizerError) as info:
        tok.encode("a é\nb é", what="prompt")
    message = str(info.value)
    assert message == "prompt has characters the tokenizer does not know: 'é', '\\n'"
    # Same message from the array path.
    with pytest.raises(TokenizerError) as info:
        tok.encode_array("a é\nb é", what="prompt")
    assert str(info.value) == message


def test_unknown_characters_list_is_capped():
    tok = CharTokenizer.from_text("a")
    with pytest.raises(TokenizerError) as info:
        tok.encode("a" + "0123456789ABCDEF" + "a")
    message = str(info.value)
    assert "'0', '1', '2', '3', '4', '5', '6', '7', '8', '9' (and 6 more)" in message
    assert "'A'" not in message
    assert "\n" not in message


def test_tokenizer_errors_are_femtogpt_errors():
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(FemtoGPTError):
        tok.encode("c")
    with pytest.raises(ValueError):
        tok.encode("c")


@pytest.mark.parametrize("ids", [[0, 2], [-1], [0, 1, 99], np.array([5], dtype=np.uint64)])
def test_char_decode_out_of_range(ids):
    tok = CharTokenizer.from_text("ab")
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode(ids)


@pytest.mark.parametrize("ids", [[0.5], "ab", [[0, 1]], [True]])
def test_decode_rejects_non_integer_ids(ids):
    for tok in (CharTokenizer.from_text("ab"), ByteTokenizer()):
        with pytest.raises(TokenizerError):
            tok.decode(ids)


def test_char_decode_accepts_numpy_ids(char_tok):
    ids = char_tok.encode_array(SAMPLE)
    assert char_tok.decode(ids) == SAMPLE
    assert char_tok.decode(ids.astype(np.int64)) == SAMPLE
    assert char_tok.decode(ids.tolist()) == SAMPLE


# ----------------------------------------------------------------------------- byte


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_byte_round_trip_any_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    array = tok.encode_array(text)
    assert array.dtype == np.uint8
    assert array.tolist() == ids


def test_byte_vocab_and_known_ids():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode("A€") == [65, 0xE2, 0x82, 0xAC]
    assert tok.encode("") == []


def test_byte_decode_truncated_utf8_replaces():
    tok = ByteTokenizer()
    euro = tok.encode("€")
    assert tok.decode(euro[:2]) == "\ufffd"
    assert tok.decode([104, 105] + euro[:1]) == "hi\ufffd"
    assert tok.decode([0xFF, 0xFE, 65]) == "\ufffd\ufffdA"
    assert tok.decode_bytes(euro[:2]) == b"\xe2\x82"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=200))
def test_byte_decode_never_raises_on_valid_ids(ids):
    tok = ByteTokenizer()
    text = tok.decode(ids)
    assert isinstance(text, str)
    assert tok.decode_bytes(ids) == bytes(ids)


def test_byte_decode_out_of_range():
    with pytest.raises(TokenizerError, match="256"):
        ByteTokenizer().decode([65, 256])


def test_byte_encode_does_not_fail_on_surrogates():
    tok = ByteTokenizer()
    # What Python makes of an undecodable command-line byte 0xff: the original byte comes back.
    assert tok.encode("a\udcffb") == [97, 0xFF, 98]
    # Any other lone surrogate still encodes (and decodes to replacement characters).
    ids = tok.encode("\ud800")
    assert len(ids) == 3
    assert "\ufffd" in tok.decode(ids)


def test_byte_encode_array_is_writable():
    array = ByteTokenizer().encode_array("abc")
    array[0] = 0
    assert array.tolist() == [0, 98, 99]


# ----------------------------------------------------------------------------- dicts


def test_to_dict_from_dict_round_trip(char_tok):
    for tok in (char_tok, ByteTokenizer()):
        d = tok.to_dict()
        # It must survive JSON, since it is stored in a checkpoint's JSON header.
        rebuilt = tokenizer_from_dict(json.loads(json.dumps(d)))
        assert type(rebuilt) is type(tok)
        assert rebuilt == tok
        assert rebuilt.to_dict() == d
        assert rebuilt.decode(rebuilt.encode(SAMPLE)) == SAMPLE


def test_to_dict_contents():
    assert CharTokenizer.from_text("ba").to_dict() == {"type": "char", "chars": "ab"}
    assert ByteTokenizer().to_dict() == {"type": "byte"}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        (None, "must be an object"),
        ([], "must be an object"),
        ("char", "must be an object"),
        ({}, '"type"'),
        ({"type": 3}, '"type"'),
        ({"type": "wordpiece"}, "unknown tokenizer type 'wordpiece'"),
        ({"type": "char"}, "missing ['chars']"),
        ({"type": "char", "chars": ["a", "b"]}, "must be a string"),
        ({"type": "char", "chars": 42}, "must be a string"),
        ({"type": "char", "chars": None}, "must be a string"),
        ({"type": "char", "chars": ""}, "empty"),
        ({"type": "char", "chars": "abca"}, "not sorted"),
        ({"type": "char", "chars": "abbc"}, "duplicate character 'b'"),
        ({"type": "char", "chars": "ba"}, "not sorted"),
        ({"type": "char", "chars": "ab", "extra": 1}, "unexpected ['extra']"),
        ({"type": "byte", "chars": "ab"}, "unexpected ['chars']"),
    ],
)
def test_bad_dicts_rejected(bad, fragment):
    with pytest.raises(TokenizerError) as info:
        tokenizer_from_dict(bad)
    assert fragment in str(info.value)


def test_from_dict_rejects_oversized_vocab():
    chars = "".join(chr(c) for c in range(0x20, 0x20 + MAX_CHAR_VOCAB + 4096) if not 0xD800 <= c <= 0xDFFF)
    with pytest.raises(TokenizerError, match="limit"):
        tokenizer_from_dict({"type": "char", "chars": chars[: MAX_CHAR_VOCAB + 1]})


# ----------------------------------------------------------------------------- build


def test_build_tokenizer():
    char = build_tokenizer("char", "hello")
    assert isinstance(char, CharTokenizer)
    assert char.chars == "ehlo"
    byte = build_tokenizer("byte", "hello")
    assert isinstance(byte, ByteTokenizer)
    assert byte.vocab_size == 256


def test_build_tokenizer_unknown_kind_lists_choices():
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("bpe2", "hello")
    assert str(info.value) == ("unknown tokenizer 'bpe2'; choose one of: bpe, byte, char, "
                               "sentencepiece, sentencepiece-bpe")
