"""bf16 mixed precision (GPTConfig(dtype="bf16"), --dtype bf16).

What bf16 means here (femtogpt/kernels/training_graph.pxi): the operands of
every matrix product are rounded to bf16 (round to nearest even, bf16
denormals read as zero) and summed in float32; everything else is float32.
So the model is compared against the float64 reference run with exactly that
rounding applied to the products' operands (bf16_reference below): what is
left is float32 summation error, plus the rare operand that sits within a
float32 ulp of a bf16 rounding boundary and rounds the other way in one of
the two (each such flip moves a product by 2^-8 of one term). Against the
plain float64 reference the same model is ~100x further off (the bf16
rounding itself), which is what the tolerances tell apart.
"""
import contextlib
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
from femtogpt import GPT, ConfigError, GPTConfig
from femtogpt import _core as core
from femtogpt.app.cli import main
from femtogpt.files.checkpoint import model_from_file, save_checkpoint
from femtogpt.files.tensorfile import TensorFile
from femtogpt.train.optim import AdamW

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "gemm_bf16_probe", os.path.join(HERE, "..", "scripts", "gemm_bf16_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

HAS_AVX512BF16 = "avx512bf16" in core.bf16_paths_available()
CFG = dict(vocab_size=37, block_size=19, n_layer=2, n_head=3, n_embd=48)


def bf16(a):
    """a rounded to bf16 as the kernels round it, as float64."""
    a = np.asarray(a, dtype=np.float64)
    return probe.bf16_value(a.astype(np.float32)).astype(np.float64).reshape(a.shape)


@contextlib.contextmanager
def bf16_reference():
    """tests/reference.py with every product's operands rounded to bf16: the
    linear layers (and tied lm_head) forward and backward, attention's
    q @ k^T, att @ v and their backward. Biases' gradients, LayerNorm, softmax
    (and its backward, on the float probabilities), GELU and the loss are left
    exact, as in the kernels."""
    saved = (ref.linear_forward, ref.linear_backward, ref.attention_forward,
             ref.attention_backward)

    def linear_forward(x, w, b=None):
        return saved[0](bf16(x), bf16(w), b)

    def linear_backward(dout, x, w):
        dout64 = np.asarray(dout, np.float64)
        dx = bf16(dout) @ bf16(w)
        dw = bf16(dout).reshape(-1, w.shape[0]).T @ bf16(x).reshape(-1, w.shape[1])
        return dx, dw, dout64.reshape(-1, w.shape[0]).sum(axis=0)

    def attention_forward(qkv, n_head):
        qkv = np.asarray(qkv, np.float64)
        B, T, C3 = qkv.shape
        C = C3 // 3
        hs = C // n_head
        q, k, v = (ref._split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))
        scores = bf16(q) @ bf16(k).transpose(0, 1, 3, 2) / np.sqrt(hs)
        scores = np.where(np.triu(np.ones((T, T), bool), k=1), -np.inf, scores)
        e = np.exp(scores - scores.max(axis=-1, keepdims=True))
        att = e / e.sum(axis=-1, keepdims=True)
        return ref._merge_heads(bf16(att) @ bf16(v)), att

    def attention_backward(dout, qkv, att, n_head):
        qkv, att = np.asarray(qkv, np.float64), np.asarray(att, np.float64)
        C = qkv.shape[-1] // 3
        hs = C // n_head
        q, k, v = (ref._split_heads(a, n_head) for a in np.split(qkv, 3, axis=-1))
        dy = ref._split_heads(np.asarray(dout, np.float64), n_head)
        datt = bf16(dy) @ bf16(v).transpose(0, 1, 3, 2)
        dv = bf16(att).transpose(0, 1, 3, 2) @ bf16(dy)
        dscores = att * (datt - (att * datt).sum(axis=-1, keepdims=True))
        dq = bf16(dscores) @ bf16(k) / np.sqrt(hs)
        dk = bf16(dscores).transpose(0, 1, 3, 2) @ bf16(q) / np.sqrt(hs)
        return np.concatenate([ref._merge_heads(dq), ref._merge_heads(dk),
                               ref._merge_heads(dv)], axis=-1)

    (ref.linear_forward, ref.linear_backward, ref.attention_forward,
     ref.attention_backward) = (linear_forward, linear_backward, attention_forward,
                                attention_backward)
    try:
        yield
    finally:
        (ref.linear_forward, ref.linear_backward, ref.attention_forward,
         ref.attention_backward) = saved


