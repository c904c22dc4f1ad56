"""Tests of the byte-level BPE tokenizer (femtogpt.text.bpe.BPETokenizer)."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import femtogpt
import femtogpt.text.bpe as tokenizer_module
from femtogpt.errors import TokenizerError
from femtogpt.text.bpe import DEFAULT_BPE_VOCAB, MAX_BPE_VOCAB, MAX_TOKEN_BYTES
from femtogpt.text import (
    TOKENIZER_KINDS,
    BPETokenizer,
    ByteTokenizer,
    build_tokenizer,
    tokenizer_from_dict,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "femtogpt", "data", "tinyshakespeare.txt")

# A small multi-script training text: words, numbers, punctuation, emoji, runs of spaces.
SMALL_TEXT = (
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs!\n"
    "Σπάρτη και Αθήνα, 2024: η πόλη.   Москва — столица России.\n"
    "東京は日本の首都です。 مرحبا بالعالم 123 4567 89.\n"
    "emoji 😀😀 and 👍🏽 — snake_case_name, x² ½, e\u0301t\u00e9.\t\ttabs\n\n\n"
    "    indented code(x) = [1, 2, 3]  # comment\n"
) * 20

# Characters the property tests draw from besides st.text()'s own choice.
INTERESTING = list(
    "abcxyz ABC  \n\t\r0123456789,.;:!?'\"-_()[]{}#"
    "Σπάρτηαβγ Москваждё 東京日本 مرحبا ١٢٣ ½² é\u0301\u00a0\u3000😀👍🏽"
)
PIECES = ["the", " the", "   ", " ", "\n\n", "\t", "dog", ",", ".", "😀", "Σπάρτη", " 東京",
          "123", " 45", "__", "é", "\u0301", "\u00a0", "  \n  ", "!!", "a"]

mixed_text = st.one_of(
    st.text(),
    st.text(alphabet=st.sampled_from(INTERESTING)),
    st.lists(st.sampled_from(PIECES), max_size=60).map("".join),
)


@pytest.fixture(scope="module")
def shakespeare_text():
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def shakespeare_bpe(shakespeare_text):
    """build_tokenizer's default BPE on Tiny Shakespeare, trained once for the module."""
    # (Speed is measured outside the tests: ~0.5 s to train, ~0.25 s to encode.)
    return build_tokenizer("bpe", shakespeare_text)


@pytest.fixture(scope="module")
def small_bpe():
    return BPETokenizer.train(SMALL_TEXT, 400)


# ----------------------------------------------------------------------------- references


def reference_train(text, vocab_size):
    """Textbook BPE: recount every pair from scratch before each merge."""
    words = Counter(tokenizer_module._PRESPLIT.findall(text))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    lengths = [1] * 256
    for new_id in range(256, vocab_size):
        counts = Counter()
        for w, n in words.items():
            seq = seqs[w]
            for pair in zip(seq, seq[1:]):
                if lengths[pair[0]] + lengths[pair[1]] <= tokenizer_module.MAX_TOKEN_BYTES:
                    counts[pair] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        lengths.append(lengths[best[0]] + lengths[best[1]])
        for w in seqs:
            seqs[w] = reference_merge(seqs[w], best, new_id)
    return merges


def reference_merge(seq, pair, new_id):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def reference_encode(tok, text):
    """Apply every merge, in learned order, to every chunk."""
    ids = []
    for chunk in tokenizer_module._PRESPLIT.findall(text):
        seq = list(chunk.encode("utf-8"))
        for i, pair in enumerate(tok.merges):
            seq = reference_merge(seq, pair, 256 + i)
        ids.extend(seq)
    return ids


def char_class(c):
    """Independent of the pre-split regex: letter, digit, space or other."""
    if c.isspace():
        return "space"
    if c.isdecimal():
        return "digit"
    if c.isalnum():
        return "letter"
    return "other"


def within_one_chunk(s):
    """Whether s can be (part of) one pre-split chunk: a whitespace run, or at
    most one leading space followed by characters of a single class."""
    if not s:
        return False
    if all(c.isspace() for c in s):
        return True
    body = s[1:] if s[0] == " " else s
    return len({char_class(c) for c in body}) == 1 and char_class(body[0]) != "space"


# ----------------------------------------------------------------------------- pre-split


@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_presplit_covers_text_exactly_once(text):
    chunks = tokenizer_module._PRESPLIT.findall(text)
    assert "".join(chunks) == text
    assert all(within_one_chunk(c) for c in chunks)


