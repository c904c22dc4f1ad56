"""Sampling and scoring with the weights in bf16 or int8 (GPT.convert_weights,
femtogpt.load(dtype=), `femtogpt sample/serve/eval --dtype`).

The kernels themselves are checked against float64 in test_gemm_q8.py and
test_gemm_bf16.py; here, the model around them: the inference pass at each
type against the fp32 model, the prompt pass against decode steps, what a
converted model refuses, the memory it gives back, and the commands.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import femtogpt
from femtogpt.app.cli import main
from femtogpt.errors import ConfigError
from femtogpt.files.checkpoint import model_meta, save_checkpoint
from femtogpt.model import GPT, GPTConfig
from femtogpt.text import CharTokenizer

TEXT = "".join(f"{w} the quick brown fox, line {i}; jumps over the lazy dog.\n"
               for i, w in enumerate(["First", "Second", "Third", "ROMEO:"] * 30))
DTYPES = ("fp32", "bf16", "int8")
# Worst logit error against fp32, relative to the logits' spread, that each type
# may show on the random model below (bf16: 8-bit mantissas of both operands;
# int8: 127 levels per block of 32 of both operands).
LOGIT_TOL = {"fp32": 1e-6, "bf16": 3e-2, "int8": 3e-2}


def random_model(seed=0, **kw):
    # Sizes with tails: C = 40 is no multiple of 16 or 32, V = 77 is odd.
    cfg = dict(vocab_size=77, block_size=24, n_layer=2, n_head=4, n_embd=40)
    cfg.update(kw)
    model = GPT(GPTConfig(**cfg), seed=seed)
    rng = np.random.default_rng(seed)
    for view in model.state_views().values():
        view += rng.standard_normal(view.shape).astype(np.float32) * 0.1
    return model.eval()


def copy_of(model):
    twin = GPT(model.config, init=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


@pytest.fixture(scope="module")
def reference():
    model = random_model()
    idx = np.random.default_rng(3).integers(0, 77, size=(2, 24))
    logits, _ = copy_of(model).forward(idx)
    return model, idx, logits


@pytest.mark.parametrize("dtype", DTYPES)
def test_inference_pass_at_each_type_is_close_to_fp32(reference, dtype):
    model, idx, want = reference
    got, loss = copy_of(model).convert_weights(dtype).forward(idx, idx)
    spread = want.max() - want.min()
    err = np.abs(got - want).max() / spread
    assert err <= LOGIT_TOL[dtype]
    if dtype != "fp32":
        assert err > 0        # the weights really are at that type
    # the loss is the mean cross-entropy of those logits
    z = got.reshape(-1, 77).astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    assert loss == pytest.approx(float(np.mean(lse - z[np.arange(z.shape[0]), idx.ravel()])),
                                 rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_steps_continue_the_prompt_pass(reference, dtype):
    # A prompt pass over 10 positions, then one decode step at a time: each
    # step's logits are the whole-sequence pass's row at that position (the
    # attention of a step sums in another order, so within fp32 rounding).
    model, idx, _ = reference
    m = copy_of(model).convert_weights(dtype)
    whole = m.forward(idx)[0]
    first = m.prefill_logits(idx[:, :10])
    np.testing.assert_allclose(first, whole[:, 9], rtol=0, atol=2e-5 * np.abs(whole).max())
    for pos in range(10, 24):
        step = m.decode_logits(idx[:, pos], pos)
        np.testing.assert_allclose(step, whole[:, pos], rtol=0,
                                   atol=2e-3 * np.abs(whole).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_more_threads_after_the_prompt_pass_decode_the_same(reference, dtype):
    # The decoder's per-thread scratch is laid out by the prompt pass: a step
    # after set_num_threads(2) must neither overrun it nor change the numbers.
    model, idx, _ = reference
    saved = femtogpt.get_num_threads()
    try:
        steps = []
        for threads_after in (1, 2):
            m = copy_of(model).convert_weights(dtype)
            femtogpt.set_num_threads(1)
            m.prefill_logits(idx[:, :20])
            femtogpt.set_num_threads(threads_after)
            steps.append([m.decode_logits(idx[:, p], p) for p in range(20, 24)])
    finally:
        femtogpt.set_num_threads(saved)
    assert all(np.array_equal(a, b) for a, b in zip(*steps))


def test_fp32_sampling_is_unchanged_by_the_conversion_api(reference):
    model, idx, _ = reference
    a = copy_of(model).generate(idx[:, :5], 30, temperature=0.9, top_k=20, seed=7)
    b = copy_of(model).convert_weights("fp32").generate(idx[:, :5], 30, temperature=0.9,
                                                         top_k=20, seed=7)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("dtype", ("bf16", "int8"))
def test_a_converted_model_samples_and_scores_but_refuses_to_train(reference, dtype):
    model, idx, _ = reference
    m = copy_of(model).convert_weights(dtype)
    assert m.weights_dtype == dtype and not m.training
    out = m.generate(idx[:1, :4], 40, temperature=0)     # past block_size: a rebuild
    assert out.shape == (1, 44) and out.min() >= 0 and out.max() < 77
    for what, call in [("params_flat", lambda: m.params_flat),
                       ("state_dict()", m.state_dict), ("state_views()", m.state_views),
                       ("load_state_dict()", lambda: m.load_state_dict(model.state_dict())),
                       ("backward()", m.backward), ("train()", m.train),
                       ("set_dtype()", lambda: m.set_dtype("bf16"))]:
        with pytest.raises(RuntimeError, match=f"{dtype}|fp32 weights"):
            call()
    with pytest.raises(RuntimeError, match="load it again"):
        m.convert_weights("fp32" if dtype == "int8" else "int8")
    m.convert_weights(dtype)       # asking again for what it has is fine


def test_bad_dtype_is_refused_by_name():
    with pytest.raises(ConfigError, match="int4"):
        random_model().convert_weights("int4")


def test_weights_bytes_follow_the_type():
    m = random_model(n_embd=64, vocab_size=300)
    cfg = m.config
    blocks = cfg.n_layer * 12 * cfg.n_embd ** 2
    matrices = blocks + cfg.vocab_size * cfg.n_embd        # the lm_head's copy too
    # fp32: the parameter block itself (the lm_head is wte)
    assert m.weights_bytes == 4 * m.params_flat.size
    rest = m.weights_bytes - 4 * blocks
    got = {d: copy_of(m).convert_weights(d).weights_bytes - rest for d in DTYPES}
    assert got["fp32"] == 4 * blocks
    # bf16: 2 bytes (+ padding of the packed panels); int8: 1 byte + a scale per 32
    assert 2 * matrices <= got["bf16"] <= 2.3 * matrices
    assert 1.06 * matrices <= got["int8"] <= 1.3 * matrices


RSS_PROBE = r"""
import sys, numpy as np, femtogpt
from femtogpt.model import GPT, GPTConfig
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
m = GPT(GPTConfig(vocab_size=256, block_size=32, n_layer=4, n_head=8, n_embd=512), seed=1)
before = rss()
m.convert_weights(sys.argv[1])
m.generate(np.zeros((1, 1), dtype=np.int64), 4, temperature=0)
print(before - rss())
"""


@pytest.mark.parametrize("dtype", ("bf16", "int8"))
def test_conversion_gives_the_fp32_matrices_memory_back(dtype):
    # 4 layers of 512 wide: 12.6M block weights, 50 MB in fp32. After the
    # conversion the process holds their copy at the new type instead.
    cwd = os.path.dirname(os.path.dirname(femtogpt.__file__))
    freed = int(subprocess.run([sys.executable, "-c", RSS_PROBE, dtype], capture_output=True,
                               text=True, check=True, cwd=cwd).stdout)
    fp32 = 4 * 12 * 512 * 512 * 4
    kept = fp32 // 2 if dtype == "bf16" else fp32 // 4
    assert freed >= 0.8 * (fp32 - kept) - (8 << 20)


# --------------------------------------------------------------------------- commands


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small char model trained on TEXT: peaked enough for greedy text to be
    stable under int8's rounding."""
    root = tmp_path_factory.mktemp("sampling_dtype")
    (root / "t.txt").write_text(TEXT, encoding="utf-8")
    saved = femtogpt.get_num_threads()
    femtogpt.set_num_threads(1)
    try:
        assert main(["train", "--data", str(root / "t.txt"), "--out", str(root / "run"),
                     "--n-layer", "2", "--n-head", "2", "--n-embd", "48", "--block-size", "32",
                     "--batch-size", "8", "--max-iters", "300", "--eval-interval", "100",
                     "--eval-iters", "2", "--learning-rate", "3e-3", "--no-progress",
                     "--threads", "1", "--sample-tokens", "0"]) == 0
    finally:
        femtogpt.set_num_threads(saved)
    return root