def batch(seed=0, B=3, T=19, V=37):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def relative_errors(got, want):
    want = np.asarray(want, np.float64)
    return (np.abs(np.asarray(got, np.float64) - want) / np.abs(want).max()).ravel()


def scaled_error(got, want):
    want = np.asarray(want, np.float64)
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


@pytest.mark.parametrize("bias, gelu", [(True, "tanh"), (False, "exact")])
def test_bf16_forward_and_every_gradient_match_the_bf16_rounded_reference(bias, gelu):
    model = GPT(GPTConfig(**CFG, bias=bias, gelu=gelu, dtype="bf16"), seed=3)
    idx, targets = batch()
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    params = model.state_dict()
    with bf16_reference():
        r_logits, r_loss, cache = ref.gpt_forward(params, idx, targets, n_head=3, gelu=gelu)
        r_grads = ref.gpt_backward(params, cache, n_head=3)
    p_logits, p_loss, p_cache = ref.gpt_forward(params, idx, targets, n_head=3, gelu=gelu)
    p_grads = ref.gpt_backward(params, p_cache, n_head=3)
    # Every tensor, against its own scale (max |ref|). Observed against the
    # rounded reference: medians <= 4e-8, 99th percentiles <= 6e-5 and maxima
    # <= 6e-4, the tails where an operand rounded the other way (one lnf
    # element flipped moves its row of logits and of wte's gradient by 2^-8
    # of that term); against the plain reference medians >= 1e-5 and 99th
    # percentiles >= 1e-3: the rounding that must be there.
    assert abs(loss - r_loss) < 2e-6 * r_loss < abs(loss - p_loss)
    assert grads.keys() == r_grads.keys()
    for name, got, want, plain in [("logits", logits, r_logits, p_logits)] + [
            (name, grads[name], r_grads[name], p_grads[name]) for name in r_grads]:
        err, err_plain = relative_errors(got, want), relative_errors(got, plain)
        assert np.median(err) < 1e-6 < np.median(err_plain), name
        assert np.quantile(err, 0.99) < 2e-4 < np.quantile(err_plain, 0.99), name
        assert err.max() < 2e-3, name


def test_bf16_gradients_are_within_a_percent_of_fp32():
    """The size of the bf16 effect at nanoGPT's init: each gradient within 2% of
    its scale of the fp32 model's (observed <= 0.7%), the loss within 1e-4."""
    m32 = GPT(GPTConfig(**CFG), seed=5)
    m16 = GPT(GPTConfig(**CFG, dtype="bf16"), seed=5)
    idx, targets = batch(1)
    l32, g32 = m32.loss(idx, targets), m32.backward()
    l16, g16 = m16.loss(idx, targets), m16.backward()
    assert abs(l32 - l16) < 1e-4 * l32
    for name in g32:
        assert scaled_error(g16[name], g32[name]) < 2e-2, name


def run_step(model, idx, targets):
    loss = model.loss(idx, targets)
    return loss, model.backward()


@pytest.mark.skipif(not HAS_AVX512BF16, reason="this CPU has no AVX512_BF16")
def test_portable_path_is_bit_identical_to_avx512bf16_for_a_whole_step(threads):
    threads(2)
    model = GPT(GPTConfig(**CFG, dropout=0.1, dtype="bf16"), seed=7)
    idx, targets = batch(2)
    results = {}
    try:
        for path in ("avx512bf16", "portable"):
            assert core.set_bf16_path(path) == path
            model.dropout_calls = 0
            model.weights_changed()           # repack on this path too
            results[path] = run_step(model, idx, targets)
    finally:
        core.set_bf16_path("auto")
    (la, ga), (lp, gp) = results["avx512bf16"], results["portable"]
    assert la == lp
    for name in ga:
        assert np.array_equal(ga[name], gp[name]), name


