"""Training: the loop, the learning-rate schedule, AdamW, clipping, checkpoints, resume.

Everything runs on tiny models (1 layer, 16 wide, context 8) and a small
repetitive text, at one OpenMP thread, so that runs are fast and bit-for-bit
reproducible. The subprocess tests kill a real `femtogpt train` (SIGKILL, and
SIGINT / Ctrl-C) mid-run and check that running the same command again ends
with exactly the weights of an uninterrupted run.
"""
import errno
import glob
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace

import numpy as np
import pytest

import femtogpt
from femtogpt import _core
from femtogpt.files import tensorfile as checkpoint_module
from femtogpt import train as train_module
from femtogpt.files.checkpoint import load_checkpoint, save_checkpoint
from femtogpt.errors import CheckpointError, ConfigError
from femtogpt.train import AdamW, Run, TrainConfig, get_lr, grad_norm, train
from femtogpt.train.batches import get_batch

TEXT = "the quick brown fox jumps over the lazy dog.\n" * 40
VOCAB = sorted(set(TEXT))
METRIC_KEYS = {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "val_bpc"}
TIMING_KEYS = {"tokens_per_s", "elapsed_s"}
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))


@pytest.fixture(autouse=True)
def _restore_threads():
    # TrainConfig(threads=1) sets the core's thread count for the whole process.
    saved = femtogpt.get_num_threads()
    yield
    femtogpt.set_num_threads(saved)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def tiny(tmp_path, data, out="run", **overrides):
    values = dict(data=data, out=str(tmp_path / out), n_layer=1, n_head=2, n_embd=16,
                  block_size=8, batch_size=4, max_iters=20, eval_interval=5, eval_iters=3,
                  save_interval=5, warmup_iters=4, learning_rate=1e-2, min_lr=1e-3,
                  threads=1, sample_tokens=0, seed=7)
    values.update(overrides)
    return TrainConfig(**values)


def quiet_train(cfg, **kwargs):
    with open(os.devnull, "w") as sink:
        return train(cfg, progress=False, stream=sink, **kwargs)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def assert_same_training_state(dir_a, dir_b):
    """Two run directories hold bit-identical training states, best models and metrics."""
    ta, ma = load_checkpoint(os.path.join(dir_a, "ckpt.safetensors"))
    tb, mb = load_checkpoint(os.path.join(dir_b, "ckpt.safetensors"))
    assert_same_tensors(ta, tb)
    for key in ("iter", "optimizer_step", "best_val_loss", "rng_train", "rng_train_ranks",
                "world_size", "rng_eval", "dropout_seed", "dropout_calls", "model_config",
                "tokenizer"):
        assert ma[key] == mb[key], key
    ba, bma = load_checkpoint(os.path.join(dir_a, "best.safetensors"))
    bb, bmb = load_checkpoint(os.path.join(dir_b, "best.safetensors"))
    assert_same_tensors(ba, bb)
    assert (bma["iter"], bma["val_loss"]) == (bmb["iter"], bmb["val_loss"])
    assert without_timing(metrics(dir_a)) == without_timing(metrics(dir_b))


# --------------------------------------------------------------------------- the loop


def test_training_drives_val_loss_down_and_logs_every_eval(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=60, eval_interval=20, eval_iters=5)
    run = quiet_train(cfg)
    rows = metrics(cfg.out)
    assert [r["iter"] for r in rows] == [0, 20, 40, 60]
    for r in rows:
        assert set(r) == METRIC_KEYS
        # char tokenizer: one character per token, so bits/char = loss / ln 2
        assert r["val_bpc"] == pytest.approx(r["val_loss"] / math.log(2), rel=1e-12)
        assert r["lr"] == pytest.approx(get_lr(r["iter"], cfg), rel=1e-12)
    first, last = rows[0], rows[-1]
    # An untrained model (N(0, 0.02) weights) predicts nearly uniformly over the vocabulary.
    assert first["val_loss"] == pytest.approx(math.log(len(VOCAB)), abs=0.05)
    assert first["train_loss"] == pytest.approx(math.log(len(VOCAB)), abs=0.05)
    # This text is one sentence repeated: a tiny model learns most of it.
    assert last["val_loss"] < 0.6 * first["val_loss"]
    assert last["train_loss"] < 0.6 * first["train_loss"]
    assert run.iter == 60 and run.interrupted is False
    assert run.best_val_loss == min(r["val_loss"] for r in rows)
    assert run.metrics == rows


def test_val_bpc_counts_characters_not_tokens(tmp_path):
    # Byte tokenizer on 2-byte characters: two tokens per character, so bits per
    # character are twice the per-token loss in bits.
    text = "éàüöß ñç\n"          # 9 characters, 16 bytes
    path = tmp_path / "utf8.txt"
    path.write_text(text * 30, encoding="utf-8")
    n_bytes = len((text * 30).encode())
    n_train = int(n_bytes * 0.9)
    val_bytes = (text * 30).encode()[n_train:]
    chars_per_token = len(val_bytes.decode("utf-8", errors="replace")) / len(val_bytes)
    cfg = tiny(tmp_path, str(path), tokenizer="byte", max_iters=5, eval_interval=5)
    quiet_train(cfg)
    for row in metrics(cfg.out):
        assert row["val_bpc"] == pytest.approx(row["val_loss"] / chars_per_token / math.log(2),
                                               rel=1e-12)
    assert chars_per_token < 0.6


# --------------------------------------------------------------------------- schedule


