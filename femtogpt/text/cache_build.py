"""Building a token cache entry: pass 1 reads the corpus (characters,
fingerprints, the char vocabulary), the tokenizer is fitted (BPE from a
bounded sample, corpus_sample.py), pass 2 encodes block by block into the two
splits' id files, and the manifest is written last, by rename: the moment
the entry exists. A build that fails leaves no entry."""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from . import corpus
from ._native import char_offset, mark_code_points
from ..errors import DataError, TokenizerError
from .bpe import BPETokenizer
from .cache_manifest import FORMAT, MANIFEST, VERSION, _write_manifest
from .char import CharTokenizer
from .corpus_sample import sample_training_text
from .registry import build_tokenizer
from .sentencepiece_tokenizer import SP_TRAINED, SentencePieceTokenizer
from .token_files import TokenData, _IdWriter
from .tokenizer import MAX_CHAR_VOCAB

VAL_FRACTION = 0.1


class _Bar:
    """A bytes progress bar (tqdm) for one pass over the corpus."""

    def __init__(self, progress, total, desc):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        file=sys.stderr, dynamic_ncols=True, leave=False,
                        disable=None if progress is None else not progress)

    def __call__(self, n):
        self.bar.update(n)

    def close(self):
        self.bar.close()


def build(folder, sources, spec, kind, vocab_size, tokenizer, log=print, progress=None):
    """Tokenize the corpus into folder (made by open_tokens) and return its
    TokenData. A build that fails leaves no entry."""
    # What was here is being replaced: a build that fails leaves no entry.
    try:
        os.remove(os.path.join(folder, MANIFEST))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise DataError(f"cannot replace the token cache in {folder}: "
                        f"{err.strerror or err}") from None
    _remove_leftovers(folder)
    t0 = time.perf_counter()
    total = sum(s.size for s in sources)

    # Pass 1: characters, fingerprints, and the char vocabulary.
    digests, chars, blocks = [], 0, []
    seen = np.zeros(0x110000, dtype=np.uint8) if tokenizer is None and kind == "char" \
        else None
    bar = _Bar(progress, total, "reading")
    try:
        for block in corpus.read_blocks(sources, digests=digests, progress=bar):
            blocks.append((chars, block.chars, block.source, block.offset, len(block.data)))
            chars += block.chars
            if seen is not None:
                mark_code_points(np.frombuffer(block.data, np.uint8), seen)
    finally:
        bar.close()
    if chars == 0:
        raise DataError("the training text is empty")
    train_chars = int(chars * (1.0 - VAL_FRACTION))

    fitted = tokenizer is None
    if fitted:
        if kind == "char":
            found = np.flatnonzero(seen)
            if len(found) > MAX_CHAR_VOCAB:
                raise TokenizerError(f"the text has {len(found)} distinct characters, more "
                                     f"than the character tokenizer's limit of "
                                     f"{MAX_CHAR_VOCAB}; use --tokenizer byte or bpe")
            tokenizer = CharTokenizer("".join(map(chr, found.tolist())))
        elif kind in SP_TRAINED:
            t = time.perf_counter()
            sample = sample_training_text(sources, blocks, train_chars, spec["sample_bytes"],
                                          spec["sample_pieces"])
            tokenizer = build_tokenizer(kind, sample, vocab_size)
            log(f"data: trained a SentencePiece {tokenizer.info.model_type} model of "
                f"{tokenizer.vocab_size:,} pieces on {len(sample.encode('utf-8')) / 1e6:,.1f} "
                f"MB of the training text in {time.perf_counter() - t:.1f}s")
        elif kind == "bpe":
            t = time.perf_counter()
            sample = sample_training_text(sources, blocks, train_chars, spec["sample_bytes"],
                                          spec["sample_pieces"])
            tokenizer = BPETokenizer.train(sample, vocab_size)
            log(f"data: learned {tokenizer.vocab_size - 256} BPE merges from "
                f"{len(sample.encode('utf-8')) / 1e6:,.1f} MB of the training text in "
                f"{time.perf_counter() - t:.1f}s")
        else:
            tokenizer = build_tokenizer(kind, "")
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)

    # Pass 2: encode, the training text then the validation text.
    build_id = f"{os.getpid()}-{time.time_ns() % 10**12}"
    names = {split: f"{split}-{build_id}.bin" for split in ("train", "val")}
    writers = {split: _IdWriter(os.path.join(folder, names[split]), dtype)
               for split in names}
    digests_again = []
    bar = _Bar(progress, total, "tokenizing")
    try:
        _encode_corpus(sources, tokenizer, train_chars, writers, digests_again, bar)
        splits = {split: w.close() for split, w in writers.items()}
    except OSError as err:
        for w in writers.values():
            w.discard()
        raise DataError(f"cannot write the token cache in {folder}: "
                        f"{err.strerror or err}") from None
    except TokenizerError:
        for w in writers.values():
            w.discard()
        # A character the vocabulary fitted in pass 1 does not know: the file
        # changed in between, which is the error to report.
        changed = [s.path for s in sources if s.changed()]
        if fitted and changed:
            raise DataError(f"{changed[0]} changed while it was being prepared; run again "
                            f"once it no longer changes") from None
        raise
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        bar.close()
    if digests_again != digests:
        for w in writers.values():
            w.discard()
        changed = next(s.path for s, a, b in zip(sources, digests, digests_again) if a != b)
        raise DataError(f"{changed} changed while it was being prepared; run again once it "
                        f"no longer changes")
    for split, info in splits.items():
        info["file"] = names[split]
    from .. import __version__
    manifest = {
        "format": FORMAT, "version": VERSION, "spec": spec,
        "sources": [dict(s.record(), digest=d) for s, d in zip(sources, digests)],
        "chars": chars, "train_chars": train_chars, "val_chars": chars - train_chars,
        "val_fraction": VAL_FRACTION, "tokenizer": tokenizer.to_dict(), "dtype": dtype.name,
        "splits": splits, "femtogpt": __version__, "digest": "",
    }
    try:
        _write_manifest(folder, manifest)
    except OSError as err:
        for w in writers.values():
            w.discard()
        raise DataError(f"cannot write the token cache in {folder}: "
                        f"{err.strerror or err}") from None
    _remove_leftovers(folder, keep=set(names.values()))
    n = splits["train"]["tokens"] + splits["val"]["tokens"]
    log(f"data: {chars:,} characters, {n:,} tokens ({tokenizer.kind}, vocab "
        f"{tokenizer.vocab_size:,}) in {time.perf_counter() - t0:.1f}s "
        f"({total / 1e6 / max(1e-9, time.perf_counter() - t0):,.1f} MB/s)")
    return TokenData(folder, manifest)