def test_bf16_results_do_not_depend_on_the_thread_count(threads):
    """Each element of a bf16 product is one sum in a fixed order, whatever
    thread's slice it is in (sgemm's are not: fp32 agrees to ~1e-6)."""
    model = GPT(GPTConfig(**CFG, dtype="bf16"), seed=8)
    idx, targets = batch(3)
    threads(1)
    l1, g1 = run_step(model, idx, targets)
    threads(2)
    l2, g2 = run_step(model, idx, targets)
    assert l1 == l2
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)


def train_losses(dtype, steps=50, grad_accum=1):
    text = open(os.path.join(HERE, "..", "femtogpt", "data", "tinyshakespeare.txt"),
                "rb").read()[:200_000]
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    cfg = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64,
                    dtype=dtype)
    model = GPT(cfg, seed=0)
    opt = AdamW(model, weight_decay=0.1)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        model.zero_grad()
        for _ in range(grad_accum):
            starts = rng.integers(0, len(ids) - 33, 8)
            x = np.stack([ids[s:s + 32] for s in starts])
            y = np.stack([ids[s + 1:s + 33] for s in starts])
            losses.append(model.loss(x, y))
            model.backward(accumulate=True, loss_scale=1.0 / grad_accum)
        opt.step(3e-3)
    return model, losses


def test_a_short_training_run_in_bf16_ends_near_fp32():
    """200 steps (2 s) of a tiny byte-level model on the same batches, seeds
    fixed. Both fall from 5.56 to ~2.75; the mean loss of the last 50 steps
    in bf16 within 0.06 (2%) of fp32's (observed: fp32 2.771, bf16 2.748).
    The runs diverge as any two float orders do (fp32 at 1 vs 2 threads
    too), so a single batch's loss may differ by more; a bf16 path that did
    not learn, or trained on stale packed weights, is far outside."""
    _, l32 = train_losses("fp32", steps=200)
    model, l16 = train_losses("bf16", steps=200)
    assert l32[0] - np.mean(l32[-50:]) > 2.5
    assert abs(np.mean(l16[-50:]) - np.mean(l32[-50:])) < 0.06
    assert model._graph.pack_count == 200         # once per optimizer step


def test_packs_once_per_optimizer_step_not_per_micro_batch():
    model, _ = train_losses("bf16", steps=3, grad_accum=4)
    assert model._graph.pack_count == 3


def fresh_bf16_loss(model, idx, targets):
    """The loss of a new bf16 model holding model's current fp32 weights."""
    other = GPT(GPTConfig(**{**model.config.to_dict(), "dtype": "bf16"}), init=False)
    other.load_state_dict(model.state_dict())
    return other.loss(idx, targets)


@pytest.mark.parametrize("change", ["adamw", "load_state_dict", "state_views", "params_flat"])
def test_packed_weights_are_refreshed_after_every_change(change):
    model = GPT(GPTConfig(**CFG, dtype="bf16"), seed=9)
    idx, targets = batch(4)
    before = model.loss(idx, targets)
    model.backward()
    if change == "adamw":
        AdamW(model).step(1e-2)
    elif change == "load_state_dict":
        model.load_state_dict(GPT(GPTConfig(**CFG), seed=10).state_dict())
    elif change == "state_views":
        model.state_views()["transformer.h.1.mlp.c_fc.weight"][...] *= 1.5
    else:
        model.params_flat[:model.n_decay] *= 0.5
    after = model.loss(idx, targets)
    assert after != before
    assert after == fresh_bf16_loss(model, idx, targets)


def test_a_write_through_an_old_view_needs_weights_changed():
    model = GPT(GPTConfig(**CFG, dtype="bf16"), seed=11)
    idx, targets = batch(5)
    view = model.state_views()["transformer.wte.weight"]
    model.loss(idx, targets)
    view *= 2.0                                   # after the forward: not seen
    model.weights_changed()
    assert model.loss(idx, targets) == fresh_bf16_loss(model, idx, targets)


