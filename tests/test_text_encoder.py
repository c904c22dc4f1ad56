"""The C encoder (femtogpt/_text.pyx, bulk_encode.py) against the Python
definition (tokenizer.py): the same pre-split chunks, the same ids, and the
same ids whether a text is encoded whole, in pieces at safe cuts, or block by
block as a corpus is."""
import numpy as np
import pytest

import femtogpt
import femtogpt.text.bpe as tokenizer_module
from femtogpt.text import _native as _text
from femtogpt.text.bulk_encode import BPEStream, class_table, piece_bounds
from femtogpt.text.gpt2 import GPT2Tokenizer, gpt2_pattern
from femtogpt.text.bpe import _PRESPLIT
from femtogpt.text import BPETokenizer

from test_hf import TEXT, gpt2_files

# Every script and class the patterns tell apart, apostrophes for GPT-2's
# contractions, and the characters where Python's \s and \w differ from Unicode.
POOL = list("abcdefghij ABC  \n\n\t\r 0123456789 .,;'!?-_ éüñçø ЖжЯяБб 中文字日本語 😀🎉 "
            "١٢٣ ²½Ⅻ \u00a0\u2003\u3000\x1c\x1f\x85 's 're 'll 'd 'S 've 'm 't")


def random_texts(n, seed=0, longest=400):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield "".join(rng.choice(POOL, size=int(rng.integers(0, longest))))


def every_code_point(seed=0):
    """Every code point UTF-8 can hold, shuffled, with spaces and apostrophes between."""
    cps = np.concatenate([np.arange(0xD800), np.arange(0xE000, 0x110000)])
    rng = np.random.default_rng(seed)
    rng.shuffle(cps)
    glue = np.array([ord(c) for c in " '\n s"])
    mixed = np.empty(2 * len(cps), dtype=np.int64)
    mixed[0::2] = cps
    mixed[1::2] = rng.choice(glue, size=len(cps))
    return "".join(map(chr, mixed[: 400000]))


def regex_ends(pattern, text):
    ends, pos = [], 0
    for chunk in pattern.findall(text):
        pos += len(chunk.encode("utf-8"))
        ends.append(pos)
    return ends


@pytest.mark.parametrize("kind", ["bpe", "gpt2"])
def test_pre_split_state_machine_is_the_regular_expression(kind):
    if kind == "bpe":
        pattern, classes, contractions = _PRESPLIT, BPETokenizer._presplit_classes, False
    else:
        from femtogpt.text.gpt2 import _gpt2_classes
        pattern, classes, contractions = gpt2_pattern(), _gpt2_classes(), True
    table = class_table(*classes)
    texts = [every_code_point(), "a  b\n\n c\t\td  ", "x's 're'll'd 'S ' ", " ", "  ", "\n"]
    texts += list(random_texts(300, seed=1))
    for text in texts:
        data = text.encode("utf-8")
        got = _text.chunk_ends(np.frombuffer(data, np.uint8), table, contractions)
        assert got == regex_ends(pattern, text), repr(text[:80])


def test_class_table_follows_each_pattern():
    bpe = class_table(*BPETokenizer._presplit_classes)
    from femtogpt.text.gpt2 import _gpt2_classes
    gpt2 = class_table(*_gpt2_classes())
    # letter 0, number 1, space 2, other 3
    assert [bpe[ord(c)] for c in "aé中1١ _.\x1c½"] == [0, 0, 0, 1, 1, 2, 3, 3, 2, 0]
    # GPT-2: ½ is a number (No), U+001C is not white space.
    assert [gpt2[ord(c)] for c in "aé中1١ _.\x1c½"] == [0, 0, 0, 1, 1, 2, 3, 3, 3, 1]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TEXT * 4 + "".join(random_texts(50, seed=3)), 600)