def test_get_lr_is_nanogpt_schedule():
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000)
    # linear warmup: (it + 1) / (warmup + 1) of the peak
    assert get_lr(0, cfg) == pytest.approx(1e-3 * 1 / 101, rel=1e-12)
    assert get_lr(49, cfg) == pytest.approx(1e-3 * 50 / 101, rel=1e-12)
    assert get_lr(99, cfg) == pytest.approx(1e-3 * 100 / 101, rel=1e-12)
    # cosine: the peak right after warmup, the middle value half way, min_lr at the end
    assert get_lr(100, cfg) == pytest.approx(1e-3, rel=1e-12)
    assert get_lr(1050, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-12)
    quarter = 100 + 1900 // 4     # ratio 0.25: coefficient (1 + cos(pi/4)) / 2
    assert get_lr(quarter, cfg) == pytest.approx(
        1e-4 + 0.5 * (1 + math.sqrt(0.5)) * 9e-4, rel=1e-12)
    assert get_lr(2000, cfg) == pytest.approx(1e-4, rel=1e-12)
    assert get_lr(5000, cfg) == pytest.approx(1e-4, rel=1e-12)
    # strictly decreasing through the decay
    values = [get_lr(it, cfg) for it in range(100, 2001, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_get_lr_without_warmup():
    cfg = TrainConfig(learning_rate=0.5, min_lr=0.1, warmup_iters=0, max_iters=10)
    assert get_lr(0, cfg) == pytest.approx(0.5, rel=1e-12)
    assert get_lr(5, cfg) == pytest.approx(0.3, rel=1e-12)
    assert get_lr(10, cfg) == pytest.approx(0.1, rel=1e-12)


# --------------------------------------------------------------------------- AdamW


def perturbed_run(tmp_path, data_file, **overrides):
    run = Run(tiny(tmp_path, data_file, **overrides), log=lambda message: None)
    rng = np.random.default_rng(3)
    model = run.model
    # Nonzero values everywhere a tensor lives (biases start at 0, LayerNorm at 1).
    for view in model.named_views(model.params_flat).values():
        view[...] = rng.standard_normal(view.shape).astype(np.float32)
    return run


def test_weight_decay_only_on_matrices_and_embeddings(tmp_path, data_file):
    run = perturbed_run(tmp_path, data_file, weight_decay=0.1)
    model = run.model
    before = model.state_dict()
    model.zero_grad()
    run.optimizer.step(lr=0.5)           # zero gradients: only the decay moves weights
    after = model.state_dict()
    decayed = set()
    for name, old in before.items():
        if old.ndim >= 2:
            decayed.add(name)
            np.testing.assert_allclose(after[name], old * (1 - 0.5 * 0.1), rtol=1e-6,
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(after[name], old, err_msg=name)
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight",
                       "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight",
                       "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"}


def test_adamw_matches_pytorch_formula(tmp_path, data_file):
    run = perturbed_run(tmp_path, data_file, weight_decay=0.1, beta1=0.9, beta2=0.99)
    model, opt = run.model, run.optimizer
    names = list(model.state_dict())
    rank = {n: v.ndim for n, v in model.state_dict().items()}
    p = {n: v.astype(np.float64) for n, v in model.state_dict().items()}
    m = {n: np.zeros_like(v) for n, v in p.items()}
    v2 = {n: np.zeros_like(v) for n, v in p.items()}
    rng = np.random.default_rng(11)
    for step, (lr, scale) in enumerate([(1e-2, 1.0), (3e-3, 0.25), (5e-2, 2.0)], start=1):
        grads = model.named_views(model.grads_flat)
        model.zero_grad()
        for name in names:
            grads[name][...] = rng.standard_normal(grads[name].shape).astype(np.float32)
        g = {n: grads[n].astype(np.float64) * scale for n in names}
        opt.step(lr, scale)
        for n in names:
            wd = 0.1 if rank[n] >= 2 else 0.0
            p[n] = p[n] * (1 - lr * wd)                     # torch.optim.AdamW: decay first
            m[n] = 0.9 * m[n] + 0.1 * g[n]
            v2[n] = 0.99 * v2[n] + 0.01 * g[n] ** 2
            m_hat = m[n] / (1 - 0.9 ** step)
            v_hat = v2[n] / (1 - 0.99 ** step)
            p[n] = p[n] - lr * m_hat / (np.sqrt(v_hat) + 1e-8)
        assert opt.step_count == step
        got = model.state_dict()
        for n in names:
            np.testing.assert_allclose(got[n], p[n], rtol=2e-5, atol=2e-6, err_msg=n)
        moments = opt.state_views()
        for n in names:
            np.testing.assert_allclose(moments["optimizer.exp_avg." + n], m[n], rtol=2e-5,
                                       atol=1e-7, err_msg=n)
            np.testing.assert_allclose(moments["optimizer.exp_avg_sq." + n], v2[n], rtol=2e-5,
                                       atol=1e-9, err_msg=n)


def test_grad_norm_is_float64_global_norm(tmp_path, data_file):
    run = perturbed_run(tmp_path, data_file)
    model = run.model
    rng = np.random.default_rng(5)
    model.grads_flat[:] = (rng.standard_normal(model.grads_flat.size) * 1e3).astype(np.float32)
    expected = math.sqrt(float(np.sum(model.grads_flat.astype(np.float64) ** 2)))
    assert grad_norm(model) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("clip", [0.0, 1e-3, 1e6])
def test_gradient_clipping_scales_the_gradient_adamw_sees(tmp_path, data_file, clip):
    run = Run(tiny(tmp_path, data_file, grad_clip=clip), log=lambda message: None)
    run.train_step()
    g = run.model.grads_flat.astype(np.float64)     # the step's raw gradient, still held
    norm = math.sqrt(float(np.sum(g ** 2)))
    assert norm > 1e-3                              # so that clip 1e-3 does clip
    expected_scale = clip / (norm + 1e-6) if 0 < clip < norm else 1.0
    # First AdamW step: exp_avg = (1 - beta1) * grad_scale * grad.
    np.testing.assert_allclose(run.optimizer.exp_avg, (1 - run.cfg.beta1) * expected_scale * g,
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(run.optimizer.exp_avg_sq,
                               (1 - run.cfg.beta2) * (expected_scale * g) ** 2,
                               rtol=1e-4, atol=1e-20)


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_holds_the_whole_training_state(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=12, eval_interval=4, save_interval=5)
    run = quiet_train(cfg)
    tensors, meta = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))
    state = run.model.state_dict()
    moments = run.optimizer.state_views()
    assert set(tensors) == set(state) | set(moments)
    assert set(moments) == ({"optimizer.exp_avg." + n for n in state}
                            | {"optimizer.exp_avg_sq." + n for n in state})
    assert_same_tensors({n: tensors[n] for n in state}, state)
    assert_same_tensors({n: tensors[n] for n in moments}, moments)
    assert np.any(moments["optimizer.exp_avg_sq.transformer.wte.weight"] != 0)
    assert meta["kind"] == "train_state"
    assert meta["iter"] == 12 and meta["optimizer_step"] == 12
    assert meta["rng_train"] == run.rng_train.bit_generator.state
    assert meta["rng_eval"] == run.rng_eval.bit_generator.state
    assert meta["train_config"] == asdict(run.cfg)
    assert meta["train_config"]["max_iters"] == 12
    assert meta["model_config"] == {"vocab_size": len(VOCAB), "block_size": 8, "n_layer": 1,
                                    "n_head": 2, "n_embd": 16, "dropout": 0.0,
                                    "bias": False, "gelu": "exact", "dtype": "fp32"}
    assert meta["tokenizer"] == {"type": "char", "chars": "".join(VOCAB)}
    rows = metrics(cfg.out)
    assert meta["best_val_loss"] == min(r["val_loss"] for r in rows)
    # best.safetensors: the model of the evaluation with the lowest val loss
    best_tensors, best_meta = load_checkpoint(os.path.join(cfg.out, "best.safetensors"))
    best_row = min(rows, key=lambda r: r["val_loss"])
    assert best_meta["kind"] == "model"
    assert (best_meta["iter"], best_meta["val_loss"]) == (best_row["iter"], best_row["val_loss"])
    assert set(best_tensors) == set(state)


def test_load_round_trips_every_tensor_and_the_tokenizer(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=10)
    run = quiet_train(cfg)
    model, tokenizer = femtogpt.load(os.path.join(cfg.out, "ckpt.safetensors"))
    assert_same_tensors(model.state_dict(), run.model.state_dict())
    assert model.config == run.model.config
    assert model.training is False
    assert tokenizer == run.tokenizer
    assert tokenizer.decode(tokenizer.encode(TEXT[:200])) == TEXT[:200]
    assert tokenizer.encode("abc") == [VOCAB.index(c) for c in "abc"]
    # A directory loads its best model.
    best, _ = femtogpt.load(cfg.out)
    best_tensors, _ = load_checkpoint(os.path.join(cfg.out, "best.safetensors"))
    assert_same_tensors(best.state_dict(), best_tensors)
    # ...and the loaded model computes what the trained one computes.
    idx = np.array([tokenizer.encode("the lazy")])
    run.model.eval()
    np.testing.assert_array_equal(model.forward(idx)[0], run.model.forward(idx)[0])


def test_save_latest_refuses_non_finite_weights(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=5)
    run = quiet_train(cfg)
    path = os.path.join(cfg.out, "ckpt.safetensors")
    saved = open(path, "rb").read()
    run.model.params_flat[0] = np.inf
    with pytest.raises(FloatingPointError, match="not finite"):
        run.save_latest()
    assert open(path, "rb").read() == saved


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, data_file, monkeypatch):
    cfg = tiny(tmp_path, data_file, max_iters=20, save_interval=5)
    names = ("best.safetensors", "ckpt.safetensors")
    real_write = checkpoint_module._write_durably
    writes, before = [], {}

    def write_then_fill_the_disk(path, parts):
        writes.append(path)
        if len(writes) <= 2:              # best at iteration 0, ckpt at iteration 5
            return real_write(path, parts)
        payload = b"".join(bytes(p) for p in parts)
        if not before:
            before.update({n: open(os.path.join(cfg.out, n), "rb").read() for n in names})
        with open(path, "wb") as f:      # half a file, then the disk is full
            f.write(payload[:len(payload) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "_write_durably", write_then_fill_the_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        quiet_train(cfg)
    assert len(writes) == 3
    for name in names:
        assert open(os.path.join(cfg.out, name), "rb").read() == before[name], name
    tensors, meta = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))
    assert meta["iter"] == 5
    assert load_checkpoint(os.path.join(cfg.out, "best.safetensors"))[1]["iter"] == 0
    # No half-written temp file is left behind next to them.
    # (loss.png too, where matplotlib is installed)
    assert sorted(set(os.listdir(cfg.out)) - {"loss.png"}) == [
        "best.safetensors", "cache", "ckpt.safetensors", "metrics.jsonl"]
    # ...and the run continues from the intact state.
    monkeypatch.setattr(checkpoint_module, "_write_durably", real_write)
    assert quiet_train(cfg).iter == 20