GREEDY_AGREE = {"bf16": 60, "int8": 60}     # greedy tokens that must equal fp32's


@pytest.mark.parametrize("dtype", ("bf16", "int8"))
def test_greedy_text_at_each_type_agrees_with_fp32(trained, dtype):
    ref, tok = femtogpt.load(str(trained / "run"))
    got, _ = femtogpt.load(str(trained / "run"), dtype=dtype)
    for prompt in ("First the", "ROMEO: the quick", "line 1"):
        idx = np.array([tok.encode(prompt)])
        n = GREEDY_AGREE[dtype]
        a = ref.generate(idx, n, temperature=0)
        b = got.generate(idx, n, temperature=0)
        assert np.array_equal(a, b), (prompt, tok.decode(a[0].tolist()),
                                      tok.decode(b[0].tolist()))


@pytest.mark.parametrize("dtype, tol", [("bf16", 0.002), ("int8", 0.005)])
def test_eval_at_each_type_stays_within_the_issues_bound(trained, capsys, dtype, tol):
    def run(*extra):
        assert main(["eval", "--out", str(trained / "run"), "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)
    fp32, other = run(), run("--dtype", dtype)
    assert other["dtype"] == dtype and other["tokens"] == fp32["tokens"]
    assert abs(other["loss"] - fp32["loss"]) <= tol * fp32["loss"]


def test_sample_stats_and_dtype(trained, capsys):
    assert main(["sample", "--out", str(trained / "run"), "--dtype", "int8", "--prompt",
                 "First", "--max-new-tokens", "25", "--num-samples", "2", "--seed", "1",
                 "--threads", "1", "--stats"]) == 0
    captured = capsys.readouterr()
    stats = captured.err.strip().split("\n")[-1]
    # two samples: 2 x 5 prompt characters, 2 x 25 new tokens
    assert "prompt: 10 tokens" in stats and "decode: 50 tokens" in stats
    assert "dtype int8" in stats and "threads 1" in stats and "MiB, peak" in stats
    assert captured.out.count("First") >= 2


@pytest.mark.parametrize("command", ["sample", "serve", "eval"])
def test_an_unknown_dtype_gets_one_line_and_status_2(trained, capsys, command):
    argv = [command, "--out", str(trained / "run"), "--dtype", "int4"]
    if command == "serve":
        argv += ["--port", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and "--dtype int4 is not one of fp32, bf16, int8" in err[0]


def test_serve_samples_at_its_dtype_and_says_so(trained):
    from femtogpt.app.probe import attention
    from femtogpt.app.serve_runs import Source
    from femtogpt.errors import DataError
    source = Source(0, str(trained / "run"), "int8")
    info = source.info()
    assert info["sampling_dtype"] == "int8"
    with source.use() as (model, tok):
        assert model.weights_dtype == "int8"
        with pytest.raises(DataError, match="fp32"):
            attention(model, tok, "First the", 0, 0)
    assert Source(1, str(trained / "run")).info()["sampling_dtype"] == "fp32"


def test_load_dtype_of_a_checkpoint_file(tmp_path):
    tok = CharTokenizer.from_text(TEXT)
    model = random_model(vocab_size=tok.vocab_size)
    path = str(tmp_path / "m.safetensors")
    save_checkpoint(path, model.state_views(), model_meta(model, tok))
    for dtype in DTYPES:
        m, t = femtogpt.load(path, dtype=dtype)
        assert m.weights_dtype == dtype and t.vocab_size == tok.vocab_size
    with pytest.raises(ConfigError, match="int4"):
        femtogpt.load(path, dtype="int4")
