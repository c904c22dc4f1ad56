"""Tensor files: the safetensors format, written atomically, read as hostile input.

safetensors is an 8-byte little-endian header length, a JSON header (each
tensor's dtype, shape and byte range, plus a string-to-string "__metadata__"),
then the raw tensor bytes. Nothing in such a file can run code when it is
loaded. femtogpt's own data (config, tokenizer, step, RNG state...) is a JSON
string in "__metadata__" under "femtogpt", next to "format_version".

Digests (format version 2). safetensors carries no checksum, and disks,
copies and partial downloads do corrupt files: of 22 single-bit flips in a
version-1 checkpoint, 17 loaded without a word. Every file now carries, in
"__metadata__"["digest"], the xxh3-128 hash of each tensor's bytes and one of
the header itself (everything in it but that hash). xxh3 is a checksum, not a
signature: it catches damage (about 9 GB/s here, 0.2 s for GPT-2 124M's 1.5 GB
training state, against 1.5 s for SHA-256), not a forger who rewrites both.
Version-1 files still load, flagged as unverifiable; femtogpt never rewrites
them.

Writing streams each tensor's memory straight to a temporary file next to the
target (no copy of the tensors is made), fsyncs it and renames it over the
target, so a crash or a full disk leaves the previous file as it was.
Reading checks the whole header before it touches the data, then reads each
tensor into memory the caller chooses (a model's own parameter block, say)
in chunks, hashing as it reads: a damaged file costs a one-line
CheckpointError naming the file and the part, never a second copy of a large
model, another exception, a hang or a huge allocation.

This module writes files and reads tensors; the header's format and its
checks are tensorheader.py's.
"""
from __future__ import annotations

import json
import os

import numpy as np
import xxhash

from ..errors import CheckpointError
from .tensorheader import (  # noqa: F401 (MAX_HEADER_BYTES: the format's limit, handed on)
    _CHUNK_BYTES, _DTYPE_NAMES, _METADATA_KEY, DIGEST_ALGORITHM, FLOAT_KINDS, FORMAT_VERSION,
    MAX_HEADER_BYTES, _check_coverage, _check_header_digest, _check_version, _digest,
    _header_digest, _open, _parse_header, _parse_meta, _parse_tensor_entry, _read_header)

def _bytes_of(array: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array, without a copy."""
    return memoryview(array.reshape(-1).view(np.uint8))


# --------------------------------------------------------------------------- writing


def save_tensors(path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Write tensors and meta to path, replacing any previous file only once the
    new one is complete. The arrays are written from their own memory."""
    path = os.fspath(path)
    header_bytes, arrays = _layout_for_writing(path, tensors, meta)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory as the target, so that os.replace is a rename within one
    # filesystem and therefore atomic. Hidden, so it does not look like a checkpoint.
    temp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        _write_durably(temp, [header_bytes] + [_bytes_of(a) for a in arrays])
        os.replace(temp, path)
    except BaseException as err:
        # Whatever went wrong (including Ctrl-C), the old file is untouched;
        # don't leave a half-written temp file next to it.
        _remove_quietly(temp)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}") from None
        raise
    _fsync_directory(directory)


def _layout_for_writing(path: str, tensors, meta) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes (digests included) and the arrays to write after it, in order."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"could not write checkpoint {path}: tensors must be a dict, got {type(tensors).__name__}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"could not write checkpoint {path}: meta must be a dict, got {type(meta).__name__}")
    arrays = {name: _storable_array(path, name, value) for name, value in tensors.items()}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"could not write checkpoint {path}: metadata is not JSON-serialisable: {err}") from None
    header, offset = {}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": _DTYPE_NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    digest = {"algorithm": DIGEST_ALGORITHM,
              "tensors": {name: _digest(_bytes_of(a)) for name, a in arrays.items()}}
    # "format": "pt" is what Hugging Face's loaders ask of a safetensors file
    # (the tensors are PyTorch's layout); it lets them open ours too.
    header[_METADATA_KEY] = {"femtogpt": meta_json, "format_version": str(FORMAT_VERSION),
                             "format": "pt", "digest": json.dumps(digest)}
    digest["header"] = _header_digest(header)
    header[_METADATA_KEY]["digest"] = json.dumps(digest)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # safetensors pads the header with spaces so that the data starts 8-byte aligned.
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded, list(arrays.values())


def _storable_array(path: str, name, value) -> np.ndarray:
    """value as a C-contiguous little-endian array of a dtype safetensors can store
    (the array itself when it already is one: no copy)."""
    if not isinstance(name, str) or not name or name == _METADATA_KEY:
        raise CheckpointError(f"could not write checkpoint {path}: invalid tensor name {name!r}")
    if not isinstance(value, np.ndarray):
        raise CheckpointError(
            f"could not write checkpoint {path}: tensor {name!r} is a {type(value).__name__}, not a numpy array"
        )
    little = value.dtype.newbyteorder("<") if value.dtype.byteorder != "|" else value.dtype
    if little not in _DTYPE_NAMES:
        raise CheckpointError(f"could not write checkpoint {path}: tensor {name!r} has unsupported dtype {value.dtype}")
    # Not np.ascontiguousarray: it turns a 0-d array (a scalar) into shape (1,).
    return np.asarray(value, dtype=little, order="C")