def test_presplit_examples():
    findall = tokenizer_module._PRESPLIT.findall
    assert findall("Hello, world!  It's 2024.\n\nOK") == [
        "Hello", ",", " world", "!", " ", " It", "'", "s", " 2024", ".", "\n", "\n", "OK"]
    # As in GPT-2, a whitespace run ends one character before a non-space.
    assert findall("a   b\n\n") == ["a", "  ", " b", "\n\n"]
    assert findall("snake_case x²") == ["snake", "_", "case", " x²"]
    assert findall("   ") == ["   "]
    assert findall("") == []


# ----------------------------------------------------------------------------- training


def test_hand_checked_tiny_case():
    # Chunks "aaab" and " aaab". (a, a) occurs 2 + 2 = 4 times: merge 256.
    # Then (256, a) and (a, b) both occur twice: the tie goes to the smaller pair (97, 98).
    # Then (256, 257) twice, then (" ", 258) once; then no pair is left.
    tok = BPETokenizer.train("aaab aaab", 1000)
    assert tok.merges == [(97, 97), (97, 98), (256, 257), (32, 258)]
    assert tok.vocab_size == 260  # stopped early: the text ran out of pairs
    assert tok.encode("aaab aaab") == [258, 259]
    assert tok.token_bytes(259) == b" aaab"
    assert tok.encode("aab") == [256, 98]
    assert tok.encode("ab") == [257]

    first = BPETokenizer.train("aaab aaab", 257)
    assert first.merges == [(97, 97)]
    assert first.vocab_size == 257
    assert first.encode("aaab") == [256, 97, 98]
    # Overlapping occurrences merge left to right.
    assert first.encode("aaaaa") == [256, 256, 97]


def test_ties_go_to_smallest_pair():
    # Every pair occurs once: ("ab", " cd") -> (32, 99) < (97, 98) < (99, 100).
    tok = BPETokenizer.train("ab cd", 257)
    assert tok.merges == [(32, 99)]


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(INTERESTING), max_size=200), extra=st.integers(0, 60))
def test_training_matches_reference(text, extra):
    assert BPETokenizer.train(text, 256 + extra).merges == reference_train(text, 256 + extra)


def test_training_matches_reference_on_small_text(small_bpe):
    assert small_bpe.merges == reference_train(SMALL_TEXT, 400)


def test_training_is_deterministic_across_processes():
    text = SMALL_TEXT[:2000]
    here = BPETokenizer.train(text, 350).to_dict()
    code = (
        "import json, sys\n"
        "from femtogpt.text import BPETokenizer\n"
        "text = sys.stdin.read()\n"
        "print(json.dumps(BPETokenizer.train(text, 350).to_dict()))\n"
    )
    for seed in ("1", "2"):
        # The imported package's parent, as PYTHONPATH and working directory: from the
        # repository root, `python -c` would import the source tree, which has no
        # compiled core when the package is installed with pip.
        package_parent = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=package_parent)
        out = subprocess.run([sys.executable, "-c", code], input=text, capture_output=True,
                             text=True, encoding="utf-8", env=env, cwd=package_parent,
                             check=True).stdout
        assert json.loads(out) == here


def test_training_twice_gives_identical_merges(shakespeare_text, shakespeare_bpe):
    again = BPETokenizer.train(shakespeare_text[:200_000], 400)
    assert again.merges == BPETokenizer.train(shakespeare_text[:200_000], 400).merges
    # A prefix of the training gives a prefix of the merges.
    assert BPETokenizer.train(shakespeare_text, 300).merges == shakespeare_bpe.merges[:44]


def test_merges_never_cross_chunks(shakespeare_bpe):
    tokens = [shakespeare_bpe.token_bytes(i).decode("ascii") for i in range(256, 512)]
    bad = [t for t in tokens if not within_one_chunk(t)]
    assert bad == []
    # Some tokens do carry the leading space of the word.
    assert " the" in tokens and " and" in tokens


def test_exhausted_training_gives_one_token_per_chunk():
    text = "hello, world. hello, world!  hi-fi 42 42x " * 30 + SMALL_TEXT
    tok = BPETokenizer.train(text, MAX_BPE_VOCAB)
    assert tok.vocab_size < MAX_BPE_VOCAB  # stopped early
    chunks = tokenizer_module._PRESPLIT.findall(text)
    ids = tok.encode(text)
    assert [tok.decode([i]) for i in ids] == chunks
    # Frequent cross-boundary pairs such as "o," or ". " never became tokens.
    vocab = {tok.token_bytes(i) for i in range(tok.vocab_size)}
    assert b"hello" in vocab and b" world" in vocab
    assert not any(b"o," in t or b". " in t or b"d!" in t or b"2x" in t for t in vocab)


