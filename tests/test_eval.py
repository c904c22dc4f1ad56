"""`femtogpt eval` (femtogpt/app/evaluate.py) against direct computations.

The reference here scores each window from the model's logits in float64, so
that the windows (non-overlapping, the last one shorter, every token but the
first scored once), the batching, and the formulas for bits per token and per
character are each checked by numbers a wrong implementation would miss. The
default text must be exactly the held-out split that training evaluated: the
last 10% of the corpus' characters, tokenized with the run's tokenizer.
"""
import json
import math
import shutil

import numpy as np
import pytest

import femtogpt
from femtogpt.app.cli import main
from femtogpt.app.evaluate import window_loss
from femtogpt.model import GPT, GPTConfig
from femtogpt.text import CharTokenizer

TEXT = "".join(f"{w} the quick brown fox, line {i}; jumps over the lazy dog.\n"
               for i, w in enumerate(["First", "Second", "Third", "ROMEO:"] * 30))
TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "4", "--eval-interval", "10", "--eval-iters", "2",
        "--save-interval", "10", "--no-progress", "--threads", "1", "--sample-tokens", "0"]


@pytest.fixture(autouse=True)
def _one_thread():
    saved = femtogpt.get_num_threads()
    femtogpt.set_num_threads(1)
    yield
    femtogpt.set_num_threads(saved)


def reference_loss(model, ids):
    """Mean cross-entropy, float64 from the logits, over non-overlapping windows of
    block_size predictions, each token after the first scored once."""
    T = model.config.block_size
    nll = []
    for start in range(0, len(ids) - 1, T):
        x = np.asarray(ids[start:start + T])
        y = np.asarray(ids[start + 1:start + T + 1])
        x = x[:len(y)]
        logits, _ = model.forward(x[None, :])
        z = logits[0].astype(np.float64)
        logp = z - z.max(axis=1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
        nll += list(-logp[np.arange(len(y)), y])
    return float(np.mean(nll)), len(nll)


def test_window_loss_is_the_mean_over_every_token_in_non_overlapping_windows():
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=2, n_head=2,
                          n_embd=32), seed=5).eval()
    rng = np.random.default_rng(0)
    for view in model.state_views().values():      # far from uniform: tokens' losses differ
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    ids = tok.encode(TEXT[:16 * 7 + 6])             # 7 full windows and a short one
    want, n = reference_loss(model, ids)
    assert n == len(ids) - 1
    for per_batch in (None, 1, 3):                 # batching does not change the figure
        loss, tokens = window_loss(model, ids, per_batch)
        assert tokens == n
        assert loss == pytest.approx(want, rel=2e-6)
    # the shorter last window counts: without it the figure is another
    assert abs(reference_loss(model, ids[:16 * 7 + 1])[0] - want) > 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    data = root / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    out = root / "run"
    saved = femtogpt.get_num_threads()
    try:
        assert main(["train", "--data", str(data), "--out", str(out), "--max-iters", "20",
                     "--learning-rate", "1e-2", *TINY]) == 0
    finally:
        femtogpt.set_num_threads(saved)
    return data, out