def _remove_leftovers(folder, keep=()):
    """Token files other than keep, and temporary files of builds that died."""
    for name in os.listdir(folder):
        if name.startswith(".") and ".tmp-" in name:
            stale = not _alive(name)
        else:
            stale = name.endswith(".bin") and name.startswith(("train-", "val-")) \
                and name not in keep
        if stale:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def _alive(tmp_name):
    """Whether the process that writes a temporary file is still running."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-")[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def _encode_corpus(sources, tokenizer, train_chars, writers, digests, bar):
    """Pass 2: every block's ids to the train writer, then (from character
    train_chars on) to the val writer; each split is a whole text of its own.
    The first pass checked the text, so this one reads bytes only."""
    new_stream = _stream_maker(tokenizer)
    streaming = new_stream is not None
    stream = new_stream() if streaming else None
    split, chars = "train", 0
    for block in corpus.read_blocks(sources, digests=digests, progress=bar, decode=False):
        parts = [(split, block.data)]
        if split == "train" and chars + block.chars > train_chars:
            n = char_offset(np.frombuffer(block.data, np.uint8), train_chars - chars)
            parts = [("train", block.data[:n]), ("val", block.data[n:])]
        chars += block.chars
        for part_split, data in parts:
            if part_split != split:
                if streaming:
                    writers[split].write(stream.finish())
                    stream = new_stream()
                split = part_split
            if not data:
                continue
            if streaming:
                writers[split].write(stream.feed(data))
            else:
                writers[split].write(tokenizer.encode_utf8(data, what="training text"))
    if streaming:
        writers[split].write(stream.finish())


def _stream_maker(tokenizer):
    """What encodes a split block by block for a tokenizer whose ids depend on
    the text around a block edge (BPE, SentencePiece); None for char and byte,
    whose blocks encode on their own."""
    if isinstance(tokenizer, BPETokenizer):
        from .bulk_encode import BPEStream
        return lambda: BPEStream(tokenizer)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return tokenizer.stream
    return None
