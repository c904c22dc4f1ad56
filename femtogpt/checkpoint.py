"""Checkpoint files: model tensors plus a JSON description, in the safetensors format.

safetensors is an 8-byte little-endian header length, a JSON header, then the
raw tensor bytes. Unlike pickle, nothing in such a file can run code when it
is loaded, so sharing checkpoints is safe. femtogpt's own data (config,
tokenizer, step, RNG state, metrics...) is a JSON string in the header's
"__metadata__" under "femtogpt", next to "format_version".

Writing is atomic: a crash or a full disk mid-save leaves the previous
checkpoint as it was. Reading treats the file as hostile: every way it can be
wrong (truncated, corrupted, not a checkpoint, from another version) becomes a
one-line CheckpointError naming the file, never another exception, a hang or
a huge allocation.
"""
from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import safetensors.numpy

from femtogpt.errors import CheckpointError

FORMAT_VERSION = 1

# The safetensors library's own bound. A femtogpt header is a few KB; this
# only stops a corrupt length from making us read or parse a huge "header".
MAX_HEADER_BYTES = 100_000_000

# numpy allows at most 64 dimensions; real tensors have at most a handful.
_MAX_NDIM = 32

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

_METADATA_KEY = "__metadata__"
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


# --------------------------------------------------------------------------- saving


def save_checkpoint(path, tensors: dict[str, np.ndarray], meta: dict) -> None:
    """Write tensors and meta to path, replacing any previous file only once the new one is complete."""
    path = os.fspath(path)
    payload = _serialise(path, tensors, meta)
    directory = os.path.dirname(os.path.abspath(path))
    # Same directory as the target, so that os.replace is a rename within one
    # filesystem and therefore atomic. Hidden, so it does not look like a checkpoint.
    temp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        _write_durably(temp, payload)
        os.replace(temp, path)
    except BaseException as err:
        # Whatever went wrong (including Ctrl-C), the old checkpoint is untouched;
        # don't leave a half-written temp file next to it.
        _remove_quietly(temp)
        if isinstance(err, OSError):
            raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}") from None
        raise
    _fsync_directory(directory)


def _serialise(path: str, tensors, meta) -> bytes:
    """The complete file contents, after checking the inputs are storable."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"could not write checkpoint {path}: tensors must be a dict, got {type(tensors).__name__}")
    if not isinstance(meta, dict):
        raise CheckpointError(f"could not write checkpoint {path}: meta must be a dict, got {type(meta).__name__}")
    arrays = {name: _storable_array(path, name, value) for name, value in tensors.items()}
    try:
        meta_json = json.dumps(meta)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"could not write checkpoint {path}: metadata is not JSON-serialisable: {err}") from None
    metadata = {"femtogpt": meta_json, "format_version": str(FORMAT_VERSION)}
    return safetensors.numpy.save(arrays, metadata=metadata)


def _storable_array(path: str, name, value) -> np.ndarray:
    """value as a C-contiguous little-endian array of a dtype safetensors can store."""
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


def _write_durably(path: str, payload: bytes) -> None:
    with open(path, "wb") as f:
        f.write(payload)
        f.flush()
        # Without fsync, a power cut after the rename could leave the *new*
        # name pointing at a file whose data never reached the disk.
        os.fsync(f.fileno())


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable.

    Best effort: the new checkpoint is already complete and in place, and some
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


# --------------------------------------------------------------------------- loading


def load_checkpoint(path) -> tuple[dict[str, np.ndarray], dict]:
    """The tensors (writable arrays) and the meta dict saved by save_checkpoint."""
    path = os.fspath(path)
    header_bytes, data = _read_file(path)
    header = _parse_header(path, header_bytes)
    meta = _parse_metadata(path, header.pop(_METADATA_KEY, None))
    layout = {name: _parse_tensor_entry(path, name, entry) for name, entry in header.items()}
    _check_coverage(path, layout, len(data))
    tensors = {name: _decode_tensor(path, name, data, *info) for name, info in layout.items()}
    return tensors, meta


def _read_file(path: str) -> tuple[bytes, bytes]:
    """The header bytes and the data section of the file at path."""
    try:
        # O_NONBLOCK: opening a FIFO by mistake must fail below, not wait
        # forever for a writer. It changes nothing for regular files.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except PermissionError:
        raise CheckpointError(f"checkpoint is not readable (permission denied): {path}") from None
    except OSError as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err.strerror or err}") from None
    try:
        return _read_sections(path, fd)
    except OSError as err:
        raise CheckpointError(f"could not read checkpoint {path}: {err.strerror or err}") from None
    finally:
        os.close(fd)


def _read_sections(path: str, fd: int) -> tuple[bytes, bytes]:
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
    header_len = int.from_bytes(_read_exactly(path, fd, 8), "little")
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
    header = _read_exactly(path, fd, header_len)
    data = _read_exactly(path, fd, size - 8 - header_len)
    return header, data


def _read_exactly(path: str, fd: int, n: int) -> bytes:
    """n bytes from fd; a short read means the file shrank while we read it."""
    chunks = []
    remaining = n
    while remaining > 0:
        chunk = os.read(fd, min(remaining, 1 << 24))
        if not chunk:
            raise CheckpointError(f"checkpoint file is truncated (it changed while being read?): {path}")
        chunks.append(chunk)
        remaining -= len(chunk)
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


def _parse_metadata(path: str, metadata) -> dict:
    """femtogpt's meta dict, after checking this file is a femtogpt checkpoint of our version."""
    not_ours = f"{path} is not a femtogpt checkpoint (no femtogpt metadata)"
    if not isinstance(metadata, dict):
        raise CheckpointError(not_ours)
    version = metadata.get("format_version")
    if "femtogpt" not in metadata or version is None:
        raise CheckpointError(not_ours)
    # Version first: a future version may store meta differently.
    if not isinstance(version, str) or not version.isascii() or not version.isdigit():
        raise CheckpointError(f"checkpoint has an invalid format version {version!r}: {path}")
    if int(version) != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint format version {int(version)} is not supported by this femtogpt "
            f"(reads version {FORMAT_VERSION}): {path}"
        )
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


