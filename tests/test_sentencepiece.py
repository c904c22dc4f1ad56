"""The SentencePiece tokenizer (femtogpt/text/sentencepiece_tokenizer.py): ids
are the sentencepiece library's own, any text round-trips through byte
fallback, the model's bytes travel inside the run with a digest, and a run
killed with SIGKILL resumes to the same state as an uninterrupted one."""
import base64
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest

import sentencepiece as spm

from femtogpt.app.cli import main
from femtogpt.errors import TokenizerError
from femtogpt.files import load
from femtogpt.files.checkpoint import load_checkpoint
from femtogpt.text import (SentencePieceTokenizer, build_tokenizer, corpus, token_cache,
                           tokenizer_from_dict)
from femtogpt.text.token_cache import open_tokens

from test_train import PACKAGE_PARENT, assert_same_training_state, cli_env

WORDS = {
    "en": "the quick brown fox jumps over a lazy dog while seven wizards box".split(),
    "el": "η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο".split(),
    "ru": "съешь же ещё этих мягких французских булок да выпей чаю".split(),
    "ar": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر".split(),
    "ja": "いろはにほへと ちりぬるを わかよたれそ つねならむ うゐのおくやま".split(),
}
# The pieces of the five scripts' characters and bytes (~410) and some words.
VOCAB = 480
HELD_OUT = [
    "The lazy wizards jumped over seven brown boxes, quickly.\n",
    "Ο σκύλος πηδά πάνω από την αλεπού.\n  Καλημέρα!",
    "Выпей же чаю, да съешь ещё булок.\n\n",
    "مكتوب على ثوب  أخضر\tنص",
    "わかよたれそ、いろはにほへと。",
    "mixed: fox αλεπού лиса ثعلب きつね 狐 🦊 and ½ ² ∞\n",
]
ROUND_TRIPS = HELD_OUT + [
    "", " ", "  two spaces", "trailing  ", "\n", "\n\nleading newlines", "tabs\t\tand\r\nCRLF",
    "emoji 😀🎉🚀 never seen", "한국어는 처음 보는 문자", "combining e\u0301 and Å", "日本語\u3000全角",
    "a" * 300, "numbers 1234567890 3.14159",
]


