"""The one table of the GPT's parameters.

Every other place that needs to know the parameters reads this table: the
layout of the parameter block (model/gpt.py: offsets, views, state_dict names,
the weight initialisation), the core (which gets the offsets and checks them
against its own Params struct, femtogpt/kernels/), the Hugging Face format
(files/hf.py: names, Conv1D transposes, zero biases) and the GGUF export
(llama.cpp's tensor names).

A row is one tensor of the model. A per-layer tensor is stacked over layers in
memory, (n_layer, *shape); its names hold "{i}" for the layer. The rows are in
nanoGPT's state_dict order; the memory order puts the tensors that get weight
decay first (rank >= 2), so that AdamW is one pass with one split index.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ALIGN = 16   # floats per 64-byte cache line: every tensor starts on one


@dataclass(frozen=True)
class Param:
    key: str                        # the core's name (a field of its Params struct)
    shape: Callable                 # config -> the shape of one tensor (one layer's)
    per_layer: bool                 # stacked over layers: (n_layer, *shape)
    decay: bool                     # AdamW applies weight decay (rank >= 2)
    bias: bool                      # absent from a model with bias=False
    init: str                       # "normal" N(0, 0.02), "proj" N(0, 0.02/sqrt(2L)),
                                    # "ones" or "zeros" (nanoGPT's _init_weights)
    name: str                       # nanoGPT's (and Hugging Face's) state_dict name
    hf_transposed: bool             # Hugging Face stores it as Conv1D: (in, out)
    gguf: str                       # llama.cpp's GPT-2 tensor name

    def state_name(self, layer=None) -> str:
        return self.name.format(i=layer) if self.per_layer else self.name

    def gguf_name(self, layer=None) -> str:
        return self.gguf.format(i=layer) if self.per_layer else self.gguf

    def stacked_shape(self, cfg) -> tuple:
        one = tuple(self.shape(cfg))
        return (cfg.n_layer, *one) if self.per_layer else one


def _c(cfg):
    return (cfg.n_embd,)


_H = "transformer.h.{i}."

PARAMS = (
    Param("wte", lambda c: (c.vocab_size, c.n_embd), False, True, False, "normal",
          "transformer.wte.weight", False, "token_embd.weight"),
    Param("wpe", lambda c: (c.block_size, c.n_embd), False, True, False, "normal",
          "transformer.wpe.weight", False, "position_embd.weight"),
    Param("ln1w", _c, True, False, False, "ones",
          _H + "ln_1.weight", False, "blk.{i}.attn_norm.weight"),
    Param("ln1b", _c, True, False, True, "zeros",
          _H + "ln_1.bias", False, "blk.{i}.attn_norm.bias"),
    Param("qkvw", lambda c: (3 * c.n_embd, c.n_embd), True, True, False, "normal",
          _H + "attn.c_attn.weight", True, "blk.{i}.attn_qkv.weight"),
    Param("qkvb", lambda c: (3 * c.n_embd,), True, False, True, "zeros",
          _H + "attn.c_attn.bias", False, "blk.{i}.attn_qkv.bias"),
    Param("attprojw", lambda c: (c.n_embd, c.n_embd), True, True, False, "proj",
          _H + "attn.c_proj.weight", True, "blk.{i}.attn_output.weight"),
    Param("attprojb", _c, True, False, True, "zeros",
          _H + "attn.c_proj.bias", False, "blk.{i}.attn_output.bias"),
    Param("ln2w", _c, True, False, False, "ones",
          _H + "ln_2.weight", False, "blk.{i}.ffn_norm.weight"),
    Param("ln2b", _c, True, False, True, "zeros",
          _H + "ln_2.bias", False, "blk.{i}.ffn_norm.bias"),
    Param("fcw", lambda c: (4 * c.n_embd, c.n_embd), True, True, False, "normal",
          _H + "mlp.c_fc.weight", True, "blk.{i}.ffn_up.weight"),
    Param("fcb", lambda c: (4 * c.n_embd,), True, False, True, "zeros",
          _H + "mlp.c_fc.bias", False, "blk.{i}.ffn_up.bias"),
    Param("fcprojw", lambda c: (c.n_embd, 4 * c.n_embd), True, True, False, "proj",
          _H + "mlp.c_proj.weight", True, "blk.{i}.ffn_down.weight"),
    Param("fcprojb", _c, True, False, True, "zeros",
          _H + "mlp.c_proj.bias", False, "blk.{i}.ffn_down.bias"),
    Param("lnfw", _c, False, False, False, "ones",
          "transformer.ln_f.weight", False, "output_norm.weight"),
    Param("lnfb", _c, False, False, True, "zeros",
          "transformer.ln_f.bias", False, "output_norm.bias"),
)
BY_KEY = {p.key: p for p in PARAMS}
# The lm_head is the token embedding (tied): files written by other tools may
# carry it under this name, and it must then equal wte.
LM_HEAD_NAME = "lm_head.weight"


def present(cfg):
    """The rows a model of this config has (no bias rows when cfg.bias is False)."""
    return [p for p in PARAMS if cfg.bias or not p.bias]


def memory_order(cfg):
    """present(cfg) in the parameter block's order: weight-decayed tensors first."""
    rows = present(cfg)
    return [p for p in rows if p.decay] + [p for p in rows if not p.decay]


def layout(cfg):
    """({key: offset in floats}, total floats, n_decay): each tensor starts on a
    cache line; the first n_decay floats are exactly the weight-decayed tensors."""
    offsets, total, n_decay = {}, 0, 0
    for p in memory_order(cfg):
        offsets[p.key] = total
        size = 1
        for extent in p.stacked_shape(cfg):
            size *= extent
        total += -(-size // ALIGN) * ALIGN
        if p.decay:
            n_decay = total
    return offsets, total, n_decay


def state_names(cfg):
    """[(state_dict name, row, layer or None)] in nanoGPT's state_dict order:
    wte, wpe, then each layer's tensors, then ln_f."""
    rows = present(cfg)
    out = [(p.state_name(), p, None) for p in rows if not p.per_layer and p.key in ("wte", "wpe")]
    for i in range(cfg.n_layer):
        out += [(p.state_name(i), p, i) for p in rows if p.per_layer]
    out += [(p.state_name(), p, None) for p in rows
            if not p.per_layer and p.key not in ("wte", "wpe")]
    return out
