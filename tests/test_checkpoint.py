import json
import os
import random
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import femtogpt.files.tensorfile as checkpoint_module
from femtogpt.files.checkpoint import FORMAT_VERSION, MAX_HEADER_BYTES, load_checkpoint, save_checkpoint
from femtogpt.errors import CheckpointError


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "wte": rng.standard_normal((11, 8)).astype(np.float32),
        "h.0.attn.bias": rng.standard_normal(24).astype(np.float32),
        "step_counts": np.array([3, -1, 2**40], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "mask": np.array([True, False, True]),
        "ids": np.arange(5, dtype=np.uint16),
    }


def sample_meta():
    rng = np.random.default_rng(42)
    return {
        "config": {"n_layer": 2, "n_embd": 8, "dropout": 0.1, "bias": False, "name": "tiny ☃"},
        "tokenizer": {"type": "char", "chars": "\n !abc😀"},
        "step": 1234,
        "rng": rng.bit_generator.state,  # holds 128-bit ints
        "metrics": {"loss": [4.1, 3.25, 2.125e-3], "best": None},
    }


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded + data


def good_metadata(meta=None):
    """Metadata of a format-1 file (before digests), which loads without one: the
    crafted files below test the structure checks, which apply to every version."""
    return {"femtogpt": json.dumps(meta if meta is not None else {"step": 1}), "format_version": "1"}


def assert_load_fails(path, *fragments):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ----------------------------------------------------------------------------- round trip


def test_round_trip_tensors_and_meta_exactly(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    tensors, meta = sample_tensors(), sample_meta()
    save_checkpoint(path, tensors, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype, name
        assert loaded[name].shape == array.shape, name
        assert np.array_equal(loaded[name], array), name
        assert loaded[name].flags.writeable
    assert loaded_meta == meta
    assert loaded["step_counts"].tolist() == [3, -1, 2**40]


def test_loaded_arrays_are_writable_copies(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"w": np.ones(4, dtype=np.float32)}, {})
    loaded, _ = load_checkpoint(path)
    loaded["w"][0] = 7.0
    again, _ = load_checkpoint(path)
    assert again["w"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert loaded["w"].flags.writeable and loaded["w"].flags.aligned


def test_rng_state_survives_for_exact_resume(tmp_path):
    rng = np.random.default_rng(2024)
    rng.integers(0, 100, size=10)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {}, {"rng": rng.bit_generator.state})
    expected = rng.integers(0, 1000, size=20)
    _, meta = load_checkpoint(path)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = meta["rng"]
    assert np.array_equal(resumed.integers(0, 1000, size=20), expected)


def test_non_contiguous_and_big_endian_inputs(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    matrix = np.arange(12, dtype=np.float32).reshape(3, 4)
    big = np.arange(3, dtype=">i4")
    save_checkpoint(path, {"t": matrix.T, "big": big}, {})
    loaded, _ = load_checkpoint(path)
    assert np.array_equal(loaded["t"], matrix.T)
    assert loaded["big"].tolist() == [0, 1, 2]
    assert loaded["big"].dtype == np.int32 and loaded["big"].dtype.isnative


def test_file_is_standard_safetensors(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, sample_tensors(), {"step": 5})
    # Any safetensors reader can open it; our data sits in the standard metadata.
    plain = safetensors.numpy.load_file(str(path))
    assert np.array_equal(plain["wte"], sample_tensors()["wte"])
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert header["__metadata__"]["format_version"] == str(FORMAT_VERSION) == "2"
    assert json.loads(header["__metadata__"]["femtogpt"]) == {"step": 5}


def test_save_overwrites_previous(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"a": np.zeros(2, dtype=np.float32)}, {"step": 1})
    save_checkpoint(path, {"a": np.ones(3, dtype=np.float32)}, {"step": 2})
    loaded, meta = load_checkpoint(path)
    assert loaded["a"].tolist() == [1.0, 1.0, 1.0]
    assert meta == {"step": 2}
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


# ----------------------------------------------------------------------------- atomic writes


@pytest.fixture
def old_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"a": np.zeros(2, dtype=np.float32)}, {"step": 1})
    return path, path.read_bytes()


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("target", ["replace", "fsync"])
def test_failed_save_keeps_old_checkpoint_and_no_temp(monkeypatch, tmp_path, old_checkpoint, target):
    path, old_bytes = old_checkpoint
    monkeypatch.setattr(checkpoint_module.os, target, _fail)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {"a": np.ones(100, dtype=np.float32)}, {"step": 2})
    monkeypatch.undo()
    assert str(info.value) == f"could not write checkpoint {path}: No space left on device"
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]
    assert load_checkpoint(path)[1] == {"step": 1}


