"""Corpora bigger than memory: --data as a file, a directory or a glob, read
block by block (corpus.py), tokenized once into a token cache (token_cache.py)
that is reused while it is right and rebuilt when it is not."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import femtogpt
from femtogpt.text import cache_build, corpus, token_cache, token_files
from femtogpt.app.cli import main
from femtogpt.errors import DataError
from femtogpt.text.token_cache import MANIFEST, open_tokens
from femtogpt.text import BPETokenizer, CharTokenizer

# Several scripts and multi-byte characters, so that block edges fall inside them.
PARTS = ["First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30,
         "Ελληνικά και русский текст, naïve café.\n" * 25,
         "日本語の文章と絵文字 😀🎉, and numbers 1234.\n" * 20]


def quiet(message):
    pass


def visible(folder):
    """An entry's files but its lock."""
    return sorted(n for n in os.listdir(folder) if n != ".lock")


def write_corpus(folder, parts=PARTS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(parts):
        (folder / f"part{i}.txt").write_text(text, encoding="utf-8")
    return "".join(parts)


def split(text):
    n = int(len(text) * 0.9)
    return text[:n], text[n:]


def prepare(data, cache, kind="char", vocab_size=300, **kwargs):
    return open_tokens(str(data), kind, vocab_size, cache_dir=str(cache), log=quiet,
                       progress=False, **kwargs)


# ----------------------------------------------------------------------------- sources

def test_a_directory_is_its_files_in_sorted_order_without_hidden_ones(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deeper").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b" / "deeper" / "2.txt").write_text("two")
    (root / "b" / "1.txt").write_text("one")
    (root / "a.txt").write_text("zero")
    (root / ".hidden.txt").write_text("secret")
    (root / ".git" / "HEAD").write_text("ref")
    names = [os.path.relpath(s.path, root) for s in corpus.list_sources(root)]
    assert names == ["a.txt", os.path.join("b", "1.txt"), os.path.join("b", "deeper", "2.txt")]
    # A glob, with ** for any depth.
    names = [os.path.relpath(s.path, root) for s in corpus.list_sources(str(root / "**/*.txt"))]
    assert names == ["a.txt", os.path.join("b", "1.txt"), os.path.join("b", "deeper", "2.txt")]
    names = [os.path.relpath(s.path, root) for s in corpus.list_sources(str(root / "b" / "*.txt"))]
    assert names == [os.path.join("b", "1.txt")]


@pytest.mark.parametrize("block_bytes", [1, 2, 3, 5, 7, 64, 1 << 20])
def test_blocks_are_whole_characters_whatever_the_block_size(tmp_path, block_bytes):
    text = write_corpus(tmp_path / "c")
    (tmp_path / "c" / "part1.txt").write_bytes(b"\xef\xbb\xbf" + PARTS[1].encode())  # a BOM
    sources = corpus.list_sources(tmp_path / "c")
    blocks = list(corpus.read_blocks(sources, block_bytes=block_bytes))
    assert "".join(b.text for b in blocks) == text
    for b in blocks:
        assert b.data.decode("utf-8") == b.text and b.chars == len(b.text)
    # The second pass reads bytes only, cut at the same kind of edges.
    digests = []
    raw = list(corpus.read_blocks(sources, block_bytes=block_bytes, decode=False,
                                  digests=digests))
    assert b"".join(b.data for b in raw) == text.encode("utf-8")
    assert all(b.chars == len(b.data.decode("utf-8")) for b in raw)
    assert len(digests) == 3
    # Offsets point into each file (after the BOM of part1).
    first_of_part1 = next(b for b in blocks if b.source == 1)
    assert first_of_part1.offset == 3


def test_bad_files_are_named_with_the_byte_offset(tmp_path):
    root = tmp_path / "c"
    write_corpus(root)
    bad = root / "part1.txt"
    data = PARTS[1].encode()
    at = data.index(b"\n", 1000) + 1           # between two characters
    bad.write_bytes(data[:at] + b"\xff" + data[at:])
    for block_bytes in (7, at - 1, at, at + 1, 1 << 20):
        with pytest.raises(DataError, match=f"invalid byte 0xff at byte offset {at}: {bad}"):
            list(corpus.read_blocks(corpus.list_sources(root), block_bytes=block_bytes))
    cut = data.rstrip(b".\n")[:-1]       # cut inside the last character, an é
    bad.write_bytes(cut)
    with pytest.raises(DataError, match=f"byte offset {len(cut) - 1}: {bad}"):
        list(corpus.read_blocks(corpus.list_sources(root), block_bytes=64))
    bad.write_bytes(data[:500] + b"\x00\x01" + data[500:])
    with pytest.raises(DataError, match=f"looks binary \\(NUL byte at byte offset 500\\).*{bad}"):
        list(corpus.read_blocks(corpus.list_sources(root)))


def test_empty_sources_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        corpus.list_sources(tmp_path / "empty")
    with pytest.raises(DataError, match="matches no files"):
        corpus.list_sources(str(tmp_path / "empty" / "*.txt"))
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(DataError, match="every file of --data .* is empty"):
        corpus.list_sources(tmp_path / "empty")


# ----------------------------------------------------------------------------- the cache

@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_the_cache_holds_the_split_concatenation(tmp_path, kind, monkeypatch):
    # Small blocks: block edges fall inside characters and inside BPE words.
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 97)
    text = write_corpus(tmp_path / "c")
    tokens = prepare(tmp_path / "c", tmp_path / "cache", kind)
    train_text, val_text = split(text)       # the split is by characters, across files
    assert val_text.startswith(PARTS[2][-len(val_text):]) and len(val_text) < len(PARTS[2])
    if kind == "char":
        expected = CharTokenizer.from_text(text)
    elif kind == "bpe":
        expected = BPETokenizer.train(train_text, 300)  # learned from the training text only
    else:
        expected = femtogpt.ByteTokenizer()
    assert tokens.tokenizer == expected
    assert tokens.train.read().tolist() == expected.encode(train_text)
    assert tokens.val.read().tolist() == expected.encode(val_text)
    assert tokens.chars == len(text) and tokens.val_chars == len(val_text)
    assert tokens.train.dtype == np.uint16


