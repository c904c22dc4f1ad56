"""Reading one small UTF-8 text file whole: a prompt file, or a short --data.

A corpus of any size is read block by block by corpus.py instead; both refuse
the same things (binary files, UTF-16, bad UTF-8) with the byte offset.
"""
from __future__ import annotations

import os

from ..errors import DataError


_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def read_text(path, what: str = "data file") -> str:
    """The contents of a UTF-8 text file, minus any byte order mark.

    Newlines are kept byte for byte (no universal-newline translation): the
    model should learn the file as it is. `what` names the file in errors.
    """
    raw = _read_bytes(path, what)
    name = os.fspath(path)
    if not raw:
        raise DataError(f"{what} is empty: {name}")
    offset = 0
    if raw.startswith(_UTF8_BOM):
        # Editors on Windows add it; it is not part of the text.
        raw, offset = raw[len(_UTF8_BOM):], len(_UTF8_BOM)
        if not raw:
            raise DataError(f"{what} is empty (it holds only a byte order mark): {name}")
    _reject_binary(raw, name, what)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = raw[err.start]
        raise DataError(
            f"{what} is not UTF-8 text: invalid byte 0x{bad:02x} at byte offset "
            f"{err.start + offset}: {name}"
        ) from None


def _read_bytes(path, what: str) -> bytes:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise DataError(f"{what} is a directory, not a text file: {name}")
    try:
        with open(name, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{what} not found: {name}") from None
    except PermissionError:
        raise DataError(f"{what} is not readable (permission denied): {name}") from None
    except OSError as err:
        raise DataError(f"could not read {what} {name}: {err.strerror or err}") from None


def _reject_binary(raw: bytes, name: str, what: str) -> None:
    """Refuse files that are not text before the UTF-8 check gives a less helpful message.

    Text never contains NUL, while executables, images and archives nearly
    always do. UTF-16 text also does, so it gets its own hint.
    """
    if raw.startswith(_UTF16_BOMS):
        raise DataError(f"{what} is UTF-16 text; convert it to UTF-8 first: {name}")
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{what} looks binary (NUL byte at byte offset {nul}), not UTF-8 text: {name}")