def test_build_tokenizer_bpe(shakespeare_bpe):
    assert isinstance(shakespeare_bpe, BPETokenizer)
    assert shakespeare_bpe.vocab_size == DEFAULT_BPE_VOCAB == 512
    assert build_tokenizer("bpe", "aaab aaab", vocab_size=300).vocab_size == 260
    assert build_tokenizer("bpe", "", vocab_size=300).vocab_size == 256
    assert build_tokenizer("bpe", "abab", vocab_size=256).merges == []
    assert "bpe" in TOKENIZER_KINDS
    # char and byte ignore vocab_size.
    assert build_tokenizer("char", "hello", vocab_size=999).vocab_size == 4
    assert build_tokenizer("byte", "hello", vocab_size=999).vocab_size == 256


@pytest.mark.parametrize(
    "vocab_size, fragment",
    [
        (255, "at least 256"),
        (0, "at least 256"),
        (-1, "at least 256"),
        (MAX_BPE_VOCAB + 1, "limit"),
        (300.0, "integer"),
        ("512", "integer"),
        (True, "integer"),
    ],
)
def test_bad_vocab_size(vocab_size, fragment):
    with pytest.raises(TokenizerError, match=fragment):
        build_tokenizer("bpe", "hello", vocab_size=vocab_size)
    with pytest.raises(TokenizerError, match=fragment):
        BPETokenizer.train("hello", vocab_size)


def test_train_rejects_non_text():
    with pytest.raises(TokenizerError, match="str"):
        BPETokenizer.train(b"hello", 300)


# ----------------------------------------------------------------------------- Shakespeare


def test_shakespeare_compression(shakespeare_text, shakespeare_bpe):
    ids = shakespeare_bpe.encode_array(shakespeare_text)
    assert ids.dtype == np.uint16
    n_bytes = len(shakespeare_text.encode("utf-8"))
    # Measured 577,839 tokens for 1,115,394 bytes: 0.518 tokens per byte.
    assert len(ids) / n_bytes < 0.55
    assert shakespeare_bpe.decode(ids) == shakespeare_text
    assert shakespeare_bpe.encode(shakespeare_text) == ids.tolist()


def test_encode_matches_reference(shakespeare_text, shakespeare_bpe, small_bpe):
    sample = shakespeare_text[:3000]
    assert shakespeare_bpe.encode(sample) == reference_encode(shakespeare_bpe, sample)
    assert small_bpe.encode(SMALL_TEXT[:3000]) == reference_encode(small_bpe, SMALL_TEXT[:3000])


# ----------------------------------------------------------------------------- round trips


def check_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    array = tok.encode_array(text)
    assert array.dtype == tok.id_dtype
    assert array.tolist() == ids
    assert tok.decode(array) == text


@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_round_trip_small(small_bpe, text):
    check_round_trip(small_bpe, text)
    assert small_bpe.encode(text) == reference_encode(small_bpe, text)


@settings(max_examples=300, deadline=None)
@given(mixed_text)
def test_round_trip_shakespeare(shakespeare_bpe, text):
    check_round_trip(shakespeare_bpe, text)


@pytest.mark.parametrize(
    "text",
    ["", " ", " " * 10_000, "\n" * 1000 + "x", "😀" * 50, "e\u0301" * 30, "١٢٣ 123 ½",
     "Σπάρτη Москва 東京 مرحبا", SMALL_TEXT, "a" * 5000 + " " + "a" * 5000],
)
def test_round_trip_edge_cases(small_bpe, shakespeare_bpe, text):
    for tok in (small_bpe, shakespeare_bpe):
        check_round_trip(tok, text)


def test_long_chunks_use_same_merges():
    # Merges for long runs of a byte: (32, 32), then pairs of those, and so on.
    tok = BPETokenizer.train(("e" * 37 + " " * 53 + "ab" * 20 + "\n") * 50, 300)
    for text in (" " * 3001, "e" * 2999 + "!", "ab" * 1500 + "a", "x" * 60, " " * 300 + "eee" * 200):
        ids = tok.encode(text)
        assert ids == reference_encode(tok, text)
        assert tok.decode(ids) == text
    assert len(tok.encode(" " * 3000)) < 3000 / 8


