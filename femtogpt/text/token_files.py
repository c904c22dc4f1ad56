"""The token cache's id files: written once by a build (_IdWriter: ids
appended under a temporary name, counted and digested as they go), then read
by training through memmaps (TokenFile), both splits and what they came from
held by a TokenData."""
from __future__ import annotations

import os

import numpy as np
import xxhash

from ..errors import DataError
from .registry import tokenizer_from_dict

_WRITE_BYTES = 8 << 20          # ids buffered before a write


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