def test_non_finite_loss_stops_without_overwriting_the_checkpoint(tmp_path, data_file,
                                                                 monkeypatch):
    cfg = tiny(tmp_path, data_file, max_iters=20, save_interval=5, eval_interval=100)
    path = os.path.join(cfg.out, "ckpt.safetensors")
    original = Run.train_step
    snapshot = {}

    def poisoned_step(self, **kwargs):
        if self.iter == 7:
            snapshot["bytes"] = open(path, "rb").read()
            views = self.model.named_views(self.model.params_flat)
            views["transformer.ln_f.weight"][0] = np.inf
        return original(self, **kwargs)

    monkeypatch.setattr(Run, "train_step", poisoned_step)
    with pytest.raises(FloatingPointError, match="at iteration 7"):
        quiet_train(cfg)
    assert open(path, "rb").read() == snapshot["bytes"]
    tensors, meta = load_checkpoint(path)
    assert meta["iter"] == 5
    assert all(np.all(np.isfinite(t)) for t in tensors.values())


# --------------------------------------------------------------------------- resume


def interrupt_after(monkeypatch, k):
    """Ctrl-C (a real SIGINT to this process) right after iteration k's step."""
    original = Run.train_step

    def step(self, **kwargs):
        result = original(self, **kwargs)
        if self.iter == k:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Run, "train_step", step)


@pytest.mark.parametrize("k", [9, 10, 13])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, data_file, monkeypatch, k):
    # dropout on: the dropout masks' stream must continue exactly too
    settings = dict(max_iters=24, eval_interval=5, save_interval=4, dropout=0.1)
    straight = quiet_train(tiny(tmp_path, data_file, out="a", **settings))

    cfg_b = tiny(tmp_path, data_file, out="b", **settings)
    interrupt_after(monkeypatch, k)
    first = quiet_train(cfg_b)
    monkeypatch.undo()
    assert first.interrupted is True and first.iter == k
    assert load_checkpoint(os.path.join(cfg_b.out, "ckpt.safetensors"))[1]["iter"] == k
    assert [r["iter"] for r in metrics(cfg_b.out)] == list(range(0, k, 5))
    second = quiet_train(tiny(tmp_path, data_file, out="b", **settings))
    assert second.interrupted is False and second.iter == 24
    assert_same_tensors(second.model.state_dict(), straight.model.state_dict())
    assert_same_training_state(straight.cfg.out, cfg_b.out)