def _decode_tensor(path: str, name: str, data: bytes, dtype: np.dtype, shape, begin: int, end: int) -> np.ndarray:
    flat = np.frombuffer(data, dtype=np.uint8, count=end - begin, offset=begin)
    if dtype == np.bool_ and flat.size and flat.max() > 1:
        # Any other byte would make a numpy bool that is neither True nor False.
        raise CheckpointError(f"checkpoint tensor {name!r} has bool values other than 0 and 1: {path}")
    # .view on a fresh copy (not frombuffer on bytes): the result owns its
    # memory, is writable and aligned; astype then gives native byte order.
    return flat.copy().view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _short(value, limit: int = 80) -> str:
    """repr/str of something from a hostile file, cut so the message stays one short line."""
    text = str(value) if isinstance(value, Exception) else repr(value)
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- models
#
# A femtogpt checkpoint holds the model's tensors under their nanoGPT names and,
# in the metadata, "model_config" (GPTConfig fields) and "tokenizer" (its
# to_dict()). A training-state checkpoint (train.py) adds AdamW's moments as
# "optimizer.exp_avg.<name>" / "optimizer.exp_avg_sq.<name>" and the loop's
# state in the metadata.

LATEST_NAME = "ckpt.safetensors"   # the latest training state in a run directory
BEST_NAME = "best.safetensors"     # the model with the best validation loss


def checkpoint_path(path, prefer=BEST_NAME) -> str:
    """A checkpoint file from a file path or a run directory (prefer, else the other)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    for name in (prefer, LATEST_NAME if prefer == BEST_NAME else BEST_NAME):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    raise CheckpointError(f"no checkpoint in directory {path} "
                          f"(expected {BEST_NAME} or {LATEST_NAME})")


def model_from_checkpoint(path, tensors: dict, meta: dict):
    """Build (model, tokenizer) from loaded tensors and meta; CheckpointError if they disagree."""
    from femtogpt.errors import FemtoGPTError
    from femtogpt.model import GPT, GPTConfig
    from femtogpt.tokenizer import tokenizer_from_dict

    config_dict = meta.get("model_config")
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{path} is not a femtogpt model checkpoint (no model_config)")
    try:
        config = GPTConfig(**config_dict)
        tokenizer = tokenizer_from_dict(meta.get("tokenizer"))
    except (TypeError, FemtoGPTError) as err:
        raise CheckpointError(f"{path} has an invalid model description: {err}") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model's vocab_size is {config.vocab_size}")
    model = GPT(config, seed=0)
    names = model.state_dict().keys()
    weights = {}
    for name in names:
        value = tensors.get(name)
        if value is None:
            raise CheckpointError(f"{path} is missing tensor {name}")
        if value.dtype != np.float32:
            raise CheckpointError(f"{path}: tensor {name} has dtype {value.dtype}, expected float32")
        if not np.all(np.isfinite(value)):
            raise CheckpointError(f"{path}: tensor {name} holds NaN or infinite values")
        weights[name] = value
    try:
        model.load_state_dict(weights)
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return model, tokenizer


def model_meta(model, tokenizer) -> dict:
    return {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}


def load(path, prefer=BEST_NAME):
    """(model, tokenizer) from a checkpoint file or a run directory.

    For a directory, the best-validation model is used if there is one, else
    the latest training state.
    """
    file = checkpoint_path(path, prefer)
    tensors, meta = load_checkpoint(file)
    model, tokenizer = model_from_checkpoint(file, tensors, meta)
    model.eval()
    return model, tokenizer