def test_failed_write_keeps_old_checkpoint(monkeypatch, tmp_path, old_checkpoint):
    path, old_bytes = old_checkpoint

    def failing_write(temp, parts):
        # Leave a partial temp file behind, as a real full disk would.
        payload = b"".join(bytes(p) for p in parts)
        with open(temp, "wb") as f:
            f.write(payload[: len(payload) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_durably", failing_write)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(path, {"a": np.ones(100, dtype=np.float32)}, {"step": 2})
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_interrupted_save_removes_temp_and_reraises(monkeypatch, tmp_path, old_checkpoint):
    path, old_bytes = old_checkpoint

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": np.ones(3, dtype=np.float32)}, {})
    monkeypatch.undo()
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


def test_save_into_missing_directory(tmp_path):
    path = tmp_path / "no" / "such" / "ckpt.safetensors"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, {}, {})
    assert str(info.value) == f"could not write checkpoint {path}: No such file or directory"


def test_save_over_a_directory(tmp_path):
    target = tmp_path / "ckpt.safetensors"
    target.mkdir()
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        save_checkpoint(target, {}, {})
    assert target.is_dir()
    assert os.listdir(tmp_path) == ["ckpt.safetensors"]


@pytest.mark.parametrize(
    "tensors, meta, fragment",
    [
        ({"a": np.zeros(2, dtype=np.complex64)}, {}, "unsupported dtype complex64"),
        ({"a": np.array(["x"], dtype=object)}, {}, "unsupported dtype object"),
        ({"a": [1.0, 2.0]}, {}, "not a numpy array"),
        ({"__metadata__": np.zeros(1)}, {}, "invalid tensor name"),
        ({"": np.zeros(1)}, {}, "invalid tensor name"),
        ({}, {"x": object()}, "not JSON-serialisable"),
        ({}, [1, 2], "meta must be a dict"),
        ([], {}, "tensors must be a dict"),
    ],
)
def test_save_rejects_unstorable_input(tmp_path, tensors, meta, fragment):
    path = tmp_path / "ckpt.safetensors"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, tensors, meta)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- not a checkpoint


def test_load_missing(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(info.value) == f"checkpoint not found: {path}"


def test_load_directory(tmp_path):
    assert_load_fails(tmp_path, "directory")


def test_load_empty(tmp_path):
    assert_load_fails(write(tmp_path / "c", b""), "empty")


@pytest.mark.parametrize("n", [1, 7])
def test_load_shorter_than_length_prefix(tmp_path, n):
    assert_load_fails(write(tmp_path / "c", b"\x01" * n), "too short", f"({n} bytes)")


def test_load_text_file(tmp_path):
    assert_load_fails(write(tmp_path / "notes.txt", b"First Citizen:\nBefore we proceed any further, hear me speak.\n"),
                      "header length")


def test_load_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_load_fails(fifo, "not a regular file")


def test_load_device_file():
    with pytest.raises(CheckpointError, match="not a regular file"):
        load_checkpoint("/dev/null")


def test_plain_safetensors_is_not_a_femtogpt_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors.numpy.save({"w": np.zeros(2, dtype=np.float32)}))
    assert_load_fails(path, "not a femtogpt checkpoint")
    path.write_bytes(safetensors.numpy.save({"w": np.zeros(2, dtype=np.float32)}, metadata={"format": "pt"}))
    assert_load_fails(path, "not a femtogpt checkpoint")


# ----------------------------------------------------------------------------- corrupt headers