def test_resume_keeps_saved_hyperparameters_unless_given(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, max_iters=10, learning_rate=5e-3, batch_size=3))
    # A later call with other values, none of them "given": the saved ones win.
    kept = quiet_train(tiny(tmp_path, data_file, max_iters=12, learning_rate=1e-3,
                            batch_size=6), explicit={"max_iters"})
    assert (kept.cfg.learning_rate, kept.cfg.batch_size, kept.cfg.max_iters) == (5e-3, 3, 12)
    assert kept.iter == 12
    changed = quiet_train(tiny(tmp_path, data_file, max_iters=14, learning_rate=2e-3),
                          explicit={"max_iters", "learning_rate"})
    assert (changed.cfg.learning_rate, changed.cfg.batch_size) == (2e-3, 3)
    meta = load_checkpoint(os.path.join(changed.cfg.out, "ckpt.safetensors"))[1]
    assert meta["train_config"]["learning_rate"] == 2e-3
    iters = [r["iter"] for r in metrics(changed.cfg.out)]
    assert iters[:3] == [0, 5, 10] and iters[-1] == 14


def test_extending_max_iters_continues_the_run(tmp_path, data_file):
    # Inside the warmup the schedule does not depend on max_iters, so training to
    # 8 and then extending to 16 must equal training to 16 at once.
    settings = dict(warmup_iters=100, eval_interval=4, save_interval=3)
    straight = quiet_train(tiny(tmp_path, data_file, out="a", max_iters=16, **settings))
    quiet_train(tiny(tmp_path, data_file, out="b", max_iters=8, **settings))
    extended = quiet_train(tiny(tmp_path, data_file, out="b", max_iters=16, **settings),
                           explicit={"max_iters"})
    assert extended.iter == 16
    assert_same_tensors(extended.model.state_dict(), straight.model.state_dict())
    ta = load_checkpoint(os.path.join(straight.cfg.out, "ckpt.safetensors"))[0]
    tb = load_checkpoint(os.path.join(extended.cfg.out, "ckpt.safetensors"))[0]
    assert_same_tensors(ta, tb)
    assert [r["iter"] for r in metrics(extended.cfg.out)] == [0, 4, 8, 12, 16]


def test_rerunning_a_finished_run_keeps_its_weights(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=10, eval_interval=5)
    done = quiet_train(cfg)
    before = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))[0]
    again = quiet_train(tiny(tmp_path, data_file, max_iters=10, eval_interval=5))
    assert again.iter == 10
    assert_same_tensors(again.model.state_dict(), done.model.state_dict())
    assert_same_tensors(load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))[0], before)
    # one row per evaluation, none duplicated
    assert [r["iter"] for r in metrics(cfg.out)] == [0, 5, 10]


def test_resume_with_other_architecture_flag_is_refused(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, max_iters=5))
    with pytest.raises(ConfigError) as info:
        quiet_train(tiny(tmp_path, data_file, max_iters=10, n_embd=32),
                    explicit={"max_iters", "n_embd"})
    message = str(info.value)
    assert "n_embd=16" in message and "--n-embd 32" in message
    assert "--init-from" in message and "\n" not in message
    # Not given on the command line: the saved architecture simply continues.
    run = quiet_train(tiny(tmp_path, data_file, max_iters=10, n_embd=32, n_head=4),
                      explicit={"max_iters"})
    assert (run.cfg.n_embd, run.cfg.n_head, run.model.config.n_embd) == (16, 2, 16)
    assert run.iter == 10


@pytest.mark.parametrize("flag,value,word", [("bias", True, "bias=False"),
                                              ("gelu", "tanh", "gelu=exact")])
def test_resume_refuses_another_bias_or_gelu(tmp_path, data_file, flag, value, word):
    quiet_train(tiny(tmp_path, data_file, max_iters=5))
    with pytest.raises(ConfigError, match=word):
        quiet_train(tiny(tmp_path, data_file, max_iters=10, **{flag: value}),
                    explicit={"max_iters", flag})
    # not given: the saved model's form continues
    run = quiet_train(tiny(tmp_path, data_file, max_iters=10, **{flag: value}),
                      explicit={"max_iters"})
    assert (run.model.config.bias, run.model.config.gelu) == (False, "exact")
    assert run.iter == 10


def test_checkpoint_from_before_the_bias_and_gelu_options_loads_as_trained(tmp_path,
                                                                          data_file):
    # Checkpoints written before these fields existed were GPT-2-shaped: biases
    # and the tanh GELU. One with the fields removed must load (and resume) so.
    run = quiet_train(tiny(tmp_path, data_file, max_iters=5, bias=True, gelu="tanh"))
    for name in ("ckpt.safetensors", "best.safetensors"):
        path = os.path.join(run.cfg.out, name)
        tensors, meta = load_checkpoint(path)
        for key in ("bias", "gelu"):
            del meta["model_config"][key]
            meta.get("train_config", {}).pop(key, None)
        save_checkpoint(path, tensors, meta)
    model, _ = femtogpt.load(run.cfg.out)
    assert (model.config.bias, model.config.gelu) == (True, "tanh")
    idx = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(model.forward(idx)[0], run.model.eval().forward(idx)[0])
    resumed = quiet_train(tiny(tmp_path, data_file, max_iters=8), explicit={"max_iters"})
    assert (resumed.cfg.bias, resumed.cfg.gelu) == (True, "tanh") and resumed.iter == 8


def test_resume_refuses_another_tokenizer(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, max_iters=5))
    with pytest.raises(ConfigError, match="char tokenizer, not byte"):
        quiet_train(tiny(tmp_path, data_file, max_iters=10, tokenizer="byte"),
                    explicit={"max_iters", "tokenizer"})


def test_resume_without_data_flag_trains_on_the_saved_data(tmp_path, data_file):
    """Regression (femtogpt/train.py, Run.__init__): the text used to be read from
    cfg.data *before* _resume() restored the saved --data, so `femtogpt train --out D`
    (continuing a run started with `--data F --out D`) read the bundled Tiny
    Shakespeare instead of F: with the char tokenizer it died with "training text has
    characters the tokenizer does not know", with --tokenizer byte it would have gone
    on training on the wrong text."""
    quiet_train(tiny(tmp_path, data_file, max_iters=5))
    resumed_cfg = TrainConfig(out=str(tmp_path / "run"), max_iters=10, threads=1,
                              sample_tokens=0)     # data: the default, not given
    run = quiet_train(resumed_cfg, explicit={"max_iters"})
    assert run.cfg.data == data_file
    assert run.iter == 10
    assert len(run.train_ids) + len(run.val_ids) == len(TEXT)


