"""The training text as a stream: --data as a file, a directory or a glob, read
block by block, never whole.

The corpus is the concatenation of its files in order (a directory's files
sorted by their path inside it, hidden ones skipped; a glob's matches sorted),
each without its byte order mark. Every block handed out is whole UTF-8
characters: a character cut by a block edge waits for the next block. A file
that is not UTF-8 text is named with the byte offset of the first bad byte;
a file that changes while it is read is refused, since the tokens would then
describe no version of it.

The split is by characters, as for a single file: the last val_fraction of the
concatenation's characters are the validation text.
"""
from __future__ import annotations

import codecs
import glob
import os
from dataclasses import dataclass

import xxhash

from .textfile import _UTF16_BOMS, _UTF8_BOM
from ..errors import DataError

# Bytes read at a time: big enough that per-block costs vanish, small enough
# that a block and its ids stay far below the memory budget.
BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class Source:
    """One file of the corpus, as it was when it was listed."""
    path: str           # absolute
    size: int           # bytes on disk, byte order mark included
    mtime_ns: int

    def changed(self) -> bool:
        """Whether the file on disk is no longer this size and modification time."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        return (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns)

    def record(self) -> dict:
        return {"path": self.path, "size": self.size, "mtime_ns": self.mtime_ns}


def _source(path: str) -> Source:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except OSError as err:
        raise DataError(f"cannot read data file {path}: {err.strerror or err}") from None
    return Source(os.path.abspath(path), st.st_size, st.st_mtime_ns)


def list_sources(data, exclude=()) -> list[Source]:
    """The files --data names, in corpus order. A file is itself; a directory
    gives every file below it that is not hidden (nor inside a hidden
    directory), sorted by path; anything else with *, ? or [ is a glob (** for
    any depth), its files sorted. Files inside an `exclude` folder (the run's
    own folder and the token cache) are never part of a directory or glob."""
    name = os.fspath(data)
    skip = [os.path.join(os.path.realpath(e), "") for e in exclude]

    def wanted(path):
        real = os.path.realpath(path)
        return os.path.isfile(real) and not any(real.startswith(s) for s in skip)

    if os.path.isdir(name):
        paths = []
        for root, dirs, files in os.walk(name, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(root, f) for f in files if not f.startswith(".")]
        paths = sorted(p for p in paths if wanted(p))
        if not paths:
            raise DataError(f"--data directory {name} holds no files")
    elif not os.path.exists(name) and glob.has_magic(name):
        paths = sorted(p for p in glob.glob(name, recursive=True) if wanted(p))
        if not paths:
            raise DataError(f"--data {name} matches no files")
    else:
        if os.path.exists(name) and not os.path.isfile(name):
            raise DataError(f"data file is not a regular file: {name}")
        paths = [name]
    sources = [_source(p) for p in paths]
    if not any(s.size for s in sources):
        if len(sources) == 1:
            raise DataError(f"data file is empty: {sources[0].path}")
        raise DataError(f"every file of --data {name} is empty")
    return sources


def describe(data, sources) -> str:
    """How a log line names the corpus."""
    if len(sources) == 1:
        return sources[0].path
    total = sum(s.size for s in sources)
    return f"{os.fspath(data)} ({len(sources):,} files, {total / 1e6:,.1f} MB)"


@dataclass
class Block:
    """Whole characters of one file: data is their UTF-8, text the same decoded
    (None when read without decoding), chars how many there are."""
    source: int         # index in the source list
    offset: int         # byte offset of data in the file
    data: bytes
    text: str | None
    chars: int


def read_blocks(sources, block_bytes: int | None = None, digests=None, progress=None,
                decode=True):
    """Yield every file's text as Blocks, in corpus order, checking as it goes.

    decode=False: the blocks carry bytes and character counts only (a second
    pass over text the first pass checked: it still cuts blocks between
    characters, fingerprints the files and notices changes, but trusts the
    bytes to be UTF-8).

    digests: a list that receives each file's xxh3-128 hex digest (of its raw
    bytes) once the file is read whole. progress(n): called with the bytes read.
    Raises DataError for a file that is unreadable, binary, UTF-16, not UTF-8
    (with the offset of the first bad byte), or that changed while being read.
    """
    block_bytes = block_bytes or BLOCK_BYTES
    for index, src in enumerate(sources):
        read = _read_file if decode else _read_file_bytes
        yield from read(index, src, block_bytes, digests, progress)


def _reads(src, block_bytes, hasher, progress):
    """(file offset, bytes) of each read of a file, the byte order mark taken
    off the first; the last read is empty. Every byte read goes to hasher."""
    try:
        f = open(src.path, "rb")
    except OSError as err:
        raise DataError(f"cannot read data file {src.path}: {err.strerror or err}") from None
    offset = 0
    with f:
        while True:
            try:
                # (the first read takes at least the 3 bytes of a byte order mark)
                raw = f.read(block_bytes if offset else max(block_bytes, 4))
            except OSError as err:
                raise DataError(f"cannot read data file {src.path}: "
                                f"{err.strerror or err}") from None
            hasher.update(raw)
            if offset == 0 and raw:
                if raw.startswith(_UTF16_BOMS):
                    raise DataError(f"data file is UTF-16 text; convert it to UTF-8 first: "
                                    f"{src.path}")
                if raw.startswith(_UTF8_BOM):
                    raw, offset = raw[len(_UTF8_BOM):], len(_UTF8_BOM)
            yield offset, raw
            if not raw:
                return
            offset += len(raw)
            if progress is not None:
                progress(len(raw))


def _read_file(index, src, block_bytes, digests, progress):
    hasher = xxhash.xxh3_128()
    decoder = codecs.getincrementaldecoder("utf-8")()
    start = None        # file offset of the first byte not yet handed out
    pending = b""       # bytes of a character cut by the block edge
    end = 0
    for offset, raw in _reads(src, block_bytes, hasher, progress):
        start = offset if start is None else start
        nul = raw.find(b"\x00")
        if nul >= 0:
            raise DataError(f"data file looks binary (NUL byte at byte offset "
                            f"{offset + nul}), not UTF-8 text: {src.path}")
        try:
            text = decoder.decode(raw, not raw)
        except UnicodeDecodeError as err:
            bad = offset - len(pending) + err.start
            value = (pending + raw)[err.start]
            raise DataError(f"data file is not UTF-8 text: invalid byte 0x{value:02x} at "
                            f"byte offset {bad}: {src.path}") from None
        whole = pending + raw
        pending = decoder.getstate()[0]
        data = whole[:len(whole) - len(pending)] if pending else whole
        if data:
            yield Block(index, start, data, text, len(text))
            start += len(data)
        end = offset + len(raw)
    _check_unchanged(src, end, digests, hasher)


def _check_unchanged(src, offset, digests, hasher):
    if offset != src.size or src.changed():
        raise DataError(f"{src.path} changed while it was being read (it was {src.size:,} "
                        f"bytes, {offset:,} were read); run again once it no longer changes")
    if digests is not None:
        digests.append(hasher.hexdigest())


def _read_file_bytes(index, src, block_bytes, digests, progress):
    from ._native import count_chars
    hasher = xxhash.xxh3_128()
    start = None
    pending = b""
    end = 0
    for offset, raw in _reads(src, block_bytes, hasher, progress):
        start = offset if start is None else start
        whole = pending + raw if pending else raw
        cut = len(whole) if not raw else _whole_characters(whole)
        data, pending = whole[:cut], whole[cut:]
        if data:
            yield Block(index, start, data, None, count_chars(data))
            start += len(data)
        end = offset + len(raw)
    _check_unchanged(src, end, digests, hasher)


def _whole_characters(data: bytes) -> int:
    """How many leading bytes of data are whole UTF-8 characters."""
    n = len(data)
    i = n - 1
    while i >= 0 and n - i <= 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0 or n - i > 4:
        return n            # not UTF-8 here: the first pass would have refused it
    lead = data[i]
    need = 1 if lead < 0x80 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return n if n - i >= need else i