@settings(max_examples=100, deadline=None)
@given(mixed_text)
def test_long_chunk_path_matches_short_path(monkeypatch_module_long, small_bpe, text):
    assert small_bpe.encode(text) == reference_encode(small_bpe, text)


@pytest.fixture(scope="module")
def monkeypatch_module_long():
    """Send every chunk through the heap-based encoder."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tokenizer_module, "_LONG_CHUNK", 0)
    yield
    mp.undo()


def test_encode_array_spans_slices(monkeypatch, small_bpe):
    # Slices of 7 characters cut through words and whitespace runs; the
    # result must not depend on where they fall.
    texts = [SMALL_TEXT[:2000], " " * 30 + "x" + " " * 29, "abc" * 40, "a  b   c    d\n\n\ne"]
    expected = [small_bpe.encode(t) for t in texts]
    for size in (1, 2, 7, 64):
        monkeypatch.setattr(tokenizer_module, "_CHUNK_CHARS", size)
        for text, ids in zip(texts, expected):
            assert small_bpe.encode_array(text).tolist() == ids


def test_encode_array_empty(small_bpe):
    array = small_bpe.encode_array("")
    assert array.shape == (0,)
    assert array.dtype == np.uint16
    assert small_bpe.encode("") == []
    assert small_bpe.decode([]) == ""


def test_id_dtype_without_merges():
    tok = BPETokenizer([])
    assert tok.vocab_size == 256
    assert tok.encode_array("héllo").dtype == np.uint8
    assert tok.encode("héllo") == ByteTokenizer().encode("héllo")


# ----------------------------------------------------------------------------- surrogates & decode


@pytest.mark.parametrize("text", ["a\udcffb", "\ud800", "x \udcff\ud800 y", "\udc80" * 5 + "the"])
def test_surrogates_encode_like_byte_tokenizer(small_bpe, text):
    expected = bytes(ByteTokenizer().encode(text))
    ids = small_bpe.encode(text)
    assert small_bpe.decode_bytes(ids) == expected
    assert small_bpe.encode_array(text).tolist() == ids
    assert small_bpe.decode(ids) == ByteTokenizer().decode(list(expected))


def test_decode_incomplete_utf8_replaces(small_bpe):
    euro = "€".encode("utf-8")
    assert small_bpe.decode(list(euro[:2])) == "\ufffd"
    assert small_bpe.decode([0xFF, 0xFE, 65]) == "\ufffd\ufffdA"
    # A learned token that is only part of a character.
    partial = [i for i in range(256, small_bpe.vocab_size) if not is_utf8(small_bpe.token_bytes(i))]
    assert partial, "the small text should teach some partial-character tokens"
    assert "\ufffd" in small_bpe.decode(partial[:1])


def is_utf8(data):
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 399), max_size=100))
def test_decode_never_raises_on_valid_ids(small_bpe, ids):
    text = small_bpe.decode(ids)
    assert isinstance(text, str)
    assert small_bpe.decode_bytes(ids) == b"".join(small_bpe.token_bytes(i) for i in ids)


@pytest.mark.parametrize("ids", [[400], [-1], [0, 1, 10_000], np.array([400], dtype=np.uint64)])
def test_decode_out_of_range(small_bpe, ids):
    with pytest.raises(TokenizerError, match="out of range"):
        small_bpe.decode(ids)
    with pytest.raises(TokenizerError, match="out of range"):
        small_bpe.decode_bytes(ids)


@pytest.mark.parametrize("ids", [[0.5], "ab", b"ab", [[0, 1]], [True]])
def test_decode_rejects_non_integer_ids(small_bpe, ids):
    with pytest.raises(TokenizerError):
        small_bpe.decode(ids)


# ----------------------------------------------------------------------------- dicts


def test_to_dict_round_trip(small_bpe, shakespeare_bpe):
    for tok in (small_bpe, shakespeare_bpe):
        d = tok.to_dict()
        assert set(d) == {"type", "merges"} and d["type"] == "bpe"
        assert len(d["merges"]) == tok.vocab_size - 256
        rebuilt = tokenizer_from_dict(json.loads(json.dumps(d)))
        assert isinstance(rebuilt, BPETokenizer)
        assert rebuilt == tok
        assert rebuilt.to_dict() == d
        assert rebuilt.vocab_size == tok.vocab_size
        for text in (SMALL_TEXT, "Σπάρτη 😀 the  end\n"):
            assert rebuilt.encode(text) == tok.encode(text)
            assert rebuilt.encode_array(text).tolist() == tok.encode_array(text).tolist()


def test_to_dict_contents():
    assert BPETokenizer.train("aaab aaab", 1000).to_dict() == {
        "type": "bpe", "merges": [[97, 97], [97, 98], [256, 257], [32, 258]]}
    assert BPETokenizer.train("aaab aaab", 1000) != BPETokenizer.train("aaab aaab", 258)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"type": "bpe"}, "missing ['merges']"),
        ({"type": "bpe", "merges": [], "vocab": {}}, "unexpected ['vocab']"),
        ({"type": "bpe", "merges": None}, "must be a list"),
        ({"type": "bpe", "merges": "97 97"}, "must be a list"),
        ({"type": "bpe", "merges": {"0": [97, 97]}}, "must be a list"),
        ({"type": "bpe", "merges": [97, 97]}, "merge 0 must be a pair"),
        ({"type": "bpe", "merges": [[97]]}, "merge 0 must be a pair"),
        ({"type": "bpe", "merges": [[97, 97, 97]]}, "merge 0 must be a pair"),
        ({"type": "bpe", "merges": [[97, 97], "ab"]}, "merge 1 must be a pair"),
        ({"type": "bpe", "merges": [[97, "a"]]}, "integers"),
        ({"type": "bpe", "merges": [[97, 97.0]]}, "integers"),
        ({"type": "bpe", "merges": [[True, 97]]}, "integers"),
        ({"type": "bpe", "merges": [[97, None]]}, "integers"),
        ({"type": "bpe", "merges": [[-1, 97]]}, "token -1"),
        ({"type": "bpe", "merges": [[97, 256]]}, "does not exist yet"),
        ({"type": "bpe", "merges": [[97, 97], [256, 257]]}, "merge 1 [256, 257] refers to token 257"),
        ({"type": "bpe", "merges": [[97, 97], [98, 98], [97, 97]]}, "merge 2 [97, 97] is a duplicate of merge 0"),
        ({"type": "bpe", "merges": [[97, 97]] * (MAX_BPE_VOCAB - 255)}, "limit"),
    ],
)
def test_bad_bpe_dicts_rejected(bad, fragment):
    with pytest.raises(TokenizerError) as info:
        tokenizer_from_dict(bad)
    assert fragment in str(info.value)


def test_largest_valid_dict_accepted():
    # Chains b, bb, bbb, ... up to the longest token allowed, for many byte values b.
    merges = []
    for b in range(256):
        if len(merges) + MAX_TOKEN_BYTES - 1 > MAX_BPE_VOCAB - 256:
            break
        merges.append([b, b])
        for _ in range(MAX_TOKEN_BYTES - 2):
            merges.append([256 + len(merges) - 1, b])  # the previous token, one byte longer
    merges += [[0, b] for b in range(1, MAX_BPE_VOCAB - 256 - len(merges) + 1)]
    tok = tokenizer_from_dict({"type": "bpe", "merges": merges})
    assert tok.vocab_size == MAX_BPE_VOCAB
    assert len(tok.token_bytes(256 + MAX_TOKEN_BYTES - 2)) == MAX_TOKEN_BYTES
    assert tok.encode_array("a" * 100).dtype == np.uint16
    assert tok.decode(tok.encode("a" * 1000)) == "a" * 1000


@pytest.mark.parametrize("chain", ["doubling", "growing"])
def test_dict_with_too_long_token_rejected(chain):
    if chain == "doubling":  # a, aa, aaaa, ...: 2 ** 65280 bytes if it were built
        merges = [[97, 97]] + [[256 + i, 256 + i] for i in range(MAX_BPE_VOCAB - 257)]
    else:
        merges = [[97, 97]] + [[256 + i, 97] for i in range(MAX_BPE_VOCAB - 257)]
    # Refused as soon as the chain passes the limit, before building anything huge.
    with pytest.raises(TokenizerError, match=f"limit of {MAX_TOKEN_BYTES}"):
        tokenizer_from_dict({"type": "bpe", "merges": merges})


def test_training_respects_token_length_limit(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_TOKEN_BYTES", 4)
    text = ("x" * 50 + " " + "hello world " * 3 + "\n") * 5
    tok = BPETokenizer.train(text, 400)
    assert tok.merges == reference_train(text, 400)
    assert max(len(tok.token_bytes(i)) for i in range(tok.vocab_size)) == 4
    assert tok.encode(text) == reference_encode(tok, text)
    assert tok.decode(tok.encode(text)) == text
    # Exhausted: every pair left would make a token over the limit.
    assert tok.vocab_size < 400