def test_reuse_touch_edit_and_tokenizer_change(tmp_path):
    write_corpus(tmp_path / "c")
    first = prepare(tmp_path / "c", tmp_path / "cache")
    assert first.built
    again = prepare(tmp_path / "c", tmp_path / "cache")
    assert not again.built and again.folder == first.folder
    # Touched, same content: reused, and the new time is remembered.
    part = tmp_path / "c" / "part0.txt"
    os.utime(part, ns=(time.time_ns(), time.time_ns() + 10**9))
    touched = prepare(tmp_path / "c", tmp_path / "cache")
    assert not touched.built
    assert touched.manifest["sources"][0]["mtime_ns"] == os.stat(part).st_mtime_ns
    # Edited, even with the same size and time: rebuilt.
    st = os.stat(part)
    part.write_text(PARTS[0].replace("speak", "SPEAK"), encoding="utf-8")
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    edited = prepare(tmp_path / "c", tmp_path / "cache")
    assert edited.built and edited.folder == first.folder
    assert "S" in edited.tokenizer.chars and "S" not in first.tokenizer.chars
    # Another tokenizer: an entry of its own; the first stays usable.
    bpe = prepare(tmp_path / "c", tmp_path / "cache", "bpe", 280)
    assert bpe.built and bpe.folder != first.folder
    assert not prepare(tmp_path / "c", tmp_path / "cache").built
    assert prepare(tmp_path / "c", tmp_path / "cache", "bpe", 290).built
    # A file added to the directory: rebuilt.
    (tmp_path / "c" / "part3.txt").write_text("more text\n" * 50)
    assert prepare(tmp_path / "c", tmp_path / "cache").built