def test_bf16_model_samples_as_the_fp32_model():
    """Sampling (prefill and the KV-cache decoder) is fp32 in either dtype: the
    same weights and seed give the same tokens."""
    m32 = GPT(GPTConfig(**CFG), seed=12)
    m16 = GPT(GPTConfig(**CFG, dtype="bf16"), seed=12)
    idx = np.array([[1, 2, 3]])
    m16.loss(*batch(6))                      # a bf16 forward first: must not leak
    a = m32.generate(idx, 30, temperature=0.8, seed=5)
    b = m16.generate(idx, 30, temperature=0.8, seed=5)
    assert np.array_equal(a, b)


def test_dtype_is_validated_and_switchable():
    with pytest.raises(ConfigError, match="dtype"):
        GPTConfig(dtype="fp16")
    model = GPT(GPTConfig(**CFG), seed=13)
    idx, targets = batch(7)
    l32 = model.loss(idx, targets)
    assert model.set_dtype("bf16").config.dtype == "bf16"
    l16 = model.loss(idx, targets)
    model.set_dtype("fp32")
    assert model.loss(idx, targets) == l32 != l16
    with pytest.raises(ConfigError):
        model.set_dtype("int8")


def save_model(path, model):
    meta = {"model_config": model.config.to_dict(), "tokenizer": {"type": "byte"}}
    save_checkpoint(path, model.state_views(), meta)


@pytest.mark.parametrize("saved, loaded", [("fp32", "bf16"), ("bf16", "fp32")])
def test_a_checkpoint_loads_in_either_dtype(tmp_path, saved, loaded):
    cfg = {**CFG, "vocab_size": 256}
    model = GPT(GPTConfig(**cfg, dtype=saved), seed=14)
    path = str(tmp_path / "m.safetensors")
    save_model(path, model)
    with TensorFile(path) as f:
        assert f.meta["model_config"]["dtype"] == saved
        back, _ = model_from_file(f)
    assert back.config.dtype == saved
    assert all(np.array_equal(v, back.state_views()[k])
               for k, v in model.state_views().items())   # fp32 weights, as they were
    idx, targets = batch(8, V=256)
    want = GPT(GPTConfig(**cfg, dtype=loaded), init=False)
    want.load_state_dict(model.state_dict())
    assert back.set_dtype(loaded).loss(idx, targets) == want.loss(idx, targets)


def test_a_checkpoint_from_before_dtype_loads_as_fp32(tmp_path):
    model = GPT(GPTConfig(**{**CFG, "vocab_size": 256}), seed=15)
    path = str(tmp_path / "old.safetensors")
    meta = {"model_config": {k: v for k, v in model.config.to_dict().items()
                             if k != "dtype"}, "tokenizer": {"type": "byte"}}
    save_checkpoint(path, model.state_views(), meta)
    with TensorFile(path) as f:
        back, _ = model_from_file(f)
    assert back.config.dtype == "fp32"


def test_profile_reports_each_op_and_costs_nothing_when_off():
    model = GPT(GPTConfig(**CFG, dtype="bf16"), seed=16)
    idx, targets = batch(9)
    model.loss(idx, targets)
    model.backward()
    assert model.profile_report() == []
    model.profile(True)
    model.loss(idx, targets)
    model.backward()
    AdamW(model).step(1e-3)
    report = model.profile_report()
    by = {(r["op"], r["phase"]): r for r in report}
    for op in ("embedding", "layernorm", "qkv", "attention", "attproj", "fc", "gelu",
               "fcproj", "residual", "lm_head", "loss"):
        assert (op, "forward") in by, op
    for op in ("qkv", "attention", "attproj", "fc", "fcproj", "lm_head", "loss"):
        assert (op, "backward") in by, op
    assert ("adamw", "optimizer") in by and ("bf16_pack", "optimizer") not in by
    model.loss(idx, targets)        # the first forward after the step repacks
    by = {(r["op"], r["phase"]): r for r in model.profile_report()}
    assert by[("bf16_pack", "optimizer")]["calls"] == 1
    N, C, L = 3 * 19, 48, 2
    assert by[("fc", "forward")]["flops"] == 2 * 2.0 * N * C * 4 * C * L
    assert by[("fc", "backward")]["flops"] == 4.0 * N * C * 4 * C * L
    assert by[("layernorm", "forward")]["calls"] == 2 * (2 * L + 1)
    assert all(r["seconds"] >= 0 for r in model.profile_report())
    model.profile_reset()
    assert model.profile_report() == []
    model.profile(False)
    model.loss(idx, targets)
    assert model.profile_report() == []


