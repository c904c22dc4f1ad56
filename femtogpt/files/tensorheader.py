"""The tensor file format: its constants, digests and dtypes, and reading
and checking a header as hostile input (tensorfile.py has the whole story).

Every check here runs before a single tensor byte is read: the header's
length, its JSON (no duplicate keys, bounded depth), the format version, the
header's digest, each tensor's dtype, shape and byte range, and that the
ranges cover the data exactly. A failure is one CheckpointError naming the
file and the part.
"""
from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import xxhash

from ..errors import CheckpointError

FORMAT_VERSION = 2               # written
READABLE_VERSIONS = (1, 2)       # 1: before digests
DIGEST_ALGORITHM = "xxh3_128"

# The safetensors library's own bound. A femtogpt header is a few KB; this
# only stops a corrupt length from making us read or parse a huge "header".
MAX_HEADER_BYTES = 100_000_000

# numpy allows at most 64 dimensions; real tensors have at most a handful.
_MAX_NDIM = 32

# Tensor bytes are read and hashed in pieces this large.
_CHUNK_BYTES = 1 << 24

# safetensors dtype names and the little-endian numpy dtype each one means.
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# bfloat16 (Hugging Face files): numpy has no such type, so its raw 16-bit words
# are read as uint16 and widened by read_float32 (a bfloat16 is the top half of
# a float32).
_DTYPES["BF16"] = np.dtype("<u2")
FLOAT_KINDS = ("F32", "F16", "BF16", "F64")   # what read_float32 reads

_METADATA_KEY = "__metadata__"
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


def _digest(data) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _header_digest(header: dict) -> str:
    """The digest of a header, computed over everything in it except this digest:
    a canonical JSON form, so that the same header always hashes the same."""
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return _digest(canonical.encode("ascii"))


def _open(path: str) -> int:
    try:
        # O_NONBLOCK: opening a FIFO by mistake must fail below, not wait
        # forever for a writer. It changes nothing for regular files.
        return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint is not readable (permission denied): {path}") from None
    except OSError as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err.strerror or err}") from None


def _read_header(path: str, fd: int) -> tuple[bytes, int, int]:
    """(header bytes, where the data section starts, its length)."""
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"checkpoint is not a regular file: {path}")
        size = info.st_size
        if size == 0:
            raise CheckpointError(f"checkpoint file is empty: {path}")
        if size < 8:
            raise CheckpointError(f"checkpoint file is too short ({size} bytes) to be a checkpoint: {path}")
        header_len = int.from_bytes(_pread_exactly(path, fd, 8, 0), "little")
        # Checked before reading anything else, so a corrupt length costs nothing.
        if header_len > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"checkpoint header length {header_len} exceeds the {MAX_HEADER_BYTES} byte limit "
                f"(file corrupt or not a checkpoint): {path}"
            )
        if 8 + header_len > size:
            raise CheckpointError(
                f"checkpoint header length {header_len} is past the end of the {size} byte file "
                f"(file truncated or not a checkpoint): {path}"
            )
        return _pread_exactly(path, fd, header_len, 8), 8 + header_len, size - 8 - header_len
    except OSError as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err.strerror or err}") from None


