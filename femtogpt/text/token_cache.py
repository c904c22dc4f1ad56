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
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time

import numpy as np
import xxhash

from . import corpus
from ._native import char_offset, mark_code_points
from ..errors import DataError, FemtoGPTError, TokenizerError
from .bpe import BPETokenizer
from .char import CharTokenizer
from .registry import build_tokenizer, tokenizer_from_dict
from .tokenizer import MAX_CHAR_VOCAB

FORMAT = "femtogpt-token-cache"
VERSION = 2
MANIFEST = "manifest.json"
VAL_FRACTION = 0.1

#: BPE learns its merges from at most this many bytes of the training text.
#: Pair counts settle well before: on scripts/corpus_bench.py's 1 GB corpus,
#: merges for 8192 tokens learned from 32 MB compress held-out text within
#: 0.03% of those from 64 MB (4 MB: 0.2% worse), and 32 MB takes 6 s to learn
#: (--sample-study). Smaller training texts are used whole.
BPE_SAMPLE_BYTES = 32 << 20
#: The sample is this many evenly spaced pieces, so that it sees the whole
#: corpus (every file of a directory, the start and the end of a long book).
BPE_SAMPLE_PIECES = 1024

_WRITE_BYTES = 8 << 20          # ids buffered before a write
_CHECK_BYTES = 16 << 20         # bytes read at a time to check a digest