def make_text(seed=0, lines=3000):
    """Lines of random words in five scripts: a corpus where every script is common."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = WORDS[rng.choice(sorted(WORDS))]
        out.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))))
        if rng.random() < 0.2:
            out.append("")
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def text():
    return make_text()


@pytest.fixture(scope="module", params=["sentencepiece", "sentencepiece-bpe"])
def trained(request, text):
    return build_tokenizer(request.param, text, VOCAB)


def library(tok):
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(tok.model_bytes)
    return sp


# --------------------------------------------------------------------------- training

def test_training_learns_the_pieces_of_the_text(trained, text):
    assert trained.vocab_size == VOCAB
    assert trained.info.byte_fallback and trained.info.normalizer == "identity"
    assert not trained.info.add_dummy_prefix
    assert trained.info.model_type == ("bpe" if trained.kind == "sentencepiece-bpe"
                                       else "unigram")
    pieces = {trained.piece(i) for i in range(trained.vocab_size)}
    # Whole words of the corpus (with the ▁ that marks a leading space), in several
    # scripts: unigram keeps the likeliest words, BPE the most merged.
    words = {"▁fox", "▁σκύλο", "▁чаю", "▁ثوب"} if trained.kind == "sentencepiece" \
        else {"▁いろはにほへと", "σκύλο", "мягких"}
    assert words <= pieces
    # A model learned from text shortens it: far fewer ids than bytes.
    assert len(trained.encode(text)) < len(text.encode()) / 3
    # Deterministic: the same text gives the same model, byte for byte.
    assert build_tokenizer(trained.kind, text, VOCAB).model_bytes == trained.model_bytes


# --------------------------------------------------------------------------- ids and round trips

def test_ids_equal_the_librarys_on_held_out_text_in_several_scripts(trained):
    sp = library(trained)
    for x in HELD_OUT:
        ids = trained.encode(x)
        assert ids == sp.encode(x), x
        assert trained.encode_array(x).tolist() == ids
        assert trained.decode(ids) == sp.decode(ids) == x


def test_a_long_text_is_the_librarys_ids_of_its_segments_whatever_the_blocks(trained):
    sp = library(trained)
    long = make_text(seed=7, lines=20000)        # ~1 MB: many 64 KB segments
    data = long.encode()
    cuts = trained.cut_points(data, 1 << 16)
    assert len(cuts) > 8 and all(data[c:c + 1] == b" " for c in cuts)
    segments = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
    assert all(len(seg) >= 1 << 16 for seg in segments[:-1])
    expected = [i for seg in segments for i in sp.encode(seg.decode())]
    assert trained.encode_utf8(data).tolist() == expected
    # Block by block as the token cache reads it, at edges that cut characters:
    # the same ids, whatever the block size.
    for block in (9973, 1 << 16, 200_000):
        stream, got = trained.stream(), []
        for i in range(0, len(data), block):
            got += stream.feed(data[i:i + block]).tolist()
        got += stream.finish().tolist()
        assert got == expected, block
    # The library's call on the whole text differs only where two orders of the
    # same pieces score alike (its float sums then round by position): the
    # same text, the same number of ids, almost every id in place.
    whole = sp.encode(long)
    assert trained.decode(expected) == long == sp.decode(whole)
    assert len(whole) == len(expected)
    assert np.mean(np.array(whole) != np.array(expected)) < 0.001


def test_every_text_round_trips(trained):
    for x in ROUND_TRIPS:
        ids = trained.encode(x)
        assert trained.decode(ids) == x, x
        # Token by token, as the sampler streams them.
        assert b"".join(trained.decode_bytes([i]) for i in ids) == x.encode(), x


def test_pieces_that_do_not_cover_the_text_round_trip_through_byte_fallback(tmp_path):
    english = " ".join(WORDS["en"]) + "\n"
    tok = build_tokenizer("sentencepiece", english * 200, 300)
    sp = library(tok)
    for x in ["狐と犬 🦊", "Καλημέρα κόσμε", "ثعلب", "\x00\x01\x7f"]:
        ids = tok.encode(x)
        assert ids == sp.encode(x)
        assert tok.decode(ids) == x
        # Every character but the space is unknown to the pieces: one byte piece per byte.
        pieces = [tok.piece(i) for i in ids]
        assert [p for p in pieces if p != "▁"] == [f"<0x{b:02X}>" for b in
                                                    x.replace(" ", "").encode()], x


def test_a_model_without_byte_fallback_refuses_what_it_cannot_encode(tmp_path):
    model = tmp_path / "plain"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(WORDS["en"] * 50),
                                   model_prefix=str(model), vocab_size=30,
                                   hard_vocab_limit=False, byte_fallback=False, minloglevel=2)
    tok = SentencePieceTokenizer.from_file(str(model) + ".model")
    assert tok.kind == "sentencepiece" and not tok.info.byte_fallback
    assert tok.decode(tok.encode("the fox")) == "the fox"
    with pytest.raises(TokenizerError, match="prompt has characters the tokenizer does not "
                                             "know: 'Ж'"):
        tok.encode("the Жfox", what="prompt")


# --------------------------------------------------------------------------- the model's bytes

def test_to_dict_carries_the_model_with_its_digest(trained):
    d = json.loads(json.dumps(trained.to_dict()))
    assert set(d) == {"type", "model", "digest"} and d["type"] == trained.kind
    assert base64.b64decode(d["model"]) == trained.model_bytes
    again = tokenizer_from_dict(d)
    assert again == trained and again.encode(HELD_OUT[5]) == trained.encode(HELD_OUT[5])
    raw = bytearray(trained.model_bytes)
    raw[len(raw) // 2] ^= 0x01           # one bit of one piece
    with pytest.raises(TokenizerError, match="does not match its digest"):
        tokenizer_from_dict(dict(d, model=base64.b64encode(bytes(raw)).decode()))
    with pytest.raises(TokenizerError, match="its model is 'sentencepiece"):
        tokenizer_from_dict(dict(d, type="sentencepiece-char"))


@pytest.mark.parametrize("damage", ["half", "one byte short", "ten bytes", "garbage", "empty"])
def test_a_damaged_or_truncated_model_is_refused_with_one_line(tmp_path, trained, capsys, damage):
    data = trained.model_bytes
    bad = {"half": data[:len(data) // 2], "one byte short": data[:-1], "ten bytes": data[:10],
           "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
    path = tmp_path / "x.model"
    path.write_bytes(bad)
    (tmp_path / "data.txt").write_text("some text\n" * 50)
    status = main(["prepare", "--data", str(tmp_path / "data.txt"), "--tokenizer", str(path),
                   "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("femtogpt: error: ") and str(path) in err[0], err
    assert "damaged" in err[0] or "empty" in err[0]


# --------------------------------------------------------------------------- the token cache

def test_the_token_cache_holds_the_librarys_ids_of_each_split(tmp_path, text, monkeypatch):
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 4096)        # many blocks, edges everywhere
    folder = tmp_path / "c"
    folder.mkdir()
    parts = [text[:len(text) // 3], text[len(text) // 3:]]
    for i, part in enumerate(parts):
        (folder / f"part{i}.txt").write_text(part, encoding="utf-8")
    tokens = open_tokens(str(folder), "sentencepiece", VOCAB, cache_dir=str(tmp_path / "cache"),
                         log=lambda m: None, progress=False)
    tok = tokens.tokenizer
    assert tok.kind == "sentencepiece" and tok.vocab_size == VOCAB
    whole = "".join(parts)
    n_train = int(len(whole) * 0.9)
    sp = library(tok)
    assert tokens.train.read().tolist() == sp.encode(whole[:n_train])
    assert tokens.val.read().tolist() == sp.encode(whole[n_train:])
    assert tokens.val_chars == len(whole) - n_train
    # Reused as it is on the next start.
    assert not open_tokens(str(folder), "sentencepiece", VOCAB, cache_dir=str(tmp_path / "cache"),
                           log=lambda m: None, progress=False).built


def test_the_trainer_reads_a_bounded_sample_of_the_training_text(tmp_path, monkeypatch):
    monkeypatch.setattr(token_cache, "SP_SAMPLE_BYTES", 64 << 10)
    monkeypatch.setattr(token_cache, "SP_SAMPLE_PIECES", 16)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 8192)
    train = make_text(seed=3, lines=8000)                         # ~400 KB, > the sample
    val = "zqxjvw " * (len(train) // 9 // 7)                      # the last 10%
    (tmp_path / "data.txt").write_text(train + val, encoding="utf-8")
    logs = []
    a = open_tokens(str(tmp_path / "data.txt"), "sentencepiece", VOCAB,
                    cache_dir=str(tmp_path / "a"), log=logs.append, progress=False)
    b = open_tokens(str(tmp_path / "data.txt"), "sentencepiece", VOCAB,
                    cache_dir=str(tmp_path / "b"), log=lambda m: None, progress=False)
    assert a.tokenizer == b.tokenizer                          # deterministic
    assert a.manifest["spec"]["sample_bytes"] == 64 << 10
    assert any("on 0.1 MB of the training text" in m for m in logs), logs
    pieces = {a.tokenizer.piece(i) for i in range(a.tokenizer.vocab_size)}
    assert "▁zqxjvw" not in pieces and "zqxjvw" not in pieces     # val text is never sampled
    assert "▁σκύλο" in pieces                                    # the sample saw the corpus


def test_prepare_with_sp_type_bpe_and_with_a_given_model(tmp_path, text, capsys):
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    assert main(["prepare", "--data", str(data), "--tokenizer", "sentencepiece", "--sp-type",
                 "bpe", "--vocab-size", str(VOCAB), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    assert f"sentencepiece-bpe vocabulary of {VOCAB}" in capsys.readouterr().out
    given = build_tokenizer("sentencepiece", text, VOCAB - 20)
    model = tmp_path / "given.model"
    model.write_bytes(given.model_bytes)
    tokens = open_tokens(str(data), str(model), cache_dir=str(tmp_path / "cache"),
                         log=lambda m: None, progress=False)
    assert tokens.tokenizer.model_bytes == given.model_bytes      # used as it is
    assert tokens.train.read().tolist() == library(given).encode(text[:int(len(text) * 0.9)])
    assert main(["prepare", "--data", str(data), "--tokenizer", "bpe", "--sp-type", "bpe"]) == 2
    assert "--sp-type bpe needs --tokenizer sentencepiece" in capsys.readouterr().err


# --------------------------------------------------------------------------- runs

SP_FLAGS = ["--tokenizer", "sentencepiece", "--vocab-size", "450", "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--block-size", "8", "--batch-size", "4",
            "--max-iters", "200", "--eval-interval", "50", "--eval-iters", "5",
            "--save-interval", "5", "--no-progress", "--sample-tokens", "0", "--threads", "1",
            "--dropout", "0.1"]


def _train(data, out):
    return ["python", "-m", "femtogpt.app.cli", "train", "--data", data, "--out", out] + SP_FLAGS


def test_sigkill_mid_run_then_same_command_equals_uninterrupted(tmp_path):
    data = str(tmp_path / "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(make_text(seed=1, lines=400))
    reference = str(tmp_path / "reference")
    done = subprocess.run(_train(data, reference), env=cli_env(), cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = str(tmp_path / "killed")
    proc = subprocess.Popen(_train(data, out), env=cli_env(), cwd=PACKAGE_PARENT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(out, "ckpt.safetensors")
    deadline = time.monotonic() + 60
    while not (os.path.exists(ckpt) and load_checkpoint(ckpt)[1]["iter"] >= 60):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.003)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    saved = load_checkpoint(ckpt)[1]["iter"]
    assert proc.returncode == -signal.SIGKILL and saved < 200
    resumed = subprocess.run(_train(data, out), env=cli_env(), cwd=PACKAGE_PARENT,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at iteration {saved}" in resumed.stderr
    assert_same_training_state(reference, out)
    model, tok = load(out)
    assert tok.kind == "sentencepiece" and model.config.vocab_size == tok.vocab_size > 300
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    # Bits per character: the loss per token spread over the val text's characters.
    assert 0 < rows[-1]["val_bpc"] < rows[-1]["val_loss"] / np.log(2)
    # femtogpt verify reads the model's bytes back against their digest.
    verified = subprocess.run(["python", "-m", "femtogpt.app.cli", "verify", out], env=cli_env(),
                              cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "sentencepiece tokenizer" in verified.stdout


def test_hugging_face_loads_the_exported_tokenizer_with_the_same_ids(tmp_path, trained):
    transformers = pytest.importorskip("transformers")
    from femtogpt.files.hf_sentencepiece import write_sentencepiece_files
    write_sentencepiece_files(trained, str(tmp_path), 64)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for x in HELD_OUT + ["  two  spaces\n\n", "emoji 😀🎉 한국어"]:
        ids = trained.encode(x)
        assert hf.encode(x) == ids, x
        assert hf.decode(ids) == x
    assert (tmp_path / "tokenizer.model").read_bytes() == trained.model_bytes


def test_the_hugging_face_files_describe_the_model_without_transformers(tmp_path, trained):
    """What the export writes, checked without transformers (the test above needs it)."""
    from femtogpt.files.hf_sentencepiece import tokenizer_json
    spec = tokenizer_json(trained)
    model = spec["model"]
    assert model["byte_fallback"] is True
    if trained.kind == "sentencepiece":
        assert model["type"] == "Unigram" and len(model["vocab"]) == trained.vocab_size
        sp = library(trained)
        assert [s for _, s in model["vocab"]] == [sp.get_score(i) for i in range(sp.vocab_size())]
    else:
        assert model["type"] == "BPE" and len(model["vocab"]) == trained.vocab_size
        # Every learned piece of two or more characters is some merge's result.
        made = {a + b for a, b in model["merges"]}
        longer = [p for p, i in model["vocab"].items() if len(p) > 1 and not p.startswith("<")]
        assert longer and set(longer) <= made
    assert spec["normalizer"]["normalizers"] == [
        {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    assert spec["post_processor"] is None          # no <s> added around the ids