def test_bf16_path_can_be_forced_by_the_environment():
    code = "import femtogpt, json; print(json.dumps(femtogpt.build_info()))"
    env = {**os.environ, "FEMTOGPT_BF16_PATH": "portable"}
    # From the installed package's parent: in the repository's root the source
    # folder (without compiled modules, after a plain pip install) would shadow it.
    import femtogpt
    where = os.path.dirname(os.path.dirname(os.path.abspath(femtogpt.__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True, cwd=where).stdout
    info = json.loads(out)
    assert info["bf16"] == "portable" and "portable" in info["bf16_available"]
    env["FEMTOGPT_BF16_PATH"] = "fast"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, cwd=where)
    assert proc.returncode != 0 and "FEMTOGPT_BF16_PATH=fast" in proc.stderr


# ------------------------------------------------------------------ command line

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "8",
        "--batch-size", "4", "--eval-interval", "5", "--eval-iters", "2",
        "--save-interval", "5", "--no-progress", "--threads", "1", "--sample-tokens", "0"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return str(path)


def train_meta(out):
    with TensorFile(os.path.join(out, "ckpt.safetensors")) as f:
        return f.meta


def test_dtype_flag_reaches_the_run_and_a_resume_keeps_it(tmp_path, data, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", data, "--out", out, "--max-iters", "5", "--dtype",
                 "bf16", *TINY]) == 0
    meta = train_meta(out)
    assert meta["model_config"]["dtype"] == "bf16"
    assert meta["train_config"]["dtype"] == "bf16"
    capsys.readouterr()
    assert main(["train", "--data", data, "--out", out, "--max-iters", "10", *TINY]) == 0
    assert train_meta(out)["model_config"]["dtype"] == "bf16"
    assert "resuming with dtype" not in capsys.readouterr().err
    assert main(["train", "--data", data, "--out", out, "--max-iters", "15", "--dtype",
                 "fp32", *TINY]) == 0
    assert "resuming with dtype fp32 (was bf16)" in capsys.readouterr().err
    assert train_meta(out)["model_config"]["dtype"] == "fp32"


def test_serve_lists_the_runs_dtype(tmp_path, data):
    from femtogpt.app.serve_runs import Source
    out = str(tmp_path / "run")
    assert main(["train", "--data", data, "--out", out, "--max-iters", "5", "--dtype",
                 "bf16", *TINY]) == 0
    assert Source(0, out).info()["config"]["dtype"] == "bf16"


def test_init_from_may_change_the_dtype(tmp_path, data, capsys):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    assert main(["train", "--data", data, "--out", src, "--max-iters", "5", *TINY]) == 0
    capsys.readouterr()
    assert main(["train", "--data", data, "--out", dst, "--max-iters", "5", "--init-from",
                 src, "--dtype", "bf16", *TINY]) == 0
    assert "training in bf16" in capsys.readouterr().err
    assert train_meta(dst)["model_config"]["dtype"] == "bf16"


def test_a_bad_dtype_is_one_line_and_exit_2(tmp_path, data, capsys):
    assert main(["train", "--data", data, "--out", str(tmp_path / "r"), "--dtype", "fp16",
                 *TINY]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["femtogpt: error: --dtype must be fp32 or bf16, got 'fp16'"]