def python_ids(tok, text, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_NATIVE_MIN_CHARS", 1 << 62)
    try:
        return tok.encode_array(text).tolist()
    finally:
        monkeypatch.undo()


def test_c_encoder_gives_the_python_ids(bpe, monkeypatch):
    for text in list(random_texts(150, seed=2, longest=3000)) + [TEXT, "", "a", "😀" * 300]:
        want = python_ids(bpe, text, monkeypatch)
        assert bpe.encode_utf8(text.encode("utf-8")).tolist() == want
    # Long texts go to C inside encode_array itself.
    long_text = TEXT * 200
    assert bpe.encode_array(long_text).tolist() == python_ids(bpe, long_text, monkeypatch)


def test_gpt2_c_encoder_gives_the_python_ids(tmp_path, monkeypatch):
    gpt2_files(tmp_path, vocab_size=400)
    tok = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    texts = list(random_texts(100, seed=4, longest=2000)) + [
        TEXT + "<|endoftext|>" + TEXT, "<|endoftext|>", "a<|endoftext|><|endoftext|>b "]
    for text in texts:
        want = python_ids(tok, text, monkeypatch)
        assert tok.encode_utf8(text.encode("utf-8")).tolist() == want, repr(text[:60])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pieces_at_safe_cuts_encode_to_the_whole(bpe, threads, monkeypatch):
    from femtogpt import _core
    text = "".join(random_texts(400, seed=5, longest=2000)) + TEXT * 50
    data = text.encode("utf-8")
    want = python_ids(bpe, text, monkeypatch)
    previous = _core.get_num_threads()
    _core.set_num_threads(threads)
    try:
        assert bpe.encode_utf8(data).tolist() == want
    finally:
        _core.set_num_threads(previous)
    # Safe cuts of a sample: the two halves' ids concatenate to the whole's.
    short = data[:20000].decode("utf-8", "ignore").encode("utf-8")
    whole = bpe.encode_utf8(short).tolist()
    cuts = all_cuts(short, bpe.presplit_class_table())
    assert len(cuts) > 100
    for cut in cuts[::5]:
        assert (bpe.encode_utf8(short[:cut]).tolist()
                + bpe.encode_utf8(short[cut:]).tolist()) == whole, cut
    edges = piece_bounds(data, 8, bpe.presplit_class_table())
    assert edges[0] == 0 and edges[-1] == len(data) and len(edges) > 3
    assert all(e in set(cuts) or e > len(short) for e in edges[1:-1])


def all_cuts(data, classes):
    cuts, pos = [], 1
    while True:
        cut = _text.first_safe_cut(np.frombuffer(data, np.uint8), pos, len(data), classes)
        if cut < 0:
            return cuts
        cuts.append(cut)
        pos = cut + 1


@pytest.mark.parametrize("script", ["Русский текст, слово за словом.\n",
                                    "中文的句子没有空格。\n另一行的文字！\n",
                                    "العربية نص حكيم له سر قاطع\n", "Ελληνικά γράμματα εδώ.\r\n"])
def test_text_in_any_script_has_safe_cuts_and_they_are_safe(script, bpe, tmp_path,
                                                             monkeypatch):
    # Corpora with no ASCII letters must still be cut into blocks (else the
    # whole corpus would wait in memory for a cut).
    gpt2_files(tmp_path, vocab_size=400)
    gpt2 = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    rng = np.random.default_rng(10)
    words = script.replace("\n", " \n ").split(" ")
    text = "".join(rng.choice(words) + rng.choice([" ", "  ", "\n", "\t", ""]) for _ in range(3000))
    data = text.encode("utf-8")
    for tok in (bpe, gpt2):
        classes = tok.presplit_class_table()
        cuts = all_cuts(data, classes)
        assert len(cuts) > 100
        whole = python_ids(tok, text, monkeypatch)
        for cut in cuts[::37]:
            assert (tok.encode_utf8(data[:cut]).tolist()
                    + tok.encode_utf8(data[cut:]).tolist()) == whole, (cut, data[cut - 5:cut + 5])
        stream = BPEStream(tok)
        ids = []
        for start in range(0, len(data), 777):
            ids += stream.feed(data[start:start + 777]).tolist()
            assert len(stream.carry) < 5000        # the carry stays short
        ids += stream.finish().tolist()
        assert ids == whole


def test_stream_of_blocks_encodes_to_the_whole(tmp_path, bpe, monkeypatch):
    gpt2_files(tmp_path, vocab_size=400)
    gpt2 = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    text = ("".join(random_texts(200, seed=6, longest=1500)) + "<|endoftext|>") * 3
    data = text.encode("utf-8")
    for tok in (bpe, gpt2):
        want = python_ids(tok, text, monkeypatch)
        rng = np.random.default_rng(7)
        for _ in range(5):
            stream = BPEStream(tok)
            ids, pos = [], 0
            while pos < len(data):
                step = int(rng.integers(1, 5000))
                ids += stream.feed(data[pos:pos + step]).tolist()
                pos += step
            ids += stream.finish().tolist()
            assert ids == want


def test_encoder_refuses_bad_tables():
    table = class_table(*BPETokenizer._presplit_classes)
    with pytest.raises(ValueError, match="does not exist yet"):
        _text.Encoder(np.array([[300, 1]], dtype=np.int32), table, False)
    with pytest.raises(ValueError, match="one entry per code point"):
        _text.Encoder(np.zeros((0, 2), dtype=np.int32), table[:100].copy(), False)
    enc = _text.Encoder(np.zeros((0, 2), dtype=np.int32), table, False)
    data = np.frombuffer(b"abc", np.uint8)
    out, counts = np.zeros(3, np.uint32), np.zeros(1, np.int64)
    with pytest.raises(ValueError, match="bounds"):
        enc.encode(data, np.array([0, 2], np.int64), out, counts)
    with pytest.raises(ValueError, match="out must hold"):
        enc.encode(data, np.array([0, 3], np.int64), out[:2], counts)
    # Bytes that are not UTF-8 are taken one by one, never read past the end.
    junk = np.frombuffer(bytes(range(256)) + b"\xf0\x9f", np.uint8)
    out, counts = np.zeros(len(junk), np.uint32), np.zeros(1, np.int64)
    enc.encode(junk, np.array([0, len(junk)], np.int64), out, counts)
    assert out[:counts[0]].tolist() == list(junk)


def test_char_ids_count_and_offsets_in_c():
    from femtogpt.text import CharTokenizer
    rng = np.random.default_rng(8)
    for text in list(random_texts(60, seed=9, longest=200000)) + ["", "a", "😀é"]:
        data = np.frombuffer(text.encode("utf-8"), np.uint8)
        assert _text.count_chars(data) == len(text)
        for k in rng.integers(0, len(text) + 2, 5).tolist():
            assert _text.char_offset(data, k) == len(text[:k].encode("utf-8"))
        if not text:
            continue
        tok = CharTokenizer.from_text(text)
        assert tok.encode_utf8(data.tobytes()).tolist() == tok.encode(text)
        # A character the vocabulary lacks is found, wherever it is.
        missing = text[len(text) // 2]
        smaller = CharTokenizer("".join(sorted(set(text) - {missing})) or "?")
        with pytest.raises(femtogpt.TokenizerError, match="does not know"):
            smaller.encode_utf8(data.tobytes())