def test_a_given_tokenizer_must_match_the_cache(tmp_path):
    text = write_corpus(tmp_path / "c")
    fitted = prepare(tmp_path / "c", tmp_path / "cache")
    # A resumed run's own tokenizer, the one the entry was fitted with: reused.
    same = prepare(tmp_path / "c", tmp_path / "cache", tokenizer=fitted.tokenizer,
                   prefer_fit=("char", 300))
    assert not same.built and same.folder == fitted.folder
    # Another one (a model trained elsewhere): an entry encoded with it.
    other = CharTokenizer.from_text(text + "XYZ")
    given = prepare(tmp_path / "c", tmp_path / "cache", tokenizer=other,
                    prefer_fit=("char", 300))
    assert given.built and given.tokenizer == other and given.folder != fitted.folder
    assert given.train.read().tolist() == other.encode(split(text)[0])
    # A given tokenizer that cannot represent the text is refused by name.
    with pytest.raises(femtogpt.TokenizerError, match="does not know"):
        prepare(tmp_path / "c", tmp_path / "cache", tokenizer=CharTokenizer("abc"))


def _entry_files(tokens):
    m = tokens.manifest
    return (os.path.join(tokens.folder, m["splits"]["train"]["file"]),
            os.path.join(tokens.folder, MANIFEST))


@pytest.mark.parametrize("damage", ["flip", "flip-keep-time", "truncate", "grow", "delete",
                                    "manifest-number", "manifest-garbage", "manifest-version"])