def test_init_from_starts_fresh_from_the_best_model(tmp_path, data_file):
    source = quiet_train(tiny(tmp_path, data_file, out="src", max_iters=10, eval_interval=5))
    best_tensors, best_meta = load_checkpoint(os.path.join(source.cfg.out, "best.safetensors"))
    # Make the latest state differ from the best model for sure, so that starting
    # from the wrong one shows.
    latest_path = os.path.join(source.cfg.out, "ckpt.safetensors")
    latest, latest_meta = load_checkpoint(latest_path)
    save_checkpoint(
        latest_path, {name: value * np.float32(0.5) for name, value in latest.items()},
        latest_meta)
    # Architecture flags are taken from the source, whatever this config says.
    cfg = tiny(tmp_path, data_file, out="new", n_embd=32, n_head=4, max_iters=4,
               eval_interval=2)
    run = Run(cfg, log=lambda message: None, init_from=source.cfg.out)
    assert run.iter == 0 and run.optimizer.step_count == 0
    assert not np.any(run.optimizer.exp_avg) and not np.any(run.optimizer.exp_avg_sq)
    assert_same_tensors(run.model.state_dict(), best_tensors)
    assert (run.cfg.n_embd, run.cfg.n_head) == (16, 2)
    assert run.tokenizer == source.tokenizer

    trained = quiet_train(tiny(tmp_path, data_file, out="new", max_iters=4, eval_interval=2),
                          init_from=source.cfg.out)
    assert [r["iter"] for r in metrics(trained.cfg.out)] == [0, 2, 4]
    meta = load_checkpoint(os.path.join(trained.cfg.out, "ckpt.safetensors"))[1]
    assert meta["iter"] == 4 and meta["optimizer_step"] == 4
    # It started from the source's weights: its first evaluation is the source's
    # trained loss level, not an untrained model's ln(vocab).
    first = metrics(trained.cfg.out)[0]
    assert first["val_loss"] < math.log(len(VOCAB)) - 0.3
    assert best_meta["val_loss"] < math.log(len(VOCAB)) - 0.3


# --------------------------------------------------------------------------- processes

CLI_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
             "--batch-size", "4", "--max-iters", "300", "--eval-interval", "50",
             "--eval-iters", "5", "--save-interval", "5", "--no-progress",
             "--sample-tokens", "0", "--threads", "1", "--dropout", "0.1"]


def cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def train_command(data, out):
    return [sys.executable, "-m", "femtogpt.app.cli", "train", "--data", data, "--out", out] + CLI_FLAGS


