"""Hugging Face GPT-2 folders (femtogpt/hf.py) and GPT-2's tokenizer (gpt2_tokenizer.py).

The folders are made here, without transformers: config.json, a
model.safetensors in Hugging Face's names and Conv1D (in, out) layout written
by the safetensors library, and vocab.json / merges.txt spelled from a small
BPE of our own with GPT-2's byte-to-unicode mapping and a shuffled id order.
Where transformers and torch are installed, a parity test compares logits with
GPT2LMHeadModel (skipped otherwise).
"""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

import femtogpt
from femtogpt.errors import CheckpointError, ConfigError
from femtogpt.text.gpt2 import GPT2Tokenizer, bytes_to_unicode, gpt2_pattern
from femtogpt.files.hf import TRANSPOSED, export_hf, load_hf
from femtogpt.model import GPT, GPTConfig
from femtogpt.text import BPETokenizer, CharTokenizer, tokenizer_from_dict

st = pytest.importorskip("safetensors.numpy")

TEXT = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. "
        "You are all resolved rather to die than to famish? We're resolved; they'll see. "
        "naïve café, Ελληνικά, русский, 日本語, emoji 😀 and numbers 1234 ½ ²\n\n") * 8


def gpt2_files(folder, vocab_size=330, seed=0):
    """vocab.json and merges.txt for a BPE trained on TEXT, with GPT-2's spelling
    and ids permuted (so that an implementation assuming byte b is id b fails).
    Returns {internal id: external id} and the BPE."""
    bpe = BPETokenizer.train(TEXT, vocab_size)
    n = bpe.vocab_size
    perm = np.random.default_rng(seed).permutation(n + 1)      # + <|endoftext|>
    to_char = bytes_to_unicode()
    spell = lambda i: "".join(to_char[b] for b in bpe.token_bytes(i))  # noqa: E731
    vocab = {spell(i): int(perm[i]) for i in range(n)}
    vocab["<|endoftext|>"] = int(perm[n])
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in bpe.merges:
            f.write(f"{spell(a)} {spell(b)}\n")
    return perm, bpe


def hf_config(V, T=16, L=2, H=2, C=16, **extra):
    return {"model_type": "gpt2", "vocab_size": V, "n_positions": T, "n_embd": C,
            "n_layer": L, "n_head": H, "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5, "n_inner": None, **extra}


def make_folder(folder, prefix="transformer.", dtype=np.float32, config_extra=None,
                shards=False, with_buffers=True, lm_head="absent", seed=1, **cfg):
    """A tiny GPT-2 folder; returns the femtogpt model it should load as."""
    os.makedirs(folder, exist_ok=True)
    perm, _ = gpt2_files(folder)
    V = len(perm)
    config = hf_config(V, **cfg)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**config, **(config_extra or {})}, f)
    model = GPT(GPTConfig(vocab_size=V, block_size=config["n_positions"],
                          n_layer=config["n_layer"], n_head=config["n_head"],
                          n_embd=config["n_embd"], bias=True, gelu="tanh"), seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.state_views().values():      # non-trivial biases and LN weights too
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.05
    tensors = {}
    for name, value in model.state_dict().items():
        value = value.T.copy() if name.endswith(TRANSPOSED) else value
        key = prefix + name[len("transformer."):]
        if dtype == "bf16":
            bits = value.astype(np.float32).view(np.uint32)
            tensors[key] = (bits >> 16).astype(np.uint16)
        else:
            tensors[key] = value.astype(dtype)
    if with_buffers:
        T = config["n_positions"]
        for layer in range(config["n_layer"]):
            tensors[f"{prefix}h.{layer}.attn.bias"] = np.tril(np.ones((1, 1, T, T), np.float32))
    if lm_head == "tied":
        tensors["lm_head.weight"] = tensors[prefix + "wte.weight"].copy()
    elif lm_head == "untied":
        tensors["lm_head.weight"] = tensors[prefix + "wte.weight"] + 1
    if dtype == "bf16":
        _save_bf16(tensors, os.path.join(folder, "model.safetensors"))
    elif shards:
        names = sorted(tensors)
        half = len(names) // 2
        parts = {"model-00001-of-00002.safetensors": names[:half],
                 "model-00002-of-00002.safetensors": names[half:]}
        for file, keys in parts.items():
            st.save_file({k: tensors[k] for k in keys}, os.path.join(folder, file),
                         metadata={"format": "pt"})
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: file for file, keys in parts.items()
                                                      for k in keys}}, f)
    else:
        st.save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    if dtype in (np.float16, "bf16"):
        # What the file holds, widened back: the model it should load as.
        state = model.state_dict()
        for name in state:
            if dtype == np.float16:
                state[name] = state[name].astype(np.float16).astype(np.float32)
            else:
                state[name] = ((state[name].view(np.uint32) >> 16) << 16).view(np.float32)
        model.load_state_dict(state)
    return model


