"""The token cache's manifest and its checks: what an entry holds (its
sources, tokenizer, split and token files, each with a digest), read back
refusing anything damaged or from another version, written atomically; and
the checks of token files against it that a start and `femtogpt verify` make."""
from __future__ import annotations

import glob
import json
import os

import numpy as np
import xxhash

from . import corpus
from ..errors import DataError, FemtoGPTError
from .registry import tokenizer_from_dict

FORMAT = "femtogpt-token-cache"
VERSION = 2
MANIFEST = "manifest.json"

_CHECK_BYTES = 16 << 20         # bytes read at a time to check a digest


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