def test_header_length_huge(tmp_path):
    path = write(tmp_path / "c", struct.pack("<Q", 2**63 + 5) + b"{}")
    assert_load_fails(path, "exceeds", str(MAX_HEADER_BYTES))
    path = write(tmp_path / "c", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
    assert_load_fails(path, "exceeds")


def test_header_length_past_end_of_file(tmp_path):
    assert_load_fails(write(tmp_path / "c", struct.pack("<Q", 1000) + b"{}"), "header length 1000", "past the end")


@pytest.mark.parametrize(
    "header_bytes, fragment",
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json}", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'"text"', "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),  # nesting deep enough to exhaust recursion
        (b'{"a": 1, "a": 2}', "duplicate key"),
    ],
)
def test_header_not_json_object(tmp_path, header_bytes, fragment):
    data = struct.pack("<Q", len(header_bytes)) + header_bytes
    assert_load_fails(write(tmp_path / "c", data), fragment)


@pytest.mark.parametrize(
    "metadata, fragment",
    [
        (None, "not a femtogpt checkpoint"),
        ("text", "not a femtogpt checkpoint"),
        ({"format_version": "1"}, "not a femtogpt checkpoint"),
        ({"femtogpt": "{}"}, "not a femtogpt checkpoint"),
        ({"femtogpt": "{}", "format_version": "7"},
         "checkpoint format version 7 is not supported by this femtogpt (reads versions 1, 2)"),
        ({"femtogpt": "{}", "format_version": "0"}, "version 0 is not supported"),
        ({"femtogpt": "{}", "format_version": "one"}, "invalid format version 'one'"),
        ({"femtogpt": "{}", "format_version": 1}, "invalid format version 1"),
        ({"femtogpt": "{}", "format_version": "-1"}, "invalid format version"),
        ({"femtogpt": "{\"step\": ", "format_version": "1"}, "metadata is not valid JSON"),
        ({"femtogpt": "[1]", "format_version": "1"}, "metadata is not a JSON object"),
        ({"femtogpt": {"step": 1}, "format_version": "1"}, "metadata is not a JSON string"),
    ],
)
def test_bad_metadata(tmp_path, metadata, fragment):
    header = {} if metadata is None else {"__metadata__": metadata}
    assert_load_fails(write(tmp_path / "c", safetensors_bytes(header)), fragment)


def test_header_without_tensors_loads(tmp_path):
    path = write(tmp_path / "c", safetensors_bytes({"__metadata__": good_metadata({"step": 3})}))
    assert load_checkpoint(path) == ({}, {"step": 3})


def one_tensor_file(tmp_path, entry, data=b"\x00" * 8):
    header = {"__metadata__": good_metadata(), "w": entry}
    return write(tmp_path / "c", safetensors_bytes(header, data))


def test_crafted_valid_file_loads(tmp_path):
    path = one_tensor_file(tmp_path, {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                           struct.pack("<2f", 1.5, -2.0))
    tensors, meta = load_checkpoint(path)
    assert tensors["w"].tolist() == [1.5, -2.0]
    assert meta == {"step": 1}


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}, "unsupported dtype 'BF16'"),
        ({"dtype": "float32", "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": 7, "shape": [2], "data_offsets": [0, 8]}, "unsupported dtype"),
        ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}, "invalid shape"),
        ({"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}, "invalid shape"),
        ({"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 8]}, "do not match"),
        ({"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}, "do not match"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "do not match"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "do not match"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 16]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": {"begin": 0}}, "invalid data offsets"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}, "gap"),
        ({"dtype": "F32", "shape": [2]}, "malformed"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "extra": 1}, "malformed"),
        ([0, 8], "malformed"),
        ("F32", "malformed"),
    ],
)
def test_bad_tensor_entries(tmp_path, entry, fragment):
    message = assert_load_fails(one_tensor_file(tmp_path, entry), fragment)
    assert "'w'" in message or "data section" in message


def test_offsets_past_end_of_data(tmp_path):
    path = one_tensor_file(tmp_path, {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}, b"\x00" * 8)
    assert_load_fails(path, "data section is 8 bytes", "account for 16")


def test_trailing_bytes_after_last_tensor(tmp_path):
    path = one_tensor_file(tmp_path, {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, b"\x00" * 12)
    assert_load_fails(path, "data section is 12 bytes", "account for 8")


def test_overlapping_tensors(tmp_path):
    header = {
        "__metadata__": good_metadata(),
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    assert_load_fails(write(tmp_path / "c", safetensors_bytes(header, b"\x00" * 12)), "'b' overlaps")


def test_out_of_order_header_entries_are_fine_if_they_tile(tmp_path):
    header = {
        "__metadata__": good_metadata(),
        "b": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]},
        "a": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
    }
    tensors, _ = load_checkpoint(write(tmp_path / "c", safetensors_bytes(header, struct.pack("<2i", 10, 20))))
    assert tensors["a"].tolist() == [10] and tensors["b"].tolist() == [20]


