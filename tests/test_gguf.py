"""GGUF export (femtogpt/files/gguf_file.py): files read back with the gguf
package's own reader, without llama.cpp.

Each check states what llama.cpp relies on: names from the parameter table,
ggml's shapes, the converter's choice of types, q8_0's blocks bit for bit,
and tokenizers that llama.cpp's own algorithms (re-enacted here: its rwkv
greedy match and escapes) turn into femtogpt's ids. Where llama.cpp's Python
binding happens to be installed, one more test runs the file in it.
"""
import os
import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from femtogpt.app.cli import main                                   # noqa: E402
from femtogpt.errors import ConfigError                              # noqa: E402
from femtogpt.files import gguf_file                                 # noqa: E402
from femtogpt.files.checkpoint import model_meta, save_checkpoint    # noqa: E402
from femtogpt.files.gguf_file import export_gguf                     # noqa: E402
from femtogpt.model import GPT, GPTConfig                            # noqa: E402
from femtogpt.model.params import PARAMS                             # noqa: E402
from femtogpt.text import BPETokenizer, ByteTokenizer, CharTokenizer  # noqa: E402
from femtogpt.text.gpt2 import bytes_to_unicode, gpt2_pattern        # noqa: E402

from test_hf import make_folder                                      # noqa: E402

Q = gguf.GGMLQuantizationType
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\\ naïve 😀 ½\n" * 4


def model_for(tokenizer, C=64, L=2, H=2, T=16, bias=True, gelu="tanh", seed=3):
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=T, n_layer=L,
                          n_head=H, n_embd=C, bias=bias, gelu=gelu), seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.state_views().values():       # non-trivial LayerNorms and biases
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.05
    return model.eval()


def value(reader, key):
    """A metadata value: a scalar, a str, or a list of them."""
    field = reader.fields[key]
    parts = [field.parts[i] for i in field.data]
    as_value = (lambda p: bytes(p).decode("utf-8")) if field.types[-1] == \
        gguf.GGUFValueType.STRING else (lambda p: p.tolist()[0])
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        return [as_value(p) for p in parts]
    return as_value(parts[0])


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def expected_names(L):
    names = [p.gguf_name(i) for p in PARAMS if p.per_layer for i in range(L)]
    return sorted(names + [p.gguf_name() for p in PARAMS if not p.per_layer] + ["output.weight"])


# --------------------------------------------------------------------------- tensors, metadata