def _pread_exactly(path: str, fd: int, n: int, offset: int) -> bytes:
    """n bytes at offset; a short read means the file shrank while we read it."""
    chunks = []
    while n > 0:
        chunk = os.pread(fd, min(n, _CHUNK_BYTES), offset)
        if not chunk:
            raise CheckpointError(f"checkpoint file is truncated (it changed while being read?): {path}")
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _reject_duplicate_keys(pairs):
    """object_pairs_hook for json: a key given twice means a damaged or forged header."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_json(text: str):
    """json.loads that also refuses duplicate keys.

    Callers catch RecursionError as well as ValueError: deeply nested brackets
    in a corrupt file exhaust the parser's recursion limit.
    """
    return json.loads(text, object_pairs_hook=_reject_duplicate_keys)


def _parse_header(path: str, header_bytes: bytes) -> dict:
    try:
        text = header_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(
            f"checkpoint header is not valid UTF-8 (byte offset {8 + err.start}); file corrupt or not a checkpoint: {path}"
        ) from None
    try:
        header = _parse_json(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint header is not valid JSON ({_short(err)}); file corrupt or not a checkpoint: {path}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"checkpoint header is not a JSON object; file corrupt or not a checkpoint: {path}")
    return header


def _check_version(path: str, metadata) -> int:
    """The format version, after checking this file is a femtogpt file we can read."""
    not_ours = f"{path} is not a femtogpt checkpoint (no femtogpt metadata)"
    if not isinstance(metadata, dict):
        raise CheckpointError(not_ours)
    version = metadata.get("format_version")
    if "femtogpt" not in metadata or version is None:
        raise CheckpointError(not_ours)
    # Version first: a future version may store meta differently.
    if not isinstance(version, str) or not version.isascii() or not version.isdigit():
        raise CheckpointError(f"checkpoint has an invalid format version {_short(version)}: {path}")
    if int(version) not in READABLE_VERSIONS:
        raise CheckpointError(
            f"checkpoint format version {int(version)} is not supported by this femtogpt "
            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))}): {path}"
        )
    return int(version)


def _check_header_digest(path: str, tensors: dict, metadata: dict, version: int):
    """The per-tensor digests, once the header matches its own; None for version 1.
    tensors is the header without its metadata."""
    record = metadata.get("digest")
    if version == 1:
        if record is not None:
            raise CheckpointError(f"checkpoint of format version 1 has a digest; file corrupt: {path}")
        return None
    damaged = f"checkpoint header does not match its digest: its metadata or tensor table is damaged (file corrupt): {path}"
    if not isinstance(record, str):
        raise CheckpointError(f"checkpoint has no digest, which its format version requires; file corrupt: {path}")
    try:
        record = _parse_json(record)
    except (ValueError, RecursionError):
        raise CheckpointError(damaged) from None
    if (not isinstance(record, dict) or set(record) != {"algorithm", "tensors", "header"}
            or record["algorithm"] != DIGEST_ALGORITHM or not isinstance(record["tensors"], dict)
            or not all(isinstance(v, str) for v in record["tensors"].values())):
        raise CheckpointError(damaged)
    claimed = record.pop("header")
    unsigned = dict(tensors)
    unsigned[_METADATA_KEY] = dict(metadata, digest=json.dumps(record))
    # The writer hashed the header with the digest record as json.dumps made it
    # before "header" was added: parsing and dumping it again gives that string.
    if _header_digest(unsigned) != claimed:
        raise CheckpointError(damaged)
    return record["tensors"]


def _parse_meta(path: str, metadata: dict) -> dict:
    meta_json = metadata["femtogpt"]
    if not isinstance(meta_json, str):
        raise CheckpointError(f"checkpoint metadata is not a JSON string: {path}")
    try:
        meta = _parse_json(meta_json)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint metadata is not valid JSON ({_short(err)}): {path}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata is not a JSON object: {path}")
    return meta


def _parse_tensor_entry(path: str, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry; its byte range is not yet checked against the data."""
    where = f"checkpoint tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != _TENSOR_KEYS:
        raise CheckpointError(f"{where} has a malformed header entry: {path}")
    dtype_name = entry["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {_short(dtype_name)}: {path}")
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where} has an invalid shape {_short(shape)}: {path}")
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{where} has invalid data offsets {_short(offsets)}: {path}")
    begin, end = offsets
    dtype = _DTYPES[dtype_name]
    # Python ints: a forged shape cannot overflow into a small, plausible size.
    expected = math.prod(shape) * dtype.itemsize
    if end < begin or end - begin != expected:
        raise CheckpointError(
            f"{where} has data offsets [{begin}, {end}] that do not match its "
            f"shape {shape} and dtype {dtype_name} ({expected} bytes): {path}"
        )
    return dtype, tuple(shape), begin, end


def _is_count(value) -> bool:
    # bool is an int subclass; true/false in a shape is corruption, not 1/0.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_coverage(path: str, layout: dict, data_len: int) -> None:
    """The tensors must tile the data section exactly, as the safetensors format requires.

    This rejects overlapping tensors (one corrupt write aliasing another),
    gaps, and data past the last tensor (a sign of a wrong header).
    """
    position = 0
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"checkpoint tensor {name!r} {problem} in the data section; file corrupt: {path}")
        position = end
    if position != data_len:
        raise CheckpointError(
            f"checkpoint data section is {data_len} bytes but its tensors account for {position}; "
            f"file truncated or corrupt: {path}"
        )


def _short(value, limit: int = 80) -> str:
    """repr/str of something from a hostile file, cut so the message stays one short line."""
    text = str(value) if isinstance(value, Exception) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."
