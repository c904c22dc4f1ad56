import json
import os
import random
import struct

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import femtogpt.checkpoint as checkpoint_module
from femtogpt.checkpoint import FORMAT_VERSION, MAX_HEADER_BYTES, load_checkpoint, save_checkpoint
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
    return {"femtogpt": json.dumps(meta if meta is not None else {"step": 1}), "format_version": str(FORMAT_VERSION)}


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
    assert header["__metadata__"]["format_version"] == "1"
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

    def failing_write(temp, payload):
        # Leave a partial temp file behind, as a real full disk would.
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
         "checkpoint format version 7 is not supported by this femtogpt (reads version 1)"),
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
    path.write_bytes(raw.replace(b'"format_version":"1"', b'"format_version":"7"'))
    assert_load_fails(path, "checkpoint format version 7 is not supported by this femtogpt (reads version 1)")


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
    """Loading damaged data may succeed (e.g. a flipped bit inside a float) or raise CheckpointError; nothing else."""
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


def test_fuzz_random_mutations(tmp_path, valid_bytes):
    rng = random.Random(1234)
    header_end = 8 + struct.unpack("<Q", valid_bytes[:8])[0]
    path = tmp_path / "c"
    outcomes = {"loaded": 0, "rejected": 0}
    for _ in range(600):
        path.write_bytes(_mutate(rng, valid_bytes, header_end))
        result = _load_or_checkpoint_error(path)
        outcomes["loaded" if result is not None else "rejected"] += 1
    # The mutations must actually exercise both paths.
    assert outcomes["rejected"] > 300
    assert outcomes["loaded"] > 0


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
                                              "format_version": st.sampled_from(["1", "2", "x"]) | json_values})),
    data=st.binary(max_size=64),
)
def test_fuzz_structured_headers(tmp_path, entries, metadata, data):
    header = dict(entries)
    if metadata is not None:
        header["__metadata__"] = metadata
    path = tmp_path / "c"
    path.write_bytes(safetensors_bytes(header, data))
    _load_or_checkpoint_error(path)