def _save_bf16(tensors, path):
    """A safetensors file with BF16 entries (numpy has no bfloat16: written by hand)."""
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, value in tensors.items():
        kind = "BF16" if value.dtype == np.uint16 else "F32"
        data = value.tobytes()
        header[name] = {"dtype": kind, "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded + b"".join(blobs))


def ids_for(model, n=12, T=None):
    T = T or model.config.block_size
    return np.random.default_rng(7).integers(0, model.config.vocab_size, size=(2, T))


# --------------------------------------------------------------------------- the tokenizer


def test_gpt2_tokenizer_gives_the_permuted_ids_of_the_same_bpe(tmp_path):
    perm, bpe = gpt2_files(tmp_path)
    tok = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert tok.vocab_size == bpe.vocab_size + 1
    # Words without contractions split the same way under both patterns.
    text = "Before we proceed any further, hear me speak"
    assert tok.encode(text) == [int(perm[i]) for i in bpe.encode(text)]
    assert tok.encode("<|endoftext|>") == [int(perm[-1])]
    for text in (TEXT, "We're they'll I'M 'S x'd", "\t tabs\u00a0nbsp\u2003 em  \n\n  ",
                 "a<|endoftext|>b<|endoftext|>", "", "日本語😀 ½²Ⅻ"):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.encode_array(text).tolist() == ids


def test_gpt2_pattern_is_openais():
    split = gpt2_pattern().findall
    assert split("We're here, they'll see 123abc  x\n\n y") == [
        "We", "'re", " here", ",", " they", "'ll", " see", " 123", "abc", " ", " x", "\n\n",
        " y"]
    # Contractions are lower-case only; letters and numbers by Unicode category.
    assert split("I'M Ⅻ½ naïve") == ["I", "'", "M", " Ⅻ½", " naïve"]
    # U+001C is not White_Space (Python's \s says it is; OpenAI's pattern does not).
    assert split("a\x1cb") == ["a", "\x1c", "b"]


def test_gpt2_tokenizer_round_trips_through_a_checkpoint_dict(tmp_path):
    gpt2_files(tmp_path)
    tok = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.vocab_json() == json.load(open(tmp_path / "vocab.json", encoding="utf-8"))
    assert again.merges_txt() == open(tmp_path / "merges.txt", encoding="utf-8").read()


@pytest.mark.parametrize("damage, message", [
    (lambda v, m: (dict(list(v.items())[1:]), m), "no token for byte"),
    (lambda v, m: (v, m + "zz qq\n"), "not in vocab.json"),
    (lambda v, m: (v, m + "a b c\n"), "two tokens"),
    (lambda v, m: ({**v, "<|endoftext|>": 5}, m), "already has"),
    (lambda v, m: ({**v, "<|endoftext|>": 99999}, m), "not exactly 0"),
])
def test_damaged_tokenizer_files_are_refused_by_name(tmp_path, damage, message):
    gpt2_files(tmp_path)
    vocab = json.load(open(tmp_path / "vocab.json", encoding="utf-8"))
    merges = open(tmp_path / "merges.txt", encoding="utf-8").read()
    vocab, merges = damage(vocab, merges)
    json.dump(vocab, open(tmp_path / "vocab.json", "w", encoding="utf-8"), ensure_ascii=False)
    open(tmp_path / "merges.txt", "w", encoding="utf-8").write(merges)
    with pytest.raises(femtogpt.TokenizerError, match=message):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")


# --------------------------------------------------------------------------- reading a folder


@pytest.mark.parametrize("layout", ["prefixed", "bare", "sharded", "tied_head", "no_buffers"])
def test_a_folder_loads_as_the_same_model(tmp_path, layout):
    kwargs = {"bare": {"prefix": ""}, "sharded": {"shards": True},
              "tied_head": {"lm_head": "tied"}, "no_buffers": {"with_buffers": False}}
    expected = make_folder(tmp_path, **kwargs.get(layout, {}))
    model, tok = femtogpt.load(tmp_path)
    assert isinstance(tok, GPT2Tokenizer) and model.config == expected.config
    for name, value in expected.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)
    x = ids_for(model)
    np.testing.assert_array_equal(model.forward(x)[0], expected.forward(x)[0])