def test_bad_bool_bytes(tmp_path):
    path = one_tensor_file(tmp_path, {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}, b"\x01\x05")
    assert_load_fails(path, "bool values")


def test_wrong_format_version_from_real_save(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, {"a": np.zeros(2, dtype=np.float32)}, {})
    raw = path.read_bytes()
    # Same length replacement, so the header length stays valid.
    path.write_bytes(raw.replace(b'"format_version":"2"', b'"format_version":"7"'))
    assert_load_fails(path, "checkpoint format version 7 is not supported by this femtogpt (reads versions 1, 2)")


# ----------------------------------------------------------------------------- damage and fuzzing


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("valid") / "ckpt.safetensors"
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.array([1, -2], dtype=np.int64),
        "m": np.array([True, False]),
    }
    save_checkpoint(path, tensors, {"step": 9, "tokenizer": {"type": "byte"}})
    return path.read_bytes()


def test_truncation_at_every_position_fails(tmp_path, valid_bytes):
    path = tmp_path / "c"
    for cut in range(len(valid_bytes)):
        path.write_bytes(valid_bytes[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(path)


def test_appended_bytes_fail(tmp_path, valid_bytes):
    assert_load_fails(write(tmp_path / "c", valid_bytes + b"\x00"), "data section")


def _load_or_checkpoint_error(path):
    """Loading damaged data raises CheckpointError and nothing else (or loads, for
    crafted headers and for mutations that changed nothing)."""
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as err:
        message = str(err)
        assert message and "\n" not in message and str(path) in message
        return None
    assert isinstance(meta, dict)
    for array in tensors.values():
        assert isinstance(array, np.ndarray) and array.flags.writeable
    return tensors


def _mutate(rng: random.Random, data: bytes, header_end: int) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0:  # truncate
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:  # flip random bytes anywhere
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # flip bytes inside the JSON header, where structure lives
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(8, header_end)] = rng.randrange(256)
    elif kind == 3:  # splice: copy a random range over another place
        start, length = rng.randrange(len(data)), rng.randint(1, 40)
        chunk = data[start:start + length]
        at = rng.randrange(len(data))
        data[at:at + len(chunk)] = chunk
    elif kind == 4:  # insert or delete a random range (shifts everything after)
        at = rng.randrange(len(data))
        if rng.random() < 0.5:
            del data[at:at + rng.randint(1, 20)]
        else:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 20)))
    else:  # corrupt the header length itself
        data[:8] = struct.pack("<Q", rng.choice([0, 1, rng.randrange(len(data) * 2), rng.randrange(2**64)]))
    return bytes(data)


def load_checkpoint_bytes(tmp_path, data):
    path = tmp_path / "original"
    path.write_bytes(data)
    return load_checkpoint(path)


def test_fuzz_random_mutations(tmp_path, valid_bytes):
    rng = random.Random(1234)
    header_end = 8 + struct.unpack("<Q", valid_bytes[:8])[0]
    path = tmp_path / "c"
    original, original_meta = load_checkpoint_bytes(tmp_path, valid_bytes)
    outcomes = {"unchanged": 0, "rejected": 0}
    for _ in range(600):
        mutated = _mutate(rng, valid_bytes, header_end)
        path.write_bytes(mutated)
        result = _load_or_checkpoint_error(path)
        if result is None:
            outcomes["rejected"] += 1
            continue
        # With digests, whatever loads is exactly what was saved: a mutation
        # that loads changed nothing that matters (a splice of equal bytes...).
        assert set(result) == set(original)
        for name in original:
            np.testing.assert_array_equal(result[name], original[name])
        assert load_checkpoint(path)[1] == original_meta
        outcomes["unchanged"] += 1
    assert outcomes["rejected"] > 550


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
entry_values = json_values | st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I64", "BOOL", "U8", "F16", "BF16", "x"]) | json_values,
        "shape": st.lists(st.integers(-3, 20), max_size=4) | json_values,
        "data_offsets": st.lists(st.integers(-5, 80), min_size=2, max_size=2) | json_values,
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(st.text(max_size=6), entry_values, max_size=3),
    metadata=st.one_of(st.just(None), json_values,
                       st.fixed_dictionaries({"femtogpt": st.text(max_size=20) | json_values,
                                              "format_version": st.sampled_from(["1", "2", "x"]) | json_values,
                                              "digest": st.text(max_size=20) | json_values})),
    data=st.binary(max_size=64),
)
def test_fuzz_structured_headers(tmp_path, entries, metadata, data):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    path = tmp_path / "c"
    path.write_bytes(safetensors_bytes(header, data))
    _load_or_checkpoint_error(path)


