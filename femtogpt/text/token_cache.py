"""The token cache: a corpus tokenized once into memory-mapped files.

`femtogpt train` (and `femtogpt prepare`, which does only this) reads the
corpus (corpus.py) twice: a first pass counts its characters, fingerprints
every file and, for --tokenizer char, collects the vocabulary; a second pass
encodes it block by block, the training text (the first 90% of the
characters) into train-*.bin and the rest into val-*.bin, as uint16 ids when
the vocabulary fits, else uint32. Training then reads random windows of those
files through np.memmap, as nanoGPT reads OpenWebText, so that memory does not
grow with the corpus.

An entry lives in a folder of its own under --cache-dir (default: the run's
--out/cache), named by the sources and how the tokenizer is chosen. Its
manifest.json says what it holds: the sources (path, size, modification time,
xxh3-128 of the content), the tokenizer, the split, and each token file's
length, modification time and digest; the manifest carries a digest of
itself. An entry is used only if all of that still holds (a file whose size
or time changed is read whole against its digest); anything else (a changed source, another
tokenizer, a file cut short, edited or from another version) rebuilds it.
Writes are atomic: token files under temporary names, then the manifest by
rename, which is the moment the entry exists; a killed preparation leaves
only files that the next one removes.

This module is the way in (which entry, reused or built); the rest is by idea:
cache_manifest.py (the manifest and its checks), cache_build.py (the two
passes), token_files.py (the id files, written and memmapped) and
corpus_sample.py (the bounded sample a tokenizer learns from).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import xxhash

from . import corpus
from ..errors import DataError
from .cache_build import VAL_FRACTION, build
from .cache_manifest import (FORMAT, MANIFEST, VERSION, _check_token_file, _file_digest,
                             _write_manifest, check_entry, find_entries, read_manifest)
from .corpus_sample import sample_training_text
from .registry import tokenizer_from_dict
from .sentencepiece_tokenizer import (SP_SAMPLE_BYTES, SP_SAMPLE_PIECES, SP_TRAINED,
                                      SentencePieceTokenizer, is_model_path)
from .token_files import TokenData, TokenFile

__all__ = ["FORMAT", "MANIFEST", "VAL_FRACTION", "VERSION", "TokenData", "TokenFile", "build",
           "check_entry", "entry_folder", "find_entries", "open_tokens", "read_manifest"]

#: BPE learns its merges from at most this many bytes of the training text.
#: Pair counts settle well before: on scripts/corpus_bench.py's 1 GB corpus,
#: merges for 8192 tokens learned from 32 MB compress held-out text within
#: 0.03% of those from 64 MB (4 MB: 0.2% worse), and 32 MB takes 6 s to learn
#: (--sample-study). Smaller training texts are used whole.
BPE_SAMPLE_BYTES = 32 << 20
#: The sample is this many evenly spaced pieces, so that it sees the whole
#: corpus (every file of a directory, the start and the end of a long book).
BPE_SAMPLE_PIECES = 1024


# ----------------------------------------------------------------------------- keys

def _spec(kind, vocab_size, tokenizer):
    """How the tokenizer is chosen: fitted to the corpus (kind, and for bpe its
    size and sample), or given (its own digest)."""
    if tokenizer is not None:
        return {"given": _tokenizer_digest(tokenizer)}
    spec = {"fit": kind}
    if kind == "bpe":
        spec.update(vocab_size=int(vocab_size), sample_bytes=BPE_SAMPLE_BYTES,
                    sample_pieces=BPE_SAMPLE_PIECES)
    elif kind in SP_TRAINED:
        spec.update(vocab_size=int(vocab_size), sample_bytes=SP_SAMPLE_BYTES,
                    sample_pieces=SP_SAMPLE_PIECES)
    return spec


def _tokenizer_digest(tokenizer):
    return xxhash.xxh3_128_hexdigest(json.dumps(tokenizer.to_dict(), sort_keys=True).encode())


def entry_folder(root, data, spec):
    """An entry per --data (as given, made absolute) and way of choosing the
    tokenizer: a changed list of files rebuilds the same entry, so old ones do
    not pile up."""
    key = xxhash.xxh3_64_hexdigest(json.dumps([os.path.abspath(os.fspath(data)), spec],
                                              sort_keys=True).encode())
    return os.path.join(root, f"{spec.get('fit', 'given')}-{key}")


class _EntryLock:
    """An exclusive flock on an entry while it is checked and built, so that
    two runs starting at once on a shared --cache-dir build it once."""

    def __init__(self, folder):
        self.path = os.path.join(folder, ".lock")
        self.file = None

    def __enter__(self):
        import fcntl
        try:
            self.file = open(self.path, "a")
            fcntl.flock(self.file, fcntl.LOCK_EX)
        except OSError:
            self.file = None        # a file system without locks: go on without
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()       # (closing releases the lock)
        return False


# ----------------------------------------------------------------------------- the way in

def open_tokens(data, kind, vocab_size=None, tokenizer=None, cache_dir=None, log=print,
                progress=None, rebuild=False, prefer_fit=None, exclude=()):
    """The TokenData for --data with this tokenizer: reused from the cache when
    it is still right, else built (and logged).

    kind/vocab_size: the tokenizer to fit (char, byte, bpe, sentencepiece,
    sentencepiece-bpe), when tokenizer is None; a kind ending in .model is
    that SentencePiece model, given. tokenizer: a given one (a resumed run's,
    a GPT-2 model's). A resumed
    run passes both its tokenizer and prefer_fit=(kind, vocab_size): the entry
    its first start fitted is then reused if its tokenizer is the same.
    exclude: folders whose files are never part of the corpus (the run's --out).
    """
    if tokenizer is None and is_model_path(kind):
        tokenizer = SentencePieceTokenizer.from_file(kind)
    if prefer_fit is not None and is_model_path(prefer_fit[0]):
        prefer_fit = None       # a given model: its entry is the given one's
    root = os.path.abspath(cache_dir)
    # A --data directory that holds the run or the cache must not read them as text.
    sources = corpus.list_sources(data, exclude=[root] + list(exclude))
    if tokenizer is not None and prefer_fit is not None and not rebuild:
        folder = entry_folder(root, data, _spec(*prefer_fit, None))
        found, _ = _usable(folder, sources, None)
        if found is not None and _tokenizer_digest(found.tokenizer) == \
                _tokenizer_digest(tokenizer):
            return found
    spec = _spec(kind, vocab_size, tokenizer)
    folder = entry_folder(root, data, spec)
    made = not os.path.exists(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the token cache folder {folder}: "
                        f"{err.strerror or err}") from None
    try:
        with _EntryLock(folder):
            why = "asked to rebuild"
            if not rebuild:
                found, why = _usable(folder, sources, tokenizer)
                if found is not None:
                    return found
            if why:
                log(f"data: rebuilding the token cache in {folder}: {why}")
            else:
                log(f"data: tokenizing {corpus.describe(data, sources)} into {folder}")
            built = build(folder, sources, spec, kind, vocab_size, tokenizer, log, progress)
    except BaseException:
        if made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    built.built = True
    return built


def _usable(folder, sources, tokenizer):
    """(TokenData, None) if the entry in folder can be used as it is; else
    (None, why not), why being None when there is simply no entry yet."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None, None
    try:
        manifest = read_manifest(path)
    except DataError as err:
        return None, str(err)
    if [s["path"] for s in manifest["sources"]] != [s.path for s in sources]:
        return None, "the list of source files changed"
    refreshed = False
    for saved, src in zip(manifest["sources"], sources):
        if (saved["size"], saved["mtime_ns"]) == (src.size, src.mtime_ns):
            continue
        # Touched or edited: only the content decides.
        if saved["size"] != src.size or _file_digest(src.path) != saved["digest"]:
            return None, f"{src.path} changed"
        saved["mtime_ns"] = src.mtime_ns
        refreshed = True
    if tokenizer is not None and _tokenizer_digest(
            tokenizer_from_dict(manifest["tokenizer"])) != _tokenizer_digest(tokenizer):
        return None, "it was made with another tokenizer"
    for split in ("train", "val"):
        info = manifest["splits"][split]
        file = os.path.join(folder, info["file"])
        problem, read_again = _check_token_file(file, info, np.dtype(manifest["dtype"]).itemsize)
        if problem:
            return None, problem
        refreshed |= read_again
    if refreshed:
        try:
            _write_manifest(folder, manifest)
        except OSError:
            pass            # a read-only cache: checked again next time, still right
    return TokenData(folder, manifest), None


def _bpe_sample(sources, blocks, train_chars):
    """The text BPE learns from, by this module's BPE_SAMPLE_BYTES and
    BPE_SAMPLE_PIECES (scripts/corpus_bench.py --sample-study sets them)."""
    return sample_training_text(sources, blocks, train_chars, BPE_SAMPLE_BYTES,
                                BPE_SAMPLE_PIECES)