@pytest.mark.parametrize("dtype", [np.float16, "bf16"])
def test_half_precision_files_are_widened(tmp_path, dtype):
    expected = make_folder(tmp_path, dtype=dtype)
    model, _ = load_hf(tmp_path)
    for name, value in expected.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value, err_msg=name)


@pytest.mark.parametrize("extra, message", [
    ({"activation_function": "relu"}, "activation_function is 'relu'"),
    ({"n_inner": 40}, "n_inner is 40"),
    ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"model_type": "llama"}, "model_type"),
    ({"n_layer": "2"}, "n_layer must be a positive integer"),
])
def test_configs_the_model_cannot_represent_are_refused_by_name(tmp_path, extra, message):
    make_folder(tmp_path, config_extra=extra)
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path)


def test_exact_gelu_config_loads_as_exact(tmp_path):
    make_folder(tmp_path, config_extra={"activation_function": "gelu"})
    model, _ = load_hf(tmp_path)
    assert model.config.gelu == "exact" and model.config.bias


def _rewrite_weights(folder, change):
    path = os.path.join(folder, "model.safetensors")
    tensors = st.load_file(path)
    change(tensors)
    st.save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"), "no tensor transformer.h.1.mlp.c_fc.bias"),
    (lambda t: t.update({"transformer.h.0.attn.c_attn.weight":
                         t["transformer.h.0.attn.c_attn.weight"].T.copy()}), "has shape"),
    (lambda t: t.update({"score.weight": np.zeros(3, np.float32)}), "unexpected tensor score"),
    (lambda t: t["transformer.wpe.weight"].__setitem__((0, 0), np.nan), "NaN"),
    (lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1}), "lm_head.weight"),
    (lambda t: t.update({"wte.weight": t["transformer.wte.weight"]}), "both"),
])
def test_mismatched_weights_are_refused_by_name(tmp_path, change, message):
    make_folder(tmp_path)
    _rewrite_weights(tmp_path, change)
    with pytest.raises(CheckpointError, match=message):
        load_hf(tmp_path)


def test_truncated_weights_and_bad_index_are_refused(tmp_path):
    make_folder(tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(tmp_path / "a")
    make_folder(tmp_path / "b", shards=True)
    index = tmp_path / "b" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["transformer.wte.weight"] = "../a/model.safetensors"
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="not a file name in this folder"):
        load_hf(tmp_path / "b")


