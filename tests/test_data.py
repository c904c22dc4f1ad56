import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from femtogpt.text import read_text

from femtogpt.train.batches import check_split_size, get_batch
from femtogpt.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- read_text


def test_read_text_keeps_content_and_newlines_exactly(tmp_path):
    content = "line one\r\nline two\nΣπάρτη 😀\rlast"
    path = tmp_path / "t.txt"
    path.write_bytes(content.encode("utf-8"))
    assert read_text(path) == content
    assert read_text(str(path)) == content


def test_read_text_strips_bom(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_text(path) == "hello\n"


def test_read_text_missing(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(DataError) as info:
        read_text(path)
    assert str(info.value) == f"data file not found: {path}"


def test_read_text_directory(tmp_path):
    with pytest.raises(DataError) as info:
        read_text(tmp_path)
    assert str(info.value) == f"data file is a directory, not a text file: {tmp_path}"


def test_read_text_empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(DataError) as info:
        read_text(path)
    assert str(info.value) == f"data file is empty: {path}"


def test_read_text_only_bom_is_empty(tmp_path):
    path = tmp_path / "bom_only.txt"
    path.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(DataError, match="empty"):
        read_text(path)


def test_read_text_binary_with_nul(tmp_path):
    path = tmp_path / "prog.bin"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00\x00\x00")
    with pytest.raises(DataError) as info:
        read_text(path)
    message = str(info.value)
    assert "looks binary" in message
    assert "byte offset 7" in message
    assert str(path) in message


def test_read_text_utf16_gets_a_hint(tmp_path):
    path = tmp_path / "u16.txt"
    path.write_bytes("hello".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_text(path)


@pytest.mark.parametrize(
    "raw, offset, byte",
    [
        (b"hello \xff world", 6, "0xff"),
        ("héllo".encode("latin-1"), 1, "0xe9"),
        (b"abc" + "€".encode("utf-8")[:2], 3, "0xe2"),  # truncated at end of file
        (b"\xef\xbb\xbfab\x80", 5, "0x80"),  # offset counts the BOM: it is a file offset
    ],
)
def test_read_text_invalid_utf8_reports_offset(tmp_path, raw, offset, byte):
    path = tmp_path / "latin.txt"
    path.write_bytes(raw)
    with pytest.raises(DataError) as info:
        read_text(path)
    message = str(info.value)
    assert "not UTF-8" in message
    assert f"invalid byte {byte} at byte offset {offset}" in message
    assert str(path) in message
    assert "\n" not in message


# ----------------------------------------------------------------------------- split sizes


def test_check_split_size():
    check_split_size(np.arange(65), 64, "train")  # exactly block_size + 1 is enough
    with pytest.raises(DataError) as info:
        check_split_size(np.arange(40), 64, "val")
    assert str(info.value) == (
        "val split has 40 tokens, needs at least block_size + 1 = 65; "
        "use a smaller --block-size or more text"
    )
    with pytest.raises(DataError, match="train split has 64 tokens"):
        check_split_size(np.arange(64), 64, "train")


# ----------------------------------------------------------------------------- batches


def test_get_batch_shapes_dtypes_and_shift():
    ids = (np.arange(1000) * 7 % 251).astype(np.uint8)
    x, y = get_batch(ids, batch_size=16, block_size=32, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (16, 32)
    assert x.dtype == y.dtype == np.int64
    assert x.flags.c_contiguous and y.flags.c_contiguous
    assert np.array_equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        # Recover the window's start from the source and check both rows against it.
        start = _find_window(ids, row_x)
        assert np.array_equal(row_x, ids[start:start + 32])
        assert np.array_equal(row_y, ids[start + 1:start + 33])


def _find_window(ids, row):
    for start in range(len(ids) - len(row) + 1):
        if np.array_equal(ids[start:start + len(row)], row):
            return start
    raise AssertionError("row is not a window of ids")


def test_get_batch_uses_nanogpt_draw():
    ids = np.arange(500, dtype=np.uint16)  # id == position, so x[:, 0] are the starts
    x, y = get_batch(ids, 8, 10, np.random.default_rng(123))
    expected_starts = np.random.default_rng(123).integers(0, 500 - 10, size=8)
    assert np.array_equal(x[:, 0], expected_starts)
    assert np.array_equal(x, expected_starts[:, None] + np.arange(10))
    assert np.array_equal(y, x + 1)


def test_get_batch_deterministic_for_seed_and_resumable_from_state():
    ids = np.arange(10_000, dtype=np.uint16)
    a = [get_batch(ids, 4, 16, rng) for rng in [np.random.default_rng(7)] * 3]
    b = [get_batch(ids, 4, 16, rng) for rng in [np.random.default_rng(7)] * 3]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    # Successive batches from one generator differ.
    assert not np.array_equal(a[0][0], a[1][0])

    rng = np.random.default_rng(7)
    get_batch(ids, 4, 16, rng)
    state = rng.bit_generator.state
    expected = get_batch(ids, 4, 16, rng)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = state
    got = get_batch(ids, 4, 16, resumed)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_get_batch_minimum_length_uses_whole_split():
    ids = np.array([5, 6, 7, 8], dtype=np.uint8)
    x, y = get_batch(ids, 3, 3, np.random.default_rng(0))
    assert x.tolist() == [[5, 6, 7]] * 3
    assert y.tolist() == [[6, 7, 8]] * 3


def test_get_batch_too_short():
    with pytest.raises(DataError, match="val split has 3 tokens, needs at least block_size \\+ 1 = 4"):
        get_batch(np.arange(3), 2, 3, np.random.default_rng(0), split_name="val")


@pytest.mark.parametrize("batch_size, block_size", [(0, 4), (4, 0), (-1, 4)])
def test_get_batch_bad_sizes(batch_size, block_size):
    with pytest.raises(ConfigError):
        get_batch(np.arange(100), batch_size, block_size, np.random.default_rng(0))


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(2, 400),
    block_size=st.integers(1, 64),
    batch_size=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
)
def test_get_batch_windows_in_range(n, block_size, batch_size, seed):
    ids = np.arange(n, dtype=np.uint32)  # id == position
    rng = np.random.default_rng(seed)
    if n < block_size + 1:
        with pytest.raises(DataError):
            get_batch(ids, batch_size, block_size, rng)
        return
    x, y = get_batch(ids, batch_size, block_size, rng)
    assert x.shape == y.shape == (batch_size, block_size)
    starts = x[:, 0]
    assert starts.min() >= 0
    assert starts.max() + block_size <= n - 1  # y's last position is still inside ids
    assert np.array_equal(x, starts[:, None] + np.arange(block_size))
    assert np.array_equal(y, x + 1)


def test_get_batch_from_a_token_file_draws_the_same_batches(tmp_path):
    # Training reads the token cache through TokenFile: the same draws, the
    # same windows as from the ids in memory (so resuming stays bit-identical).
    from femtogpt.text.token_cache import TokenFile
    ids = np.random.default_rng(0).integers(0, 300, 5000).astype(np.uint16)
    path = tmp_path / "ids.bin"
    ids.tofile(path)
    file = TokenFile(str(path), len(ids), np.uint16, 300)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    for _ in range(5):
        x1, y1 = get_batch(ids, 6, 17, a)
        x2, y2 = get_batch(file, 6, 17, b)
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
        assert x2.dtype == np.int64 and x2.flags.c_contiguous