def test_a_damaged_cache_is_rebuilt_not_trusted(tmp_path, damage):
    write_corpus(tmp_path / "c")
    good = prepare(tmp_path / "c", tmp_path / "cache")
    good_ids = good.train.read().tolist()
    train_file, manifest = _entry_files(good)
    time.sleep(0.05)        # past the file system's clock tick: the edit gets a new time
    if damage.startswith("flip"):
        st = os.stat(train_file)
        with open(train_file, "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 1]))
        if damage == "flip-keep-time":
            # An edit that puts the old time back is not seen at a start (which
            # reads no token file whole), but verify finds it.
            os.utime(train_file, ns=(st.st_atime_ns, st.st_mtime_ns))
            assert main(["verify", good.folder]) == 1
            return
    elif damage == "truncate":
        os.truncate(train_file, os.path.getsize(train_file) - 2)
    elif damage == "grow":
        with open(train_file, "ab") as f:
            f.write(b"\0\0")
    elif damage == "delete":
        os.remove(train_file)
    else:
        m = json.load(open(manifest))
        if damage == "manifest-number":
            m["val_chars"] += 1
            json.dump(m, open(manifest, "w"))
        elif damage == "manifest-version":
            m["version"] = 999
            json.dump(m, open(manifest, "w"))
        else:
            open(manifest, "w").write('{"format": "femtogpt-token-cache", "vers')
    messages = []
    rebuilt = open_tokens(str(tmp_path / "c"), "char", cache_dir=str(tmp_path / "cache"),
                          log=messages.append, progress=False)
    assert rebuilt.built
    why = {"flip": "does not match its digest", "truncate": "bytes, not",
           "grow": "bytes, not", "delete": "is missing",
           "manifest-number": "does not match its digest",
           "manifest-garbage": "not a readable token cache manifest",
           "manifest-version": "another version of femtogpt"}[damage]
    assert why in messages[0], messages
    assert rebuilt.train.read().tolist() == good_ids
    # Only the new entry's files remain.
    assert visible(rebuilt.folder) == sorted(
        [MANIFEST, rebuilt.manifest["splits"]["train"]["file"],
         rebuilt.manifest["splits"]["val"]["file"]])


def test_a_source_that_changes_while_it_is_prepared_is_refused(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c")
    real = cache_build._encode_corpus

    def edit_then_encode(sources, *args):
        with open(sources[1].path, "r+b") as f:        # same size, new content
            f.seek(PARTS[1].encode().index(b","))
            f.write(b"X")
        return real(sources, *args)

    monkeypatch.setattr(cache_build, "_encode_corpus", edit_then_encode)
    with pytest.raises(DataError, match="part1.txt changed while it was being prepared"):
        prepare(tmp_path / "c", tmp_path / "cache")
    assert not os.path.exists(tmp_path / "cache") or not any(
        os.scandir(next(os.scandir(tmp_path / "cache")).path)
        if any(os.scandir(tmp_path / "cache")) else [])


def test_disk_full_while_writing_leaves_no_entry(tmp_path, monkeypatch):
    write_corpus(tmp_path / "c")
    prepare(tmp_path / "c", tmp_path / "cache")          # an entry that is then replaced
    (tmp_path / "c" / "part0.txt").write_text("changed\n" * 100)

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(token_files._IdWriter, "_flush", full)
    with pytest.raises(DataError, match="cannot write the token cache in .*: No space left"):
        prepare(tmp_path / "c", tmp_path / "cache")
    monkeypatch.undo()
    for entry in os.scandir(tmp_path / "cache"):
        assert not os.path.exists(os.path.join(entry.path, MANIFEST))
        assert [n for n in os.listdir(entry.path) if not n.startswith(".")] == []
    assert prepare(tmp_path / "c", tmp_path / "cache").built


def test_a_killed_preparation_leaves_nothing_a_later_run_uses(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    # Enough text (about 40 MB) that the kill lands while token files are written.
    line = "".join(PARTS) * 4
    with open(root / "big.txt", "w", encoding="utf-8") as f:
        for _ in range(40_000_000 // len(line.encode())):
            f.write(line)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(femtogpt.__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "femtogpt.app.cli", "prepare", "--data", str(root),
                             "--cache-dir", str(cache), "--no-progress"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=str(tmp_path))
    deadline = time.time() + 60
    while time.time() < deadline:
        temps = [n for _, _, files in os.walk(cache) for n in files if ".tmp-" in n]
        if temps:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert temps, "the preparation ended before it could be killed"
    entries = list(os.scandir(cache))
    assert len(entries) == 1 and not os.path.exists(os.path.join(entries[0].path, MANIFEST))
    messages = []
    tokens = open_tokens(str(root), "char", cache_dir=str(cache), log=messages.append,
                         progress=False)
    assert tokens.built and "tokenizing" in messages[0]
    assert visible(tokens.folder) == sorted(
        [MANIFEST, tokens.manifest["splits"]["train"]["file"],
         tokens.manifest["splits"]["val"]["file"]])


def test_bpe_learns_from_a_bounded_deterministic_sample_of_the_training_text(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(token_cache, "BPE_SAMPLE_BYTES", 4096)
    monkeypatch.setattr(token_cache, "BPE_SAMPLE_PIECES", 16)
    monkeypatch.setattr(corpus, "BLOCK_BYTES", 1024)
    # The validation text (the last 10%) is one word repeated: it must not
    # become a token, since the sample comes from the training text only.
    train_part = "".join(PARTS) * 3
    val_part = " zqxjv" * (len(train_part) // 9 // 6)
    write_corpus(tmp_path / "c", [train_part, val_part])
    a = prepare(tmp_path / "c", tmp_path / "a", "bpe", 300)
    b = prepare(tmp_path / "c", tmp_path / "b", "bpe", 300)
    assert a.tokenizer == b.tokenizer                    # deterministic
    learned = {a.tokenizer.token_bytes(i) for i in range(256, a.tokenizer.vocab_size)}
    assert not any(b"zq" in t or b"xj" in t for t in learned)
    assert all(t in train_part.encode() for t in learned)
    # The whole corpus is still encoded with it.
    text = train_part + val_part
    assert a.val.read().tolist() == a.tokenizer.encode(split(text)[1])


def test_a_token_file_changed_during_training_is_caught_not_read_out_of_range(tmp_path):
    write_corpus(tmp_path / "c")
    tokens = prepare(tmp_path / "c", tmp_path / "cache")
    windows = tokens.train.windows(np.array([0, 5]), 4)
    assert windows.tolist() == [tokens.train.read()[0:4].tolist(),
                                tokens.train.read()[5:9].tolist()]
    with open(tokens.train.path, "r+b") as f:
        f.write(np.array([60000], dtype=np.uint16).tobytes())
    with pytest.raises(DataError, match="was changed while training read it"):
        tokens.train.windows(np.array([0]), 4)


# ----------------------------------------------------------------------------- commands

def test_prepare_then_train_from_a_directory_reuses_the_cache(tmp_path, capsys):
    write_corpus(tmp_path / "c")
    out = tmp_path / "run"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
            "--batch-size", "4", "--max-iters", "4", "--eval-interval", "2", "--eval-iters",
            "2", "--sample-tokens", "0", "--threads", "1", "--no-progress"]
    assert main(["prepare", "--data", str(tmp_path / "c"), "--out", str(out),
                 "--no-progress"]) == 0
    said = capsys.readouterr()
    assert "(built)" in said.out and "tokenizing" in said.err
    assert main(["prepare", "--data", str(tmp_path / "c"), "--out", str(out)]) == 0
    assert "up to date, reused" in capsys.readouterr().out
    assert main(["train", "--data", str(tmp_path / "c"), "--out", str(out), *tiny]) == 0
    err = capsys.readouterr().err
    assert "tokenizing" not in err and "rebuilding" not in err
    assert "3 files" in err
    # The same run elsewhere, with a shared --cache-dir, then resumed: same numbers.
    shared = tmp_path / "shared"
    for name in ("a", "b"):
        assert main(["train", "--data", str(tmp_path / "c"), "--out", str(tmp_path / name),
                     "--cache-dir", str(shared), *tiny]) == 0
    err = capsys.readouterr().err
    assert err.count("tokenizing") == 1
    rows = [[json.loads(line)["val_loss"] for line in open(tmp_path / n / "metrics.jsonl")]
            for n in ("run", "a", "b")]
    assert rows[0] == rows[1] == rows[2]


def test_verify_checks_the_cache(tmp_path, capsys):
    write_corpus(tmp_path / "c")
    tokens = prepare(tmp_path / "c", tmp_path / "cache")
    assert main(["verify", str(tmp_path / "cache")]) == 0
    assert capsys.readouterr().out.startswith("intact")
    (tmp_path / "c" / "part2.txt").write_text("new text")
    assert main(["verify", str(tmp_path / "cache")]) == 0          # stale is not damage
    assert "stale" in capsys.readouterr().out
    train_file, _ = _entry_files(tokens)
    os.truncate(train_file, 10)
    assert main(["verify", tokens.folder]) == 1
    assert capsys.readouterr().out.startswith("DAMAGED")


def test_a_run_keeps_reading_its_tokens_while_another_rebuilds_the_entry(tmp_path):
    write_corpus(tmp_path / "c")
    first = prepare(tmp_path / "c", tmp_path / "cache")
    want = first.train.read()[:9].tolist()
    again = open_tokens(str(tmp_path / "c"), "char", cache_dir=str(tmp_path / "cache"),
                        log=quiet, progress=False, rebuild=True)
    assert again.built and not os.path.exists(first.train.path)     # replaced on disk...
    assert first.train.windows(np.array([0]), 9).tolist() == [want]  # ...still readable


def test_two_starts_at_once_build_the_entry_once(tmp_path):
    import threading
    write_corpus(tmp_path / "c")
    results = []

    def start():
        results.append(prepare(tmp_path / "c", tmp_path / "cache"))

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, False, True]
    assert len({r.manifest["splits"]["train"]["file"] for r in results}) == 1


def test_a_data_directory_that_holds_the_run_is_not_read_as_text(tmp_path, capsys):
    root = tmp_path / "project"
    write_corpus(root)
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
            "--batch-size", "4", "--eval-interval", "2", "--eval-iters", "2",
            "--sample-tokens", "0", "--threads", "1", "--no-progress"]
    out = root / "run"          # inside --data: its checkpoints and cache are not corpus
    assert main(["train", "--data", str(root), "--out", str(out), "--max-iters", "2", *tiny]) == 0
    assert main(["train", "--data", str(root), "--out", str(out), "--max-iters", "4", *tiny]) == 0
    err = capsys.readouterr().err
    assert err.count("tokenizing") == 1 and "3 files" in err