class _Trap:
    """Unpickling this writes a file: proof that a pickle was opened."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_only_folder_is_refused_and_never_unpickled(tmp_path):
    make_folder(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    marker = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(str(marker)), f)
    with pytest.raises(CheckpointError, match="pickle.*can run any code.*save_pretrained"):
        load_hf(tmp_path)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "sample", "--out",
                           str(tmp_path), "--max-new-tokens", "3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.count("\n") == 1 and "pytorch_model.bin" in proc.stderr


# --------------------------------------------------------------------------- export


def test_import_export_import_is_exact(tmp_path):
    make_folder(tmp_path / "src")
    model, tok = load_hf(tmp_path / "src")
    assert export_hf(model, tok, tmp_path / "out") == []
    end = tok.specials["<|endoftext|>"]
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["bos_token_id"] == end and config["eos_token_id"] == end
    again, tok2 = load_hf(tmp_path / "out")
    assert again.config == model.config and tok2.to_dict() == tok.to_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name], value, err_msg=name)
    with pytest.raises(ConfigError, match="not empty.*--overwrite"):
        export_hf(model, tok, tmp_path / "out")
    assert export_hf(model, tok, tmp_path / "out", overwrite=True) == []
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_export_of_a_char_model_without_biases_writes_weights_and_says_what_is_left(tmp_path):
    model = GPT(GPTConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=8,
                          bias=False, gelu="exact"), seed=0)
    notes = export_hf(model, CharTokenizer("abcde"), tmp_path / "out")
    assert any("no Hugging Face equivalent" in n for n in notes)
    assert any("written as zeros" in n for n in notes)
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "model.safetensors"]
    tensors = st.load_file(str(tmp_path / "out" / "model.safetensors"))
    assert not tensors["transformer.h.0.mlp.c_fc.bias"].any()
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.c_fc.weight"],
                                  model.state_dict()["transformer.h.0.mlp.c_fc.weight"].T)
    config = json.load(open(tmp_path / "out" / "config.json"))
    assert config["activation_function"] == "gelu"
    # No end-of-text token in a char vocabulary: not GPT-2's 50256 by default.
    assert config["bos_token_id"] is None and config["eos_token_id"] is None


# --------------------------------------------------------------------------- command line


def test_sample_finetune_and_export_from_the_command_line(tmp_path):
    make_folder(tmp_path / "gpt2", T=32)
    (tmp_path / "my.txt").write_text(TEXT * 4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "femtogpt.app.cli", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=600, cwd=tmp_path)
    s1 = run("sample", "--out", "gpt2", "--prompt", "All:", "--max-new-tokens", "8", "--seed", "3")
    assert s1.returncode == 0, s1.stderr
    model, tok = load_hf(tmp_path / "gpt2")
    assert s1.stdout.startswith("All:")
    t = run("train", "--init-from", "gpt2", "--data", "my.txt", "--out", "ft", "--max-iters",
            "4", "--eval-interval", "2", "--block-size", "16", "--no-progress",
            "--sample-tokens", "0")
    assert t.returncode == 0, t.stderr
    assert "context cropped from 32 to 16" in t.stdout + t.stderr
    # nanoGPT's fine-tuning recipe for the settings not given, said at the start.
    assert "fine-tuning a pretrained GPT-2" in t.stdout + t.stderr
    from femtogpt.files.tensorfile import TensorFile
    with TensorFile(tmp_path / "ft" / "ckpt.safetensors") as f:
        saved = f.meta["train_config"]
    assert (saved["learning_rate"], saved["min_lr"], saved["warmup_iters"]) == (3e-5, 3e-5, 0)
    assert (saved["batch_size"], saved["grad_accum"], saved["max_iters"]) == (4, 4, 4)
    assert saved["tokenizer"] == "gpt2" and saved["block_size"] == 16
    ft, ft_tok = femtogpt.load(tmp_path / "ft")
    assert ft.config.block_size == 16 and ft_tok.to_dict() == tok.to_dict()
    np.testing.assert_array_equal(ft.state_dict()["transformer.wpe.weight"].shape, (16, 16))
    e = run("export", "ft", "--to", "ft-hf")
    assert e.returncode == 0, e.stderr
    back, _ = load_hf(tmp_path / "ft-hf")
    x = ids_for(back)
    np.testing.assert_array_equal(back.forward(x)[0], ft.forward(x)[0])
    again = run("export", "ft", "--to", "ft-hf")
    assert again.returncode == 2 and "--overwrite" in again.stderr


# --------------------------------------------------------------------------- parity with transformers


def test_logits_match_transformers_gpt2(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    make_folder(tmp_path / "src", T=24)
    model, tok = load_hf(tmp_path / "src")
    reference = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "src")).eval()
    x = ids_for(model)
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).logits.numpy()
    np.testing.assert_allclose(model.forward(x)[0], want, atol=2e-5, rtol=0)
    export_hf(model, tok, tmp_path / "out")
    exported = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "out")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(exported(torch.from_numpy(x)).logits.numpy(), want,
                                   atol=2e-5, rtol=0)


def test_ids_match_huggingface_tokenizers(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    gpt2_files(tmp_path)
    ours = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    theirs = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")))
    theirs.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    theirs.add_special_tokens(["<|endoftext|>"])
    for text in (TEXT, "We're they'll I'M 'S x'd", "\t tabs\u00a0nbsp\u2003 em  \n\n  ",
                 "a<|endoftext|>b", "日本語😀 ½²Ⅻ \x1c\x1f"):
        assert ours.encode(text) == theirs.encode(text).ids, text


def _tokenizer_json(folder, merges_as_pairs):
    vocab = json.load(open(folder / "vocab.json", encoding="utf-8"))
    lines = open(folder / "merges.txt", encoding="utf-8").read().split("\n")[1:]
    merges = [line.split(" ") if merges_as_pairs else line for line in lines if line]
    special = vocab.pop("<|endoftext|>")
    return {"version": "1.0", "normalizer": None,
            "added_tokens": [{"id": special, "content": "<|endoftext|>", "special": True}],
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                              "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "vocab": vocab, "merges": merges}}


@pytest.mark.parametrize("merges_as_pairs", [False, True])
def test_tokenizer_json_gives_the_same_tokenizer(tmp_path, merges_as_pairs):
    gpt2_files(tmp_path)
    want = GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    d = _tokenizer_json(tmp_path, merges_as_pairs)
    (tmp_path / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False), encoding="utf-8")
    got = GPT2Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
    assert got.to_dict() == want.to_dict()
    # A folder with only tokenizer.json loads with it.
    make_folder(tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(_tokenizer_json(
        tmp_path / "m", merges_as_pairs), ensure_ascii=False), encoding="utf-8")
    expected = GPT2Tokenizer.from_files(tmp_path / "m" / "vocab.json", tmp_path / "m" / "merges.txt")
    os.remove(tmp_path / "m" / "vocab.json")
    os.remove(tmp_path / "m" / "merges.txt")
    _, tok = load_hf(tmp_path / "m")
    assert tok.to_dict() == expected.to_dict()
    # Another pre-split (here: a prefix space) is not GPT-2's tokenizer.
    d["pre_tokenizer"]["add_prefix_space"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(d), encoding="utf-8")
    with pytest.raises(femtogpt.TokenizerError, match="pre_tokenizer is not GPT-2's"):
        GPT2Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")


def test_fast_pre_split_equals_openais_pattern_on_text_it_takes():
    # The encoder splits with \w-style classes unless the text holds one of the
    # characters whose class differs; on any other text both patterns must agree.
    from femtogpt.text.gpt2 import _FAST_PATTERN, _fast_pattern_differs
    differs = _fast_pattern_differs()
    assert {"\x1c", "²", "½", "Ⅻ"} <= differs and not {"a", "1", " ", "_", "é"} & differs
    rng = np.random.default_rng(0)
    pool = [chr(c) for c in rng.integers(0x20, 0x30000, 4000)
            if not 0xD800 <= c <= 0xDFFF and chr(c) not in differs]
    pool += list(" \t\n\u00a0\u3000'sdtlmrve_-.,!?0123456789") * 20
    for _ in range(200):
        text = "".join(rng.choice(pool, size=int(rng.integers(1, 60))))
        assert _FAST_PATTERN.findall(text) == gpt2_pattern().findall(text), repr(text)


def test_finetune_flags_and_their_refusals(tmp_path):
    make_folder(tmp_path / "gpt2", T=32)
    (tmp_path / "my.txt").write_text(TEXT * 4)
    run = lambda *a: subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "train",  # noqa: E731
                                     "--init-from", "gpt2", "--data", "my.txt", "--no-progress",
                                     "--sample-tokens", "0", "--max-iters", "2", *a],
                                    capture_output=True, text=True, timeout=600, cwd=tmp_path)
    # A context longer than the model's is refused, not cut silently.
    long = run("--out", "a", "--block-size", "64")
    assert long.returncode == 2 and "--block-size 64 is more than the context" in long.stderr
    assert not (tmp_path / "a").exists()
    # A fine-tuning rate below the presets' min_lr: constant at the rate given.
    low = run("--out", "b", "--learning-rate", "1e-5", "--block-size", "16")
    assert low.returncode == 0, low.stderr
    from femtogpt.files.tensorfile import TensorFile
    with TensorFile(tmp_path / "b" / "ckpt.safetensors") as f:
        saved = f.meta["train_config"]
    assert saved["learning_rate"] == saved["min_lr"] == 1e-5 and saved["block_size"] == 16
    # Exporting a run over itself would delete it: refused, the run intact.
    before = sorted(os.listdir(tmp_path / "b"))
    over = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "export", "b", "--to", "b",
                           "--overwrite"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert over.returncode == 2 and "holds the model being exported" in over.stderr
    assert sorted(os.listdir(tmp_path / "b")) == before


@pytest.mark.parametrize("what", ["activation list", "deep vocab", "long integer",
                                  "merges not a list", "subword prefix"])
def test_malformed_files_are_refused_with_one_error(tmp_path, what):
    make_folder(tmp_path)
    if what == "activation list":
        d = json.load(open(tmp_path / "config.json"))
        d["activation_function"] = ["gelu"]
        json.dump(d, open(tmp_path / "config.json", "w"))
        with pytest.raises(CheckpointError, match="activation_function"):
            load_hf(tmp_path)
    elif what == "deep vocab":
        (tmp_path / "vocab.json").write_text("[" * 200000)
        with pytest.raises(CheckpointError, match="vocab.json"):
            load_hf(tmp_path)
    elif what == "long integer":
        (tmp_path / "config.json").write_text('{"n_layer": ' + "9" * 5000 + "}")
        with pytest.raises(CheckpointError, match="config.json"):
            load_hf(tmp_path)
    else:
        d = _tokenizer_json(tmp_path, False)
        if what == "merges not a list":
            d["model"]["merges"] = 5
        else:
            d["model"]["continuing_subword_prefix"] = "##"
        (tmp_path / "tokenizer.json").write_text(json.dumps(d, ensure_ascii=False))
        with pytest.raises(femtogpt.TokenizerError,
                           match="must be lists" if what == "merges not a list"
                           else "continuing_subword_prefix"):
            GPT2Tokenizer.from_tokenizer_json(tmp_path / "tokenizer.json")