def test_f32_file_holds_the_model_in_llama_cpp_names_shapes_and_metadata(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = model_for(tok, C=64, L=2, H=4, T=16)
    path = tmp_path / "m.gguf"
    assert export_gguf(model, tok, path, "f32") == []
    r = gguf.GGUFReader(path)
    assert value(r, "general.architecture") == "gpt2"
    assert [value(r, f"gpt2.{k}") for k in (
        "context_length", "embedding_length", "feed_forward_length", "block_count",
        "attention.head_count")] == [16, 64, 256, 2, 4]
    assert value(r, "gpt2.attention.layer_norm_epsilon") == pytest.approx(1e-5, rel=1e-6)
    assert value(r, "general.file_type") == 0
    got = tensors(r)
    assert sorted(got) == expected_names(2)
    views = model.state_views()
    for p in PARAMS:
        for layer in (range(2) if p.per_layer else [None]):
            t = got[p.gguf_name(layer)]
            want = views[p.state_name(layer)]
            assert t.tensor_type == Q.F32
            # ggml lists dimensions fastest first: (out, in) is {in, out}
            assert list(t.shape) == list(want.shape[::-1])
            np.testing.assert_array_equal(t.data.reshape(want.shape), want)
    np.testing.assert_array_equal(got["output.weight"].data, views["transformer.wte.weight"])


def test_a_model_without_biases_gets_zero_biases_and_a_note(tmp_path):
    tok = ByteTokenizer()
    model = model_for(tok, C=32, L=1, H=2, bias=False)
    notes = export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    assert any("no biases" in n for n in notes)
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert sorted(got) == expected_names(1)
    for name in ("blk.0.attn_qkv.bias", "blk.0.ffn_up.bias", "output_norm.bias"):
        assert got[name].data.shape[-1] in (32, 96, 128) and not got[name].data.any()
    np.testing.assert_array_equal(got["blk.0.attn_norm.weight"].data,
                                  model.state_views()["transformer.h.0.ln_1.weight"])


MATRICES = ("token_embd.weight", "output.weight", "blk.0.attn_qkv.weight",
            "blk.0.attn_output.weight", "blk.0.ffn_up.weight", "blk.0.ffn_down.weight")


def _bf16_reference(x):
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def test_bf16_rounds_the_matrices_to_nearest_even_and_keeps_the_rest_f32(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = model_for(tok, C=32, L=1)
    export_gguf(model, tok, tmp_path / "m.gguf", "bf16")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert value(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_BF16)
    views = {p.gguf_name(0 if p.per_layer else None): model.state_views()[
        p.state_name(0 if p.per_layer else None)] for p in PARAMS}
    views["output.weight"] = views["token_embd.weight"]
    for name, t in tensors(r).items():
        if name in MATRICES:
            assert t.tensor_type == Q.BF16, name
            stored = np.frombuffer(t.data.tobytes(), np.uint16).reshape(views[name].shape)
            np.testing.assert_array_equal(stored, _bf16_reference(views[name]))
        else:       # LayerNorms, biases and the position table: as the converter keeps them
            assert t.tensor_type == Q.F32, name
            np.testing.assert_array_equal(t.data.reshape(views[name].shape), views[name])


def _q8_0_reference(x):
    """ggml's quantize_row_q8_0_ref, per block of 32 along the row, in float32:
    d = amax / 127, q = roundf(x * (1 / d)) (halves away from zero)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    prod = (blocks * inv).astype(np.float64)       # float32 product, exact in float64
    q = np.sign(prod) * np.floor(np.abs(prod) + 0.5)
    return d.astype(np.float16).ravel(), q.astype(np.int8)


def test_q8_0_blocks_are_ggmls_bit_for_bit_and_dequantize_within_their_bound(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = model_for(tok, C=64, L=1)
    views = model.state_views()
    views["transformer.h.0.attn.c_attn.weight"][3, :32] = 0.0       # an all-zero block
    views["transformer.h.0.attn.c_attn.weight"][4, 5] = 1.5          # a large outlier
    export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert value(r, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    got = tensors(r)
    names = {"token_embd.weight": "transformer.wte.weight",
             "blk.0.attn_qkv.weight": "transformer.h.0.attn.c_attn.weight",
             "blk.0.ffn_down.weight": "transformer.h.0.mlp.c_proj.weight"}
    for name, ours in names.items():
        t, x = got[name], views[ours]
        assert t.tensor_type == Q.Q8_0 and list(t.shape) == list(x.shape[::-1])
        raw = np.frombuffer(t.data.tobytes(), np.uint8).reshape(-1, 34)   # 2 + 32 bytes
        assert raw.shape[0] == x.size // 32
        d = raw[:, :2].copy().view(np.float16).ravel()
        q = raw[:, 2:].copy().view(np.int8)
        want_d, want_q = _q8_0_reference(x)
        np.testing.assert_array_equal(d, want_d)
        np.testing.assert_array_equal(q, want_q)
        back = (q.astype(np.float32) * d.astype(np.float32)[:, None]).reshape(x.shape)
        amax = np.abs(x.reshape(-1, 32)).max(axis=1)
        # rounding: half a step; the fp16 scale: its relative error 2^-11, times |q| <= 127
        bound = (amax / 127 * (0.5 + 127 * 2.0 ** -11))[:, None] + 1e-12
        assert np.all(np.abs(back.reshape(-1, 32) - x.reshape(-1, 32)) <= bound)
        assert np.abs(back - x).max() > 0           # it is quantized
    for name in ("position_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_qkv.bias"):
        assert got[name].tensor_type == Q.F32


def test_q8_0_rows_not_a_multiple_of_32_fall_back_to_f16_with_a_note(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = model_for(tok, C=48, L=1, H=2)
    notes = export_gguf(model, tok, tmp_path / "m.gguf", "q8_0")
    assert any("f16" in n for n in notes)
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert got["blk.0.attn_qkv.weight"].tensor_type == Q.F16       # rows of 48
    assert got["blk.0.ffn_down.weight"].tensor_type == Q.Q8_0      # rows of 192
    np.testing.assert_array_equal(
        got["blk.0.attn_qkv.weight"].data,
        model.state_views()["transformer.h.0.attn.c_attn.weight"].astype(np.float16))


# --------------------------------------------------------------------------- tokenizers


def test_a_gpt2_folder_exports_with_gpt2s_vocabulary_merges_and_end_of_text(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    make_folder(str(folder), n_positions=32, n_embd=32, n_layer=1, n_head=2)
    out = tmp_path / "gpt2.gguf"
    assert main(["export", str(folder), "--to", str(out)]) == 0
    from femtogpt.files.hf import load_hf
    model, tok = load_hf(str(folder))
    r = gguf.GGUFReader(out)
    assert value(r, "tokenizer.ggml.model") == "gpt2"
    assert value(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens = value(r, "tokenizer.ggml.tokens")
    vocab = tok.vocab_json()
    assert len(tokens) == model.config.vocab_size and all(vocab[t] == i
                                                          for i, t in enumerate(tokens))
    eot = tok.specials["<|endoftext|>"]
    assert value(r, "tokenizer.ggml.bos_token_id") == eot == value(r, "tokenizer.ggml.eos_token_id")
    types = value(r, "tokenizer.ggml.token_type")
    assert types[eot] == gguf.TokenType.CONTROL
    assert types.count(gguf.TokenType.NORMAL) == len(types) - 1
    merges = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    assert value(r, "tokenizer.ggml.merges") == [m for m in merges if m]
    assert value(r, "tokenizer.ggml.add_bos_token") is False
    # each normal token spells its bytes in GPT-2's byte-to-unicode alphabet
    back = {c: b for b, c in enumerate(bytes_to_unicode())}
    for i in range(0, len(tokens), 7):
        if i != eot:
            assert bytes(back[c] for c in tokens[i]) == tok.decode_bytes([i])


def _rwkv_unescape(token):
    """llama.cpp's llama_unescape_rwkv_token, as written there."""
    out, i = bytearray(), 0
    while i < len(token):
        c = token[i]
        if c == "\\":
            c = token[i + 1]
            if c == "x":        # two hex digits, read as llama.cpp reads them (lower case)
                hi, lo = (ord(h) - ord("a") + 10 if h >= "a" else ord(h) - ord("0")
                          for h in token[i + 2:i + 4])
                out.append((hi << 4) + lo & 0xFF)
                i += 4
                continue
            out += {"t": b"\t", "n": b"\n", "r": b"\r"}.get(c, c.encode())
            i += 2
            continue
        out += c.encode("utf-8")
        i += 1
    return bytes(out)


def _greedy_longest_match(tokens, data):
    """llama.cpp's rwkv tokenizer: at each byte, the longest token that matches."""
    by_bytes = {t: i for i, t in enumerate(tokens)}
    longest = max(map(len, tokens))
    ids, pos = [], 0
    while pos < len(data):
        for n in range(min(longest, len(data) - pos), 0, -1):
            if data[pos:pos + n] in by_bytes:
                ids.append(by_bytes[data[pos:pos + n]])
                pos += n
                break
        else:
            raise AssertionError(f"no token at byte {pos}")
    return ids


@pytest.mark.parametrize("tok", [ByteTokenizer(), CharTokenizer.from_text(TEXT)],
                         ids=["byte", "char"])
def test_byte_and_char_tokenizers_become_an_rwkv_vocabulary_that_gives_our_ids(tmp_path, tok):
    export_gguf(model_for(tok, C=32, L=1), tok, tmp_path / "m.gguf", "f32")
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    assert value(r, "tokenizer.ggml.model") == "rwkv"
    tokens = value(r, "tokenizer.ggml.tokens")
    assert all(t.isascii() for t in tokens)                # escapes: no raw bytes
    raw = [_rwkv_unescape(t) for t in tokens]
    assert raw == [tok.decode_bytes([i]) for i in range(tok.vocab_size)]
    assert _greedy_longest_match(raw, TEXT.encode("utf-8")) == tok.encode(TEXT)
    # no end-of-text: llama.cpp's rwkv vocabulary then has none (a BPE one would take id 11)
    assert "tokenizer.ggml.eos_token_id" not in r.fields
    assert set(value(r, "tokenizer.ggml.token_type")) == {int(gguf.TokenType.NORMAL)}


def test_femtogpts_bpe_split_is_not_gpt2s_which_is_why_it_is_refused():
    from femtogpt.text.bpe import _PRESPLIT
    assert _PRESPLIT.findall("'tis I'll") == ["'", "tis", " I", "'", "ll"]
    assert gpt2_pattern().findall("'tis I'll") == ["'t", "is", " I", "'ll"]
    bpe = BPETokenizer.train(TEXT, 300)
    with pytest.raises(ConfigError, match=r"bpe tokenizer cannot be written to GGUF.*'tis"):
        gguf_file.gguf_vocabulary(bpe)


# --------------------------------------------------------------------------- the command, refusals


@pytest.fixture
def char_run(tmp_path):
    """A checkpoint file of a small char model (tanh GELU, biases)."""
    tok = CharTokenizer.from_text(TEXT)
    model = model_for(tok, C=32, L=1)
    path = tmp_path / "model.safetensors"
    save_checkpoint(str(path), model.state_views(), model_meta(model, tok))
    return path


def _refused(capsys, argv, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("femtogpt: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def _leftovers(folder):
    return sorted(n for n in os.listdir(folder) if ".tmp-" in n)


def test_bad_dtype_and_unmappable_models_get_one_line_and_no_file(tmp_path, capsys, char_run):
    out = tmp_path / "x.gguf"
    _refused(capsys, ["export", str(char_run), "--to", str(out), "--dtype", "int4"],
             r"--dtype int4 .*f32, bf16, q8_0")
    _refused(capsys, ["export", str(char_run), "--to", str(tmp_path / "hf"), "--dtype", "bf16"],
             r"--dtype bf16 is for a GGUF file")
    bpe = BPETokenizer.train(TEXT, 300)
    bpe_model = model_for(bpe, C=32, L=1)
    save_checkpoint(str(tmp_path / "bpe.safetensors"), bpe_model.state_views(),
                    model_meta(bpe_model, bpe))
    _refused(capsys, ["export", str(tmp_path / "bpe.safetensors"), "--to", str(out)],
             r"bpe tokenizer cannot be written to GGUF")
    exact = model_for(ByteTokenizer(), C=32, L=1, gelu="exact")
    save_checkpoint(str(tmp_path / "exact.safetensors"), exact.state_views(),
                    model_meta(exact, ByteTokenizer()))
    _refused(capsys, ["export", str(tmp_path / "exact.safetensors"), "--to", str(out)],
             r"exact GELU.*--gelu tanh")
    assert not out.exists() and not (tmp_path / "hf").exists() and _leftovers(tmp_path) == []


def test_unwritable_and_existing_targets_are_refused_and_left_as_they_were(tmp_path, capsys,
                                                                          char_run):
    _refused(capsys, ["export", str(char_run), "--to", str(tmp_path / "no" / "x.gguf")],
             r"does not exist")
    (tmp_path / "dir.gguf").mkdir()
    _refused(capsys, ["export", str(char_run), "--to", str(tmp_path / "dir.gguf")],
             r"is a folder")
    existing = tmp_path / "old.gguf"
    existing.write_bytes(b"keep me")
    _refused(capsys, ["export", str(char_run), "--to", str(existing)], r"exists.*--overwrite")
    assert existing.read_bytes() == b"keep me"
    assert main(["export", str(char_run), "--to", str(existing), "--overwrite",
                 "--dtype", "q8_0"]) == 0
    assert value(gguf.GGUFReader(existing), "general.file_type") == 7
    assert _leftovers(tmp_path) == []


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path, capsys,
                                                                         char_run, monkeypatch):
    existing = tmp_path / "m.gguf"
    existing.write_bytes(b"previous")

    def disk_full(self, *args, **kwargs):
        for f in self.fout:
            f.write(b"\0" * 1000)           # some bytes reach the temporary file first
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    _refused(capsys, ["export", str(char_run), "--to", str(existing), "--overwrite"],
             r"could not write .*No space left on device")
    assert existing.read_bytes() == b"previous" and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- llama.cpp itself


def test_llama_cpp_binding_continues_as_femtogpt_does(tmp_path):
    """Only where llama-cpp-python is installed (never the only test of the file)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = ByteTokenizer()
    model = model_for(tok, C=64, L=2, T=64)
    export_gguf(model, tok, tmp_path / "m.gguf", "f32")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, verbose=False)
    prompt = b"First Citizen:"
    ids = llm.tokenize(prompt, add_bos=False)
    assert ids == tok.encode(prompt.decode())
    ours = model.generate(np.array([ids]), 16, temperature=0.0)[0, len(ids):].tolist()
    theirs = []
    llm.eval(ids)
    for _ in range(16):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs.append(nxt)
        llm.eval([nxt])
    assert theirs == ours