class TokenFile:
    """One split's ids on disk: len() is the number of ids; windows() reads a
    batch of them through a memmap opened for that read alone (its pages are
    then the page cache's, not this process's: memory stays flat)."""

    def __init__(self, path, n_tokens, dtype, vocab_size):
        self.path, self.n_tokens = path, int(n_tokens)
        self.dtype, self.vocab_size = np.dtype(dtype), int(vocab_size)
        # Held open: another run that rebuilds a shared cache replaces this
        # file, but the one this run opened stays readable until it ends.
        try:
            self._file = open(path, "rb")
        except OSError as err:
            raise DataError(f"cannot open the token file {path}: "
                            f"{err.strerror or err}") from None

    def __len__(self):
        return self.n_tokens

    def windows(self, starts, width):
        """(len(starts), width) int64: the ids from each start on."""
        ids = np.memmap(self._file, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        try:
            out = ids[np.asarray(starts)[:, None] + np.arange(width)[None, :]].astype(np.int64)
        finally:
            del ids
        if out.size and int(out.max()) >= self.vocab_size:
            raise DataError(f"{self.path} was changed while training read it (it holds id "
                            f"{int(out.max())}, the vocabulary has {self.vocab_size}); run "
                            f"again to rebuild the token cache")
        return out

    def read(self):
        """Every id, in memory (for tests and small corpora)."""
        self._file.seek(0)
        return np.fromfile(self._file, dtype=self.dtype, count=self.n_tokens)


class TokenData:
    """A usable cache entry: the tokenizer, both splits and what they came from."""

    def __init__(self, folder, manifest):
        self.folder, self.manifest = folder, manifest
        self.tokenizer = tokenizer_from_dict(manifest["tokenizer"])
        dtype = manifest["dtype"]
        V = self.tokenizer.vocab_size
        self.train = TokenFile(os.path.join(folder, manifest["splits"]["train"]["file"]),
                               manifest["splits"]["train"]["tokens"], dtype, V)
        self.val = TokenFile(os.path.join(folder, manifest["splits"]["val"]["file"]),
                             manifest["splits"]["val"]["tokens"], dtype, V)
        self.chars = manifest["chars"]
        self.val_chars = manifest["val_chars"]
        self.sources = manifest["sources"]
        self.built = False      # True when this call built it (not reused)

    @property
    def digest(self):
        """One fingerprint of the corpus content (every source's digest, in order)."""
        h = xxhash.xxh3_128()
        for s in self.sources:
            h.update(s["digest"].encode())
        return h.hexdigest()


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

    kind/vocab_size: the tokenizer to fit (char, byte, bpe), when tokenizer is
    None. tokenizer: a given one (a resumed run's, a GPT-2 model's). A resumed
    run passes both its tokenizer and prefer_fit=(kind, vocab_size): the entry
    its first start fitted is then reused if its tokenizer is the same.
    exclude: folders whose files are never part of the corpus (the run's --out).
    """
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


def _check_token_file(file, info, itemsize, full=False):
    """(problem or None, whether it was read whole and its new time recorded).

    A start must not read the whole cache (20 GB for a 10 GB corpus): a token
    file whose size and modification time are those recorded is taken as
    written, as for the sources; any other is read against its digest (a
    touched file is then kept). full=True (femtogpt verify) always reads it.
    Training still checks every id it reads against the vocabulary."""
    try:
        st = os.stat(file)
    except OSError:
        return f"{os.path.basename(file)} is missing", False
    if st.st_size != info["tokens"] * itemsize:
        return (f"{os.path.basename(file)} is {st.st_size:,} bytes, not "
                f"{info['tokens'] * itemsize:,}"), False
    if not full and st.st_mtime_ns == info["mtime_ns"]:
        return None, False
    if _file_digest(file, xxhash.xxh3_128) != info["digest"]:
        return f"{os.path.basename(file)} does not match its digest (damaged or edited)", False
    info["mtime_ns"] = st.st_mtime_ns
    return None, True


def _file_digest(path, algorithm=xxhash.xxh3_128):
    h = algorithm()
    buf = bytearray(_CHECK_BYTES)
    view = memoryview(buf)
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                h.update(view[:n])
    except OSError:
        return None
    return h.hexdigest()


def find_entries(path):
    """The cache entry folders at path: an entry itself, a --cache-dir, or a run
    folder (its cache/)."""
    found = []
    for pattern in ("", "*", os.path.join("cache", "*")):
        found += [os.path.dirname(m) for m in
                  glob.glob(os.path.join(glob.escape(path), pattern, MANIFEST))]
    return sorted(set(found))


def check_entry(folder):
    """(ok, stale, detail) for one entry: ok False if it is damaged (it would be
    rebuilt); stale if a source changed since (the next run rebuilds it)."""
    try:
        manifest = read_manifest(os.path.join(folder, MANIFEST))
    except DataError as err:
        return False, False, str(err)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split in ("train", "val"):
        problem, _ = _check_token_file(os.path.join(folder, manifest["splits"][split]["file"]),
                                       manifest["splits"][split], itemsize, full=True)
        if problem:
            return False, False, problem
    n = sum(manifest["splits"][s]["tokens"] for s in ("train", "val"))
    kind = manifest["tokenizer"]["type"]
    detail = (f"{len(manifest['sources']):,} source file(s), {manifest['chars']:,} characters, "
              f"{n:,} {kind} tokens; every digest matches")
    for saved in manifest["sources"]:
        src = corpus.Source(saved["path"], saved["size"], saved["mtime_ns"])
        if src.changed() and (not os.path.exists(src.path) or _file_digest(src.path)
                              != saved["digest"]):
            return True, True, f"{detail}, but {src.path} has changed since (the next run " \
                               f"rebuilds it)"
    return True, False, detail


# ----------------------------------------------------------------------------- the manifest

_MANIFEST_KEYS = {"format", "version", "spec", "sources", "chars", "train_chars", "val_chars",
                  "val_fraction", "tokenizer", "dtype", "splits", "femtogpt", "digest"}


def _manifest_digest(manifest):
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return xxhash.xxh3_128_hexdigest(json.dumps(body, sort_keys=True).encode())


def read_manifest(path):
    """The manifest at path, checked; DataError naming what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 << 20)
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise DataError(f"{path} is not a readable token cache manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a femtogpt token cache manifest")
    if manifest.get("version") != VERSION:
        raise DataError(f"{path} is from another version of femtogpt (token cache version "
                        f"{manifest.get('version')!r}, this one reads {VERSION})")
    if set(manifest) != _MANIFEST_KEYS or manifest["digest"] != _manifest_digest(manifest):
        raise DataError(f"{path} does not match its digest (damaged or edited)")
    try:
        tokenizer_from_dict(manifest["tokenizer"])
        assert np.dtype(manifest["dtype"]) in (np.uint8, np.uint16, np.uint32)
        for split in ("train", "val"):
            info = manifest["splits"][split]
            assert isinstance(info["tokens"], int) and info["tokens"] >= 0
            assert os.path.basename(info["file"]) == info["file"]
            assert isinstance(info["digest"], str) and isinstance(info["mtime_ns"], int)
        for s in manifest["sources"]:
            assert {"path", "size", "mtime_ns", "digest"} == set(s)
    except (FemtoGPTError, AssertionError, KeyError, TypeError, ValueError):
        raise DataError(f"{path} is not a valid token cache manifest") from None
    return manifest


def _write_manifest(folder, manifest):
    manifest["digest"] = _manifest_digest(manifest)
    tmp = os.path.join(folder, f".{MANIFEST}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


# ----------------------------------------------------------------------------- building

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
        elif kind == "bpe":
            t = time.perf_counter()
            sample = _bpe_sample(sources, blocks, train_chars)
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


class _IdWriter:
    """Ids appended to a temporary file, with their count and digest."""

    def __init__(self, path, dtype):
        self.path, self.dtype = path, dtype
        self.tmp = os.path.join(os.path.dirname(path),
                                f".{os.path.basename(path)}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.hash = xxhash.xxh3_128()
        self.count = 0
        self.pending, self.pending_bytes = [], 0

    def write(self, ids):
        if len(ids) == 0:
            return
        chunk = np.ascontiguousarray(ids, dtype=self.dtype)
        self.pending.append(chunk)
        self.pending_bytes += chunk.nbytes
        if self.pending_bytes >= _WRITE_BYTES:
            self._flush()

    def _flush(self):
        for chunk in self.pending:
            data = memoryview(chunk).cast("B")
            self.hash.update(data)
            self.file.write(data)
            self.count += len(chunk)
        self.pending, self.pending_bytes = [], 0

    def close(self):
        self._flush()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"tokens": self.count, "digest": self.hash.hexdigest(),
                "mtime_ns": os.stat(self.path).st_mtime_ns}

    def discard(self):
        try:
            self.file.close()
        except OSError:
            pass
        for path in (self.tmp, self.path):
            try:
                os.remove(path)
            except OSError:
                pass


def _encode_corpus(sources, tokenizer, train_chars, writers, digests, bar):
    """Pass 2: every block's ids to the train writer, then (from character
    train_chars on) to the val writer; each split is a whole text of its own.
    The first pass checked the text, so this one reads bytes only."""
    from .bulk_encode import BPEStream
    streaming = isinstance(tokenizer, BPETokenizer)
    stream = BPEStream(tokenizer) if streaming else None
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
                    stream = BPEStream(tokenizer)
                split = part_split
            if not data:
                continue
            if streaming:
                writers[split].write(stream.feed(data))
            else:
                writers[split].write(tokenizer.encode_utf8(data, what="training text"))
    if streaming:
        writers[split].write(stream.finish())


def _bpe_sample(sources, blocks, train_chars):
    """The text BPE learns from: the training text itself when it is at most
    BPE_SAMPLE_BYTES, else BPE_SAMPLE_PIECES evenly spaced pieces of it, each
    cut to whole lines. Deterministic: the same corpus gives the same sample,
    and so the same merges.

    blocks: pass 1's (first character, characters, source, offset, bytes).
    """
    approx = sum(n for start, _, _, _, n in blocks if start < train_chars)
    if approx <= BPE_SAMPLE_BYTES:
        text, got = [], 0
        for block in corpus.read_blocks(sources):
            take = block.text[:train_chars - got]
            text.append(take)
            got += len(take)
            if got >= train_chars:
                break
        return "".join(text)
    # Blocks wholly inside the training text (the one the split cuts is left out).
    inside = [(source, offset, n) for start, chars, source, offset, n in blocks
              if start + chars <= train_chars]
    starts = np.cumsum([0] + [n for _, _, n in inside])
    train_bytes = int(starts[-1])
    piece = BPE_SAMPLE_BYTES // BPE_SAMPLE_PIECES
    pieces, handles = [], {}
    try:
        for i in range(BPE_SAMPLE_PIECES):
            at = (train_bytes - piece) * i // (BPE_SAMPLE_PIECES - 1)
            b = int(np.searchsorted(starts, at, side="right") - 1)
            source, offset, n = inside[b]
            within = at - int(starts[b])
            f = handles.get(source)
            if f is None:
                f = handles[source] = open(sources[source].path, "rb")
            f.seek(offset + within)
            raw = f.read(min(piece, n - within))
            # Whole lines where the piece has them; else whole characters.
            first, last = raw.find(b"\n"), raw.rfind(b"\n")
            if 0 <= first < last:
                raw = raw[first + 1:last + 1]
            pieces.append(raw.decode("utf-8", errors="ignore"))
    except OSError as err:
        raise DataError(f"cannot read the corpus to sample it: {err.strerror or err}") from None
    finally:
        for f in handles.values():
            f.close()
    return "".join(pieces)