def run_to_completion(data, out):
    # cwd: see test_cli.run (the source tree must not shadow the installed package).
    proc = subprocess.run(train_command(data, out), env=cli_env(), cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def start_and_wait_for_iteration(data, out, target):
    """Start a CLI run; return once its saved training state has reached iteration target."""
    proc = subprocess.Popen(train_command(data, out), env=cli_env(), cwd=PACKAGE_PARENT,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    ckpt = os.path.join(out, "ckpt.safetensors")
    while True:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        # Saves are atomic renames: whenever the file exists it is complete.
        if os.path.exists(ckpt) and load_checkpoint(ckpt)[1]["iter"] >= target:
            return proc
        time.sleep(0.003)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One uninterrupted CLI run."""
    root = tmp_path_factory.mktemp("reference")
    data = str(root / "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(TEXT)
    out = str(root / "run")
    run_to_completion(data, out)
    return data, out


def test_sigkill_mid_run_then_same_command_equals_uninterrupted(tmp_path, reference_run):
    data, reference = reference_run
    rng = random.Random(20240601)
    killed_at = []
    for attempt in range(3):
        out = str(tmp_path / f"killed{attempt}")
        # A random saved iteration, then a random few ms: the kill can land anywhere
        # (in a step, an evaluation, a checkpoint write).
        proc = start_and_wait_for_iteration(data, out, rng.randrange(5, 250, 5))
        time.sleep(rng.uniform(0.0, 0.03))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        saved = load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]["iter"]
        resumed = run_to_completion(data, out)
        if saved < 300:
            killed_at.append(saved)
            assert saved % 5 == 0
            assert f"resuming from {out}/ckpt.safetensors at iteration {saved}" \
                in resumed.stderr
            assert_same_training_state(reference, out)
        else:   # a very slow poll: it had already finished; the weights must stay
            assert_same_tensors(load_checkpoint(os.path.join(reference, "ckpt.safetensors"))[0],
                                load_checkpoint(os.path.join(out, "ckpt.safetensors"))[0])
    assert len(killed_at) >= 2, killed_at


@pytest.mark.parametrize("signum,status,how", [
    (signal.SIGINT, 130, "interrupted"),                 # Ctrl-C
    (signal.SIGTERM, 143, "stopped by SIGTERM"),         # kill, timeout, a job's time limit
])
def test_signal_saves_exits_and_same_command_finishes_identically(tmp_path, reference_run,
                                                                  signum, status, how):
    data, reference = reference_run
    out = str(tmp_path / "interrupted")
    proc = start_and_wait_for_iteration(data, out, 50)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == status, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith(how)]
    assert len(lines) == 1, stderr
    match = re.fullmatch(how + r" at iteration (\d+): saved (.+); run the same command "
                         r"to continue", lines[0])
    assert match, lines[0]
    n = int(match.group(1))
    assert match.group(2) == os.path.join(out, "ckpt.safetensors")
    assert 50 <= n < 300
    # The state was saved at exactly that iteration (not only at the last save_interval).
    assert load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]["iter"] == n
    assert not glob.glob(os.path.join(out, ".*tmp*"))
    resumed = run_to_completion(data, out)
    assert f"at iteration {n}" in resumed.stderr
    assert_same_training_state(reference, out)


# --------------------------------------------------------------------------- reruns


def test_rerunning_a_finished_run_changes_nothing(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=10)
    quiet_train(cfg)
    rows = metrics(cfg.out)
    tensors, meta = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))
    best_bytes = open(os.path.join(cfg.out, "best.safetensors"), "rb").read()
    run = quiet_train(tiny(tmp_path, data_file, max_iters=10))
    assert run.iter == 10
    assert metrics(cfg.out) == rows                      # not re-evaluated with a new RNG
    tensors2, meta2 = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))
    assert_same_tensors(tensors, tensors2)
    assert meta2["rng_eval"] == meta["rng_eval"]
    assert open(os.path.join(cfg.out, "best.safetensors"), "rb").read() == best_bytes


def test_extending_a_finished_run_keeps_every_metrics_row(tmp_path, data_file):
    # A run that ended at 12 (not a multiple of eval_interval 5), extended to 17:
    # the evaluation at 12 stays, then 15 and 17 follow.
    quiet_train(tiny(tmp_path, data_file, max_iters=12))
    quiet_train(tiny(tmp_path, data_file, max_iters=17), explicit={"max_iters"})
    assert [r["iter"] for r in metrics(str(tmp_path / "run"))] == [0, 5, 10, 12, 15, 17]


def test_init_from_refuses_a_conflicting_architecture_flag(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, out="source", max_iters=5))
    cfg = tiny(tmp_path, data_file, out="child", n_embd=32)
    with pytest.raises(ConfigError, match="n_embd=16"):
        quiet_train(cfg, init_from=str(tmp_path / "source"), explicit={"n_embd"})
    # Without the explicit flag the source's architecture is taken.
    run = quiet_train(tiny(tmp_path, data_file, out="child2", n_embd=32, max_iters=2),
                      init_from=str(tmp_path / "source"))
    assert run.model.config.n_embd == 16


def test_a_killed_saves_temp_file_is_cleaned_up_and_the_checkpoint_loads(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=5)
    quiet_train(cfg)
    # What a SIGKILL in the middle of a save leaves behind: a partial temp file.
    stale = os.path.join(cfg.out, ".ckpt.safetensors.tmp-99999")
    with open(stale, "wb") as f:
        f.write(b"\x00" * 100)
    run = quiet_train(tiny(tmp_path, data_file, max_iters=8), explicit={"max_iters"})
    assert run.iter == 8
    assert not os.path.exists(stale)


# --------------------------------------------------------------------------- refusals


def _snapshot(directory):
    """{relative path: bytes} of every file under directory (None if it does not exist)."""
    if not os.path.exists(directory):
        return None
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def test_a_refused_run_creates_no_directory(tmp_path):
    out = tmp_path / "new-run"
    with pytest.raises(femtogpt.DataError):
        quiet_train(tiny(tmp_path, str(tmp_path / "missing.txt"), out="new-run"))
    assert not out.exists()


def test_a_refused_fresh_run_keeps_an_old_directorys_files(tmp_path, data_file):
    # A directory with an earlier run's metrics and best model but no training
    # state; the new run's data is too short for its block size.
    cfg = tiny(tmp_path, data_file, max_iters=5)
    quiet_train(cfg)
    os.remove(os.path.join(cfg.out, "ckpt.safetensors"))
    before = _snapshot(cfg.out)
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    with pytest.raises(ConfigError, match="holds files of another run"):
        quiet_train(tiny(tmp_path, str(short), block_size=8))
    assert _snapshot(cfg.out) == before
    # Even with --overwrite, a run refused for its data removes nothing.
    with pytest.raises(femtogpt.DataError, match="split"):
        quiet_train(tiny(tmp_path, str(short), block_size=8), overwrite=True)
    assert _snapshot(cfg.out) == before


def test_a_refused_resume_changes_nothing(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=7)     # ends off the eval grid
    quiet_train(cfg)
    before = _snapshot(cfg.out)
    with pytest.raises(ConfigError, match="n_layer"):
        quiet_train(tiny(tmp_path, data_file, n_layer=2, max_iters=9),
                    explicit={"n_layer", "max_iters"})
    assert _snapshot(cfg.out) == before


def test_out_that_is_a_file_or_unwritable_is_refused_before_anything_is_written(
        tmp_path, data_file):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError, match="not a directory"):
        quiet_train(tiny(tmp_path, data_file, out="file/sub"))
    assert not_a_dir.read_text() == "x"


# --------------------------------------------------------------------------- chaos

CHAOS_ITERS = "3000"   # 22 kills use up well under half of it


@pytest.fixture(scope="module")
def long_reference_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("long-reference")
    data = str(root / "data.txt")
    with open(data, "w", encoding="utf-8") as f:
        f.write(TEXT)
    out = str(root / "run")
    proc = subprocess.run(train_command(data, out) + ["--max-iters", CHAOS_ITERS],
                          env=cli_env(), cwd=PACKAGE_PARENT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return data, out


def test_sigkill_at_22_random_moments_never_loses_the_run(tmp_path, long_reference_run):
    # One run, killed 22 times at random moments: mostly just after it has made
    # progress (so, saving after every step, often in the middle of a checkpoint
    # write), sometimes at any moment from launch (start-up included). Waiting for
    # progress rather than a fixed delay keeps this meaningful on a loaded
    # machine. After every kill the training state must load, and the run,
    # continued each time by the same command, must end exactly like the
    # uninterrupted one.
    data, reference = long_reference_run
    out = str(tmp_path / "chaos")
    command = train_command(data, out) + ["--max-iters", CHAOS_ITERS, "--save-interval", "1"]
    ckpt = os.path.join(out, "ckpt.safetensors")
    rng = random.Random(5)
    progress, last = [], -1
    for cycle in range(22):
        proc = subprocess.Popen(command, env=cli_env(), cwd=PACKAGE_PARENT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if rng.random() < 0.2:
            time.sleep(rng.uniform(0.0, 0.8))          # anywhere, start-up included
        else:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if os.path.exists(ckpt) and load_checkpoint(ckpt)[1]["iter"] > last:
                    break
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.05))         # in a step or a save
        proc.send_signal(signal.SIGKILL)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, stderr   # killed, not finished or failed
        if os.path.exists(ckpt):
            last = load_checkpoint(ckpt)[1]["iter"]           # never a broken file
            progress.append(last)
    assert progress == sorted(progress), progress
    assert progress[-1] < int(CHAOS_ITERS), progress         # every kill was mid-run
    run_to_completion_with(command)
    assert_same_training_state(reference, out)
    assert not glob.glob(os.path.join(out, ".*.tmp-*"))       # no temp file left behind


def run_to_completion_with(command):
    proc = subprocess.run(command, env=cli_env(), cwd=PACKAGE_PARENT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_disk_full_mid_training_reports_and_keeps_the_last_checkpoint(tmp_path, data_file,
                                                                      monkeypatch):
    cfg = tiny(tmp_path, data_file, max_iters=20, save_interval=5)
    real_write = checkpoint_module._write_durably
    writes = []

    def write_then_fill_the_disk(path, payload):
        writes.append(path)
        if len(writes) >= 3:                       # the third save finds the disk full
            with open(path, "wb") as f:
                f.write(bytes(payload[0])[:100])  # a partial temp file, as a full disk leaves
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, payload)

    monkeypatch.setattr(checkpoint_module, "_write_durably", write_then_fill_the_disk)
    with pytest.raises(CheckpointError, match="No space left on device") as info:
        quiet_train(cfg)
    assert "ckpt.safetensors" in str(info.value) or "best.safetensors" in str(info.value)
    # Whatever was saved before the failure is intact and loads.
    tensors, meta = load_checkpoint(os.path.join(cfg.out, "ckpt.safetensors"))
    assert meta["iter"] in (5, 10)
    assert not glob.glob(os.path.join(cfg.out, ".*.tmp-*"))


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_a_short_run_with_each_tokenizer(tmp_path, kind):
    text = ("Ünïcödé façade — naïve café, 😀 again and again; the quick brown fox. " * 60
            + "\n") * 3
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    cfg = tiny(tmp_path, str(data), tokenizer=kind, vocab_size=300, max_iters=40,
               eval_interval=20)
    run = quiet_train(cfg)
    rows = metrics(cfg.out)
    assert rows[-1]["val_loss"] < 0.8 * rows[0]["val_loss"]       # it learns
    # bits per character = nats per token * tokens / characters / ln 2, over the
    # val split, recomputed here from the text and the saved tokenizer.
    model, tokenizer = femtogpt.load(cfg.out)
    assert tokenizer == run.tokenizer and tokenizer.to_dict()["type"] == kind
    # nanoGPT's split: the first 90% of the characters train, the rest validate.
    val_text = text[int(len(text) * 0.9):]
    val_ids = tokenizer.encode_array(val_text)
    assert len(val_ids) == len(run.val_ids)
    for row in rows:
        expected = row["val_loss"] * len(val_ids) / len(val_text) / math.log(2)
        assert row["val_bpc"] == pytest.approx(expected, rel=1e-12)
    if kind == "char":
        assert rows[-1]["val_bpc"] == pytest.approx(rows[-1]["val_loss"] / math.log(2))
    if kind == "bpe":
        assert len(val_ids) < 0.8 * len(val_text.encode("utf-8"))     # it did merge
        assert 256 < tokenizer.vocab_size <= 300
        # merges come from the training split only
        assert tokenizer == femtogpt.text.build_tokenizer(
            "bpe", text[:int(len(text) * 0.9)], 300)


def test_resume_refuses_another_bpe_vocab_size(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, tokenizer="bpe", vocab_size=280, max_iters=5))
    with pytest.raises(ConfigError, match="280"):
        quiet_train(tiny(tmp_path, data_file, tokenizer="bpe", vocab_size=300, max_iters=9),
                    explicit={"vocab_size", "max_iters"})


def test_a_preset_on_a_run_of_another_shape_is_refused(tmp_path, data_file):
    from femtogpt.app.cli import main
    out = str(tmp_path / "run")
    args = ["--data", data_file, "--out", out, "--max-iters", "2", "--sample-tokens", "0",
            "--no-progress", "--eval-iters", "1", "--threads", "1", "--block-size", "8"]
    assert main(["train", "--preset", "femto", "--batch-size", "2", *args]) == 0
    before = _snapshot(out)
    assert main(["train", "--preset", "baby", *args]) == 2          # baby is 128 wide
    assert _snapshot(out) == before


def test_init_from_refuses_another_tokenizer_and_keeps_the_bpe_vocabulary(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, out="source", tokenizer="bpe", vocab_size=270,
                     max_iters=3))
    with pytest.raises(ConfigError, match="bpe tokenizer"):
        quiet_train(tiny(tmp_path, data_file, out="child", tokenizer="byte"),
                    init_from=str(tmp_path / "source"), explicit={"tokenizer"})
    run = quiet_train(tiny(tmp_path, data_file, out="child2", max_iters=2),
                      init_from=str(tmp_path / "source"))
    assert run.cfg.tokenizer == "bpe" and run.cfg.vocab_size == run.tokenizer.vocab_size


def test_resume_warns_when_the_data_file_changed(tmp_path, data_file):
    quiet_train(tiny(tmp_path, data_file, max_iters=3))
    with open(data_file, "a", encoding="utf-8") as f:
        f.write("the lazy dog jumps over the quick brown fox.\n" * 5)
    lines = []
    cfg = tiny(tmp_path, data_file, max_iters=5)
    with open(os.devnull, "w") as sink:
        run = Run(cfg, log=lines.append, explicit={"max_iters"})
    assert any(line.startswith("warning:") and "has changed" in line for line in lines)
    assert run.iter == 3


# --------------------------------------------------------------------------- nothing overwritten


def test_init_from_into_another_run_is_refused_and_changes_nothing(tmp_path, data_file):
    source = quiet_train(tiny(tmp_path, data_file, out="source", max_iters=5))
    target = quiet_train(tiny(tmp_path, data_file, out="target", max_iters=10, seed=9))
    before = _snapshot(target.cfg.out)
    with pytest.raises(ConfigError) as info:
        quiet_train(tiny(tmp_path, data_file, out="target", max_iters=3),
                    init_from=source.cfg.out)
    message = str(info.value)
    assert "already holds another run (trained from scratch, 10 iterations)" in message
    assert "--overwrite" in message and "another --out" in message and "\n" not in message
    assert _snapshot(target.cfg.out) == before
    # --overwrite replaces it: the new run's metrics only, from the source's weights
    run = quiet_train(tiny(tmp_path, data_file, out="target", max_iters=3),
                      init_from=source.cfg.out, overwrite=True)
    assert [r["iter"] for r in metrics(run.cfg.out)] == [0, 3]
    assert load_checkpoint(run.latest_path)[1]["init_from"] == os.path.abspath(source.cfg.out)


def test_the_same_init_from_command_again_resumes(tmp_path, data_file):
    source = quiet_train(tiny(tmp_path, data_file, out="source", max_iters=5))
    cfg = tiny(tmp_path, data_file, out="ft", max_iters=10)
    first = quiet_train(replace(cfg, max_iters=5), init_from=source.cfg.out)
    assert first.iter == 5
    again = quiet_train(cfg, init_from=source.cfg.out)
    assert again.resumed and again.iter == 10
    # ...and it equals the fine-tuning run that was never stopped
    straight = quiet_train(tiny(tmp_path, data_file, out="ft2", max_iters=10),
                           init_from=source.cfg.out)
    assert_same_tensors(again.model.state_dict(), straight.model.state_dict())
    # another source into the same --out is another run
    other = quiet_train(tiny(tmp_path, data_file, out="source2", max_iters=3))
    with pytest.raises(ConfigError, match="started from .*source"):
        quiet_train(cfg, init_from=other.cfg.out)


def test_a_fresh_run_into_the_remains_of_another_is_refused(tmp_path, data_file):
    first = quiet_train(tiny(tmp_path, data_file, max_iters=5))
    os.remove(first.latest_path)                  # best and metrics remain
    before = _snapshot(first.cfg.out)
    with pytest.raises(ConfigError, match="holds files of another run .*no training state"):
        quiet_train(tiny(tmp_path, data_file, max_iters=5, learning_rate=2e-2))
    assert _snapshot(first.cfg.out) == before
    # the same run, stopped before its first training state: it starts again
    notes = []
    run = Run(tiny(tmp_path, data_file, max_iters=5), log=notes.append)
    assert not run.resumed and any("starting it again" in n for n in notes)
    # a directory of other files is no run: nothing in it is touched
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    quiet_train(tiny(tmp_path, data_file, out="mine", max_iters=2))
    assert (other / "notes.txt").read_text() == "mine"


def test_train_never_changes_its_arguments(tmp_path, data_file):
    cfg = tiny(tmp_path, os.path.relpath(data_file), max_iters=4)
    saved = asdict(cfg)
    run = quiet_train(cfg)
    assert asdict(cfg) == saved and run.cfg is not cfg
    quiet_train(replace(cfg, max_iters=6))         # a resume that changes a field
    assert asdict(cfg) == saved
    # the presets too
    from femtogpt.train import PRESETS
    preset = asdict(PRESETS["femto"])
    Run(replace(PRESETS["femto"], data=data_file, out=str(tmp_path / "p"), block_size=8,
                threads=1), log=lambda m: None)
    assert asdict(PRESETS["femto"]) == preset


def test_a_python_resume_applies_changed_settings_or_refuses_them_by_name(tmp_path, data_file):
    cfg = tiny(tmp_path, data_file, max_iters=5)
    quiet_train(cfg)
    notes = []
    run = train(replace(cfg, max_iters=10, learning_rate=5e-3), progress=False,
                stream=_Lines(notes))
    assert run.iter == 10 and run.cfg.learning_rate == 5e-3
    assert load_checkpoint(run.latest_path)[1]["train_config"]["learning_rate"] == 5e-3
    assert any("resuming with max_iters 10 (was 5)" in n for n in notes)
    assert any("resuming with learning_rate 0.005 (was 0.01)" in n for n in notes)
    before = _snapshot(cfg.out)
    for change, word in ((dict(n_layer=2), "n_layer=1"), (dict(seed=8), "--seed 7"),
                         (dict(tokenizer="byte"), "char tokenizer"),
                         (dict(bias=True), "bias=False")):
        with pytest.raises(ConfigError, match=word):
            quiet_train(replace(cfg, max_iters=12, **change))
        assert _snapshot(cfg.out) == before, change


class _Lines:
    def __init__(self, lines):
        self.lines = lines

    def write(self, text):
        self.lines.extend(text.splitlines())

    def flush(self):
        pass


# --------------------------------------------------------------------------- gradient accumulation


def test_grad_accum_step_equals_one_batch_that_many_times_larger(tmp_path, data_file):
    # nanoGPT's gradient_accumulation_steps: N micro-batches of B sequences make
    # the same optimizer step as one batch of N*B (up to float32 summation order).
    big = Run(tiny(tmp_path, data_file, out="big", batch_size=6, grad_accum=1), log=lambda m: None)
    acc = Run(tiny(tmp_path, data_file, out="acc", batch_size=2, grad_accum=3), log=lambda m: None)
    acc.model.load_state_dict(big.model.state_dict())
    rng = np.random.default_rng(3)
    for step in range(3):
        x, y = get_batch(big.train_ids, 6, 8, rng)
        loss_big, lr_big, _ = big.train_step(batch=(x, y))
        loss_acc, lr_acc, _ = acc.train_step(batch=[(x[i:i + 2], y[i:i + 2]) for i in (0, 2, 4)])
        assert lr_acc == lr_big
        assert loss_acc == pytest.approx(loss_big, rel=1e-6)
    for name, value in big.model.state_dict().items():
        np.testing.assert_allclose(acc.model.state_dict()[name], value, rtol=1e-4, atol=1e-6,
                                   err_msg=name)
    # A wrong count of micro-batches is refused, not silently used.
    with pytest.raises(ValueError, match="expected 3 micro-batches"):
        acc.train_step(batch=(x[:2], y[:2]))


def test_grad_accum_draws_its_micro_batches_from_the_run_stream(tmp_path, data_file):
    # grad_accum=1 keeps the single-batch stream; N draws N batches per step.
    one = Run(tiny(tmp_path, data_file, out="one", grad_accum=1), log=lambda m: None)
    two = Run(tiny(tmp_path, data_file, out="two", grad_accum=2), log=lambda m: None)
    one.train_step()
    two.train_step()
    fresh = np.random.default_rng([7, 0])
    get_batch(one.train_ids, 4, 8, fresh)
    get_batch(one.train_ids, 4, 8, fresh)
    assert two.rng_train.bit_generator.state == fresh.bit_generator.state
    assert one.rng_train.bit_generator.state != fresh.bit_generator.state
