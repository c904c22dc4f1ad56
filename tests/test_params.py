"""The one parameter table (femtogpt/model/params.py) against what reads it."""
import numpy as np
import pytest

from femtogpt import GPT, GPTConfig, _core
from femtogpt.files.hf import TRANSPOSED, hf_tensors
from femtogpt.model import params

CFG = GPTConfig(vocab_size=37, block_size=11, n_layer=3, n_head=2, n_embd=8)


def test_the_table_names_exactly_the_cores_tensors():
    assert {p.key for p in params.PARAMS} == set(_core.PARAM_KEYS)
    assert {p.key for p in params.PARAMS if p.bias} == set(_core.BIAS_KEYS)


@pytest.mark.parametrize("bias", [True, False])
def test_layout_is_aligned_disjoint_and_decay_first(bias):
    cfg = GPTConfig(**{**CFG.to_dict(), "bias": bias})
    offsets, total, n_decay = params.layout(cfg)
    spans = []
    for p in params.memory_order(cfg):
        start = offsets[p.key]
        assert start % params.ALIGN == 0
        spans.append((start, start + int(np.prod(p.stacked_shape(cfg))), p.decay))
    spans.sort()
    for (a0, a1, _), (b0, _, _) in zip(spans, spans[1:]):
        assert a1 <= b0
    # The decayed tensors are exactly the ones before n_decay.
    assert all(end <= n_decay for _, end, decay in spans if decay)
    assert all(start >= n_decay for start, _, decay in spans if not decay)
    assert spans[-1][1] <= total < spans[-1][1] + params.ALIGN
    assert (len(offsets) == 16) == bias


def test_state_dict_is_nanogpts_order_and_shapes():
    model = GPT(CFG, seed=0)
    names = list(model.state_dict())
    layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
             "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
             "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"]
    expected = (["transformer.wte.weight", "transformer.wpe.weight"]
                + [f"transformer.h.{i}.{n}" for i in range(CFG.n_layer) for n in layer]
                + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert names == expected
    C = CFG.n_embd
    sd = model.state_dict()
    assert sd["transformer.h.2.attn.c_attn.weight"].shape == (3 * C, C)
    assert sd["transformer.h.1.mlp.c_proj.weight"].shape == (C, 4 * C)
    assert sd["transformer.wpe.weight"].shape == (CFG.block_size, C)


def test_init_follows_the_table():
    model = GPT(CFG, seed=5)
    sd = model.state_dict()
    for name, p, _ in params.state_names(CFG):
        if p.init == "ones":
            assert np.all(sd[name] == 1.0), name
        elif p.init == "zeros":
            assert np.all(sd[name] == 0.0), name
    # Residual projections are drawn 1/sqrt(2L) narrower than the other weights.
    proj = np.concatenate([sd[f"transformer.h.{i}.mlp.c_proj.weight"].ravel()
                           for i in range(CFG.n_layer)])
    fc = np.concatenate([sd[f"transformer.h.{i}.mlp.c_fc.weight"].ravel()
                         for i in range(CFG.n_layer)])
    assert abs(fc.std() / proj.std() - np.sqrt(2 * CFG.n_layer)) < 0.5


def test_hf_names_transposes_and_zero_biases_come_from_the_table():
    assert set(TRANSPOSED) == {".attn.c_attn.weight", ".attn.c_proj.weight",
                               ".mlp.c_fc.weight", ".mlp.c_proj.weight"}
    cfg = GPTConfig(**{**CFG.to_dict(), "bias": False})
    model = GPT(cfg, seed=1)
    out = hf_tensors(model)
    full = {name for name, _, _ in params.state_names(CFG)}
    assert set(out) == full
    assert out["transformer.h.0.attn.c_attn.bias"].shape == (3 * CFG.n_embd,)
    assert not out["transformer.h.2.mlp.c_fc.bias"].any()
    w = model.state_dict()["transformer.h.1.attn.c_attn.weight"]
    np.testing.assert_array_equal(out["transformer.h.1.attn.c_attn.weight"], w.T)


def test_gguf_names_are_llama_cpps_gpt2_names():
    names = [p.gguf_name(0) for p in params.PARAMS]
    assert len(set(names)) == len(names)
    assert names[:2] == ["token_embd.weight", "position_embd.weight"]
    assert "blk.0.attn_qkv.weight" in names and "blk.0.ffn_down.bias" in names
    assert names[-2:] == ["output_norm.weight", "output_norm.bias"]