def _write_durably(path: str, parts) -> None:
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
        f.flush()
        # Without fsync, a power cut after the rename could leave the *new*
        # name pointing at a file whose data never reached the disk.
        os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable.

    Best effort: the new file is already complete and in place, and some
    filesystems cannot fsync a directory; failing the save here would report an
    error for a checkpoint that was in fact written.
    """
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


# --------------------------------------------------------------------------- reading


class TensorFile:
    """An open tensor file whose header has been read and checked.

        with TensorFile(path) as f:
            f.meta                       # femtogpt's meta dict
            f.read_into("wte", view)     # straight into memory of the caller's
            f.read("step_counts")        # a new array

    `verified` is True when the file carries digests (format version 2): the
    header has then been checked against its digest, and each tensor is
    checked as it is read. Version-1 files have none to check.

    foreign=True also opens safetensors files that femtogpt did not write (a
    Hugging Face model.safetensors): their structure is checked as strictly,
    they carry no digest, and `meta` is their own "__metadata__" (or {}).
    """

    def __init__(self, path, foreign=False):
        self.path = path = os.fspath(path)
        self._fd = _open(path)
        try:
            header_bytes, self._data_start, data_len = _read_header(path, self._fd)
            header = _parse_header(path, header_bytes)
            metadata = header.pop(_METADATA_KEY, None)
            self.foreign = foreign and not (isinstance(metadata, dict) and "femtogpt" in metadata)
            if self.foreign:
                if metadata is not None and not (isinstance(metadata, dict) and all(
                        isinstance(v, str) for v in metadata.values())):
                    raise CheckpointError(f"safetensors metadata is not a string table; file "
                                          f"corrupt: {path}")
                self.version, self._digests, self.meta = None, None, dict(metadata or {})
            else:
                self.version = _check_version(path, metadata)
                self._digests = _check_header_digest(path, header, metadata, self.version)
                self.meta = _parse_meta(path, metadata)
            self.verified = self._digests is not None
            self._layout = {name: _parse_tensor_entry(path, name, entry)
                            for name, entry in header.items()}
            self._kinds = {name: entry["dtype"] for name, entry in header.items()}
            _check_coverage(path, self._layout, data_len)
            if self.verified and set(self._digests) != set(self._layout):
                raise CheckpointError(f"checkpoint digests do not list exactly its tensors; "
                                      f"file corrupt: {path}")
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def names(self) -> list[str]:
        """Tensor names, in the order of their bytes in the file."""
        return [name for name, _ in sorted(self._layout.items(), key=lambda item: item[1][2])]

    def shape(self, name) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name) -> np.dtype:
        return self._entry(name)[0].newbyteorder("=")

    def _entry(self, name):
        try:
            return self._layout[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name}") from None

    def read(self, name) -> np.ndarray:
        """The tensor as a new, writable array in native byte order."""
        if self.kind(name) == "BF16":
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype 'BF16' "
                                  f"for read() (numpy has no bfloat16; read_float32 "
                                  f"converts it)")
        return self._read_raw(name)

    def _read_raw(self, name) -> np.ndarray:
        out = np.empty(self.shape(name), dtype=self.dtype(name))
        self.read_into(name, out)
        return out

    def kind(self, name) -> str:
        """The tensor's safetensors dtype name (F32, F16, BF16, ...)."""
        self._entry(name)
        return self._kinds[name]

    def read_float32(self, name) -> np.ndarray:
        """A floating-point tensor (F32, F16, BF16 or F64) as a new float32 array."""
        kind = self.kind(name)
        if kind not in FLOAT_KINDS:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {kind}, not a "
                                  f"floating-point tensor")
        raw = self._read_raw(name)
        if kind == "BF16":
            return (raw.astype(np.uint32) << 16).view(np.float32)
        return raw if kind == "F32" else raw.astype(np.float32)

    def read_all(self) -> dict[str, np.ndarray]:
        return {name: self.read(name) for name in self.names}

    def read_into(self, name, out: np.ndarray) -> None:
        """Fill out (C-contiguous, the tensor's dtype and shape) with the tensor,
        checking its digest. On any error out may hold part of the data: read
        into memory that is discarded when loading fails."""
        dtype, shape, begin, end = self._entry(name)
        where = f"checkpoint tensor {name!r}"
        if out.shape != shape or out.dtype != dtype.newbyteorder("="):
            raise CheckpointError(f"{self.path}: {where} is {self._kinds[name]} {list(shape)}, "
                                  f"expected {out.dtype} {list(out.shape)}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("read_into needs a writable C-contiguous array")
        target = out if dtype == out.dtype else np.empty(shape, dtype=dtype)
        raw = _bytes_of(target)
        hasher = xxhash.xxh3_128()
        position = 0
        while position < len(raw):
            piece = raw[position:position + _CHUNK_BYTES]
            try:
                got = os.preadv(self._fd, [piece], self._data_start + begin + position)
            except OSError as err:
                raise CheckpointError(f"could not read checkpoint {self.path}: "
                                      f"{err.strerror or err}") from None
            if got <= 0:
                raise CheckpointError(f"checkpoint file is truncated (it changed while being "
                                      f"read?): {self.path}")
            hasher.update(piece[:got])
            position += got
        if self.verified and hasher.hexdigest() != self._digests[name]:
            raise CheckpointError(f"{where} does not match its digest: its data is damaged "
                                  f"(file corrupt): {self.path}")
        if dtype == np.bool_ and target.size and target.view(np.uint8).max() > 1:
            # Any other byte would make a numpy bool that is neither True nor False.
            raise CheckpointError(f"{where} has bool values other than 0 and 1: {self.path}")
        if target is not out:           # a big-endian machine: swap into place
            out[...] = target


def load_tensors(path) -> tuple[dict[str, np.ndarray], dict]:
    """Every tensor (writable arrays) and the meta dict of the file at path."""
    with TensorFile(path) as f:
        return f.read_all(), f.meta