# ----------------------------------------------------------------------------- digests


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A real model checkpoint (with biases, so that it has many small tensors)."""
    from femtogpt import GPT, GPTConfig, CharTokenizer
    from femtogpt.files.checkpoint import model_meta
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=2, n_head=2, n_embd=16), seed=3)
    tokenizer = CharTokenizer("\nabcdefghijk")
    path = tmp_path_factory.mktemp("model") / "best.safetensors"
    meta = dict(model_meta(model, tokenizer), kind="model", iter=7)
    save_checkpoint(path, model.state_views(), meta)
    return path, path.read_bytes(), model.state_dict()


def _header_end(data):
    return 8 + struct.unpack("<Q", data[:8])[0]


def _tensor_ranges(data):
    header = json.loads(data[8:_header_end(data)])
    start = _header_end(data)
    return {name: (start + e["data_offsets"][0], start + e["data_offsets"][1])
            for name, e in header.items() if name != "__metadata__"}


def _flipped(data, position, bit=0):
    mutated = bytearray(data)
    mutated[position] ^= 1 << bit
    return bytes(mutated)


def _load_model_fails(path, *fragments):
    from femtogpt import load
    with pytest.raises(CheckpointError) as info:
        load(str(path))
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_a_flip_in_any_tensors_data_is_refused_by_name(tmp_path, model_file):
    _, data, _ = model_file
    path = tmp_path / "best.safetensors"
    rng = random.Random(5)
    ranges = _tensor_ranges(data)
    assert len(ranges) == 2 + 2 * 12 + 2
    for name, (begin, end) in ranges.items():
        # a low mantissa bit: the weights stay plausible, only the digest can tell
        path.write_bytes(_flipped(data, rng.randrange(begin, end) // 4 * 4, bit=0))
        _load_model_fails(path, f"tensor '{name}' does not match its digest")


def test_a_flip_in_the_last_byte_is_refused(tmp_path, model_file):
    _, data, _ = model_file
    path = tmp_path / "best.safetensors"
    last = max(_tensor_ranges(data).items(), key=lambda item: item[1][1])[0]
    for bit in range(8):
        path.write_bytes(_flipped(data, len(data) - 1, bit))
        _load_model_fails(path, f"'{last}'")


def test_a_flip_in_the_header_length_is_refused(tmp_path, model_file):
    _, data, _ = model_file
    path = tmp_path / "best.safetensors"
    for position in range(8):
        for bit in (0, 3, 7):
            path.write_bytes(_flipped(data, position, bit))
            _load_model_fails(path)


def test_every_flip_in_the_json_header_is_refused(tmp_path, model_file):
    # 400 single-bit flips spread over the whole header: the tensor table, the
    # femtogpt metadata (config, vocabulary), the digests and the padding.
    _, data, _ = model_file
    path = tmp_path / "best.safetensors"
    rng = random.Random(6)
    end = _header_end(data)
    vocab_at = data.index(b"abcdefghijk")
    positions = [rng.randrange(8, end) for _ in range(400)] + [vocab_at + 3, end - 1]
    for position in positions:
        path.write_bytes(_flipped(data, position, rng.randrange(8)))
        _load_model_fails(path)


def test_a_recomputed_tensor_digest_with_a_stale_header_digest_is_refused(tmp_path, model_file):
    _, data, _ = model_file
    header = json.loads(data[8:_header_end(data)])
    name, (begin, end) = next(iter(_tensor_ranges(data).items()))
    damaged = bytearray(data)
    damaged[begin] ^= 1
    # The damaged tensor's digest is recomputed and written in, the header's is not.
    digest = json.loads(header["__metadata__"]["digest"])
    import xxhash
    digest["tensors"][name] = xxhash.xxh3_128_hexdigest(bytes(damaged[begin:end]))
    header["__metadata__"]["digest"] = json.dumps(digest)
    path = write(tmp_path / "best.safetensors",
                 _rebuilt(header, bytes(damaged[_header_end(data):])))
    _load_model_fails(path, "header does not match its digest")


def test_a_consistent_header_with_a_wrong_tensor_digest_is_refused(tmp_path, model_file):
    # Someone recomputes the header digest over a wrong tensor digest: the
    # header passes, the tensor does not.
    from femtogpt.files.tensorfile import _header_digest
    _, data, _ = model_file
    header = json.loads(data[8:_header_end(data)])
    digest = json.loads(header["__metadata__"]["digest"])
    name = sorted(digest["tensors"])[3]
    digest["tensors"][name] = "0" * 32
    del digest["header"]
    header["__metadata__"]["digest"] = json.dumps(digest)
    digest["header"] = _header_digest(header)
    header["__metadata__"]["digest"] = json.dumps(digest)
    path = write(tmp_path / "best.safetensors", _rebuilt(header, data[_header_end(data):]))
    _load_model_fails(path, f"tensor '{name}' does not match its digest")


def test_removing_the_digest_is_refused(tmp_path, model_file):
    _, data, _ = model_file
    header = json.loads(data[8:_header_end(data)])
    del header["__metadata__"]["digest"]
    path = write(tmp_path / "best.safetensors", _rebuilt(header, data[_header_end(data):]))
    _load_model_fails(path, "no digest")


def _rebuilt(header, tensor_bytes):
    encoded = json.dumps(header).encode("utf-8")
    return struct.pack("<Q", len(encoded)) + encoded + tensor_bytes


def test_a_checkpoint_from_before_digests_loads_with_a_note_and_is_left_alone(tmp_path,
                                                                               model_file):
    import femtogpt
    from femtogpt.errors import UnverifiedCheckpointWarning
    _, data, state = model_file
    header = json.loads(data[8:_header_end(data)])
    del header["__metadata__"]["digest"]
    header["__metadata__"]["format_version"] = "1"
    old = _rebuilt(header, data[_header_end(data):])
    path = write(tmp_path / "best.safetensors", old)
    with pytest.warns(UnverifiedCheckpointWarning, match="before femtogpt checkpoints carried "
                                                         "digests"):
        model, tokenizer = femtogpt.load(str(path))
    for name, value in state.items():
        np.testing.assert_array_equal(model.state_dict()[name], value)
    assert path.read_bytes() == old


def test_loading_reads_into_the_models_own_memory(model_file, monkeypatch):
    # No second full copy: every tensor is read straight into the model's
    # parameter block (read_into gets views of it, never a fresh array).
    import femtogpt
    from femtogpt.files import tensorfile
    path, _, state = model_file
    targets = []
    real = tensorfile.TensorFile.read_into

    def spy(self, name, out):
        targets.append(out)
        return real(self, name, out)

    monkeypatch.setattr(tensorfile.TensorFile, "read_into", spy)
    model, _ = femtogpt.load(str(path))
    assert len(targets) == len(state)
    block = model.params_flat
    for out in targets:
        assert np.shares_memory(out, block)


def test_saving_writes_from_the_models_own_memory(tmp_path, monkeypatch):
    from femtogpt import GPT, GPTConfig
    from femtogpt.files import tensorfile
    model = GPT(GPTConfig(vocab_size=12, block_size=8, n_layer=1, n_head=2, n_embd=16), seed=1)
    seen = []
    real = tensorfile._write_durably

    def spy(path, parts):
        seen.extend(parts[1:])
        return real(path, parts)

    monkeypatch.setattr(tensorfile, "_write_durably", spy)
    save_checkpoint(tmp_path / "m.safetensors", model.state_views(), {})
    assert len(seen) == len(model.state_dict())
    assert all(np.shares_memory(np.asarray(part), model.params_flat) for part in seen)