def _eval_json(capsys, *argv):
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_default_text_is_the_runs_held_out_split(run, capsys):
    data, out = run
    model, tok = femtogpt.load(str(out))
    val_text = TEXT[int(len(TEXT) * 0.9):]         # training's split: the last 10% of characters
    want, n = reference_loss(model, tok.encode(val_text))
    r = _eval_json(capsys, "--out", str(out))
    assert (r["tokens"], r["chars"]) == (n, len(val_text))
    assert r["loss"] == pytest.approx(want, rel=2e-6)
    assert r["bits_per_token"] == pytest.approx(want / math.log(2), rel=2e-6)
    assert r["bits_per_char"] == pytest.approx(want * n / (len(val_text) * math.log(2)),
                                               rel=2e-6)
    assert r["perplexity"] == pytest.approx(math.exp(want), rel=2e-6)
    assert r["dtype"] == "fp32" and r["threads"] == 1 and r["seconds"] >= 0
    assert r["windows"] == -(-n // 8) and r["block_size"] == 8
    # the same split, rebuilt the same way, when the run's token cache is gone
    shutil.rmtree(out / "cache")
    again = _eval_json(capsys, "--out", str(out))
    assert (again["loss"], again["tokens"], again["chars"]) == (r["loss"], n, len(val_text))
    # a checkpoint file of the run finds its run's split too
    best = _eval_json(capsys, "--out", str(out / "best.safetensors"))
    assert best["loss"] == r["loss"]


def test_data_is_evaluated_whole_with_the_models_tokenizer(run, capsys, tmp_path):
    _, out = run
    model, tok = femtogpt.load(str(out))
    text = TEXT[100:900]
    (tmp_path / "a.txt").write_text(text[:300], encoding="utf-8")
    (tmp_path / "b.txt").write_text(text[300:], encoding="utf-8")
    want, n = reference_loss(model, tok.encode(text))
    r = _eval_json(capsys, "--out", str(out), "--data", str(tmp_path))   # a folder: a + b
    assert (r["tokens"], r["chars"]) == (n, len(text))
    assert r["loss"] == pytest.approx(want, rel=2e-6)
    # the human-readable line says the same
    assert main(["eval", "--out", str(out), "--data", str(tmp_path / "a.txt")]) == 0
    line = capsys.readouterr().out
    assert "bits/char" in line and "299 tokens, 300 characters" in line


def test_a_hugging_face_folder_evaluates_on_data_only(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from test_hf import TEXT as HF_TEXT, make_folder
    folder = tmp_path / "gpt2"
    model = make_folder(str(folder), n_positions=16, n_embd=16, n_layer=1, n_head=2)
    (tmp_path / "t.txt").write_text(HF_TEXT, encoding="utf-8")
    _, tok = femtogpt.load(str(folder))
    want, n = reference_loss(model.eval(), tok.encode(HF_TEXT))
    r = _eval_json(capsys, "--out", str(folder), "--data", str(tmp_path / "t.txt"))
    assert r["tokens"] == n and r["loss"] == pytest.approx(want, rel=2e-6)
    assert main(["eval", "--out", str(folder)]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "give --data" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int4"], "--dtype int4 is not one of fp32, bf16, int8"),
    (["--data", "/nonexistent/text.txt"], "/nonexistent/text.txt"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_bad_input_gets_one_line_and_status_2(run, capsys, argv, message):
    _, out = run
    assert main(["eval", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("femtogpt: error: ") and message in err[0]


def test_text_the_char_tokenizer_lacks_is_refused_by_name(run, capsys, tmp_path):
    _, out = run
    (tmp_path / "z.txt").write_text("zebra ÆØÅ", encoding="utf-8")
    assert main(["eval", "--out", str(out), "--data", str(tmp_path / "z.txt")]) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "--data" in err[0]


def test_dtype_is_the_sampling_weights_type_whatever_the_model_trained_in(tmp_path, capsys):
    from femtogpt.files.checkpoint import model_meta, save_checkpoint
    tok = CharTokenizer.from_text(TEXT)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2,
                          n_embd=32, dtype="bf16"), seed=2)
    rng = np.random.default_rng(1)
    for view in model.state_views().values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.3
    save_checkpoint(str(tmp_path / "m.safetensors"), model.state_views(),
                    model_meta(model, tok))
    (tmp_path / "t.txt").write_text(TEXT[:500], encoding="utf-8")
    args = ["--out", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "t.txt")]
    got = {d: _eval_json(capsys, *args, "--dtype", d) for d in ("fp32", "bf16", "int8")}
    ids = tok.encode(TEXT[:500])
    for dtype, r in got.items():
        # the model as sampling at that type computes it (the bf16 run's own
        # training arithmetic is not what eval measures)
        ref, _ = femtogpt.load(str(tmp_path / "m.safetensors"), dtype=dtype)
        want, _ = reference_loss(ref, ids)
        assert r["dtype"] == dtype and r["loss"] == pytest.approx(want, rel=2e-6)
    for dtype in ("bf16", "int8"):
        assert 0 < abs(got[dtype]["loss"] - got["fp32"]["loss"]) < 1e-2 * got["fp32"]["loss"]
