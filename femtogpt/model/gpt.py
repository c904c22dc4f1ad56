"""The GPT: configuration, parameter layout, forward, backward.

The architecture is nanoGPT's: token + position embeddings, n_layer pre-LayerNorm
blocks (x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))), a final LayerNorm, and an
lm_head tied to the token embedding. The arithmetic happens in femtogpt._core;
this module owns the memory layout and checks every input before the core sees it.

Memory: all parameters live in one flat float32 block, gradients in a second block
with the same layout (so a data-parallel allreduce or a gradient norm is one call
over one buffer), and AdamW's moments (femtogpt.train) in two more. Per-layer
tensors are stacked over layers, (L, ...), and the tensors that get weight decay
(rank >= 2) come first, so AdamW is one pass with a split index. state_dict()
names the same memory the way nanoGPT does.

dtype "bf16" (config.dtype, set_dtype) runs the matrix products in bf16 with
fp32 accumulation; the weights stay fp32 and the core keeps packed bf16
copies, refreshed at the next forward after any change. Every access that
hands out writable weight memory (params_flat, state_views, named_views of
the parameters, load_state_dict, the initialisation) marks them stale; a
write through a view kept from before a forward must call weights_changed().

convert_weights("bf16" | "int8") is for sampling and scoring: the linear
layers are converted once and their fp32 matrices given back, so the model
then samples, scores (forward) and nothing else.
"""
import math

import numpy as np

from .. import _core
from .._threads import pin_blas_to_one_thread
from . import params
from .config import GPTConfig
from .inputs import check_tokens
from .sampling import Sampling

pin_blas_to_one_thread()

def _checked_state(views, state_dict):
    """{name: array} of state_dict, checked against the model's views: every
    name present with its exact shape and a numeric dtype, nothing extra, and a
    tied lm_head.weight equal to the token embedding."""
    names = set(views)
    given = dict(state_dict)
    tied = given.pop("lm_head.weight", None)
    missing = sorted(names - given.keys())
    extra = sorted(given.keys() - names)
    if missing:
        raise KeyError(f"state_dict is missing {len(missing)} tensor(s): "
                       + ", ".join(missing[:5]))
    if extra:
        raise KeyError("state_dict has unexpected tensor(s): " + ", ".join(extra[:5]))
    arrays = {}
    for name, view in views.items():
        value = np.asarray(given[name])
        if value.shape != view.shape:
            raise ValueError(f"{name} has shape {value.shape}, expected {view.shape}")
        if not (np.issubdtype(value.dtype, np.floating)
                or np.issubdtype(value.dtype, np.integer)):
            raise TypeError(f"{name} has dtype {value.dtype}, expected float32")
        arrays[name] = value
    if tied is not None and not np.array_equal(np.asarray(tied),
                                               arrays["transformer.wte.weight"]):
        raise ValueError("lm_head.weight differs from transformer.wte.weight, "
                         "but they are tied in this model")
    return arrays


GRAD_TAIL = 16     # spare floats after the gradients (one aligned group)


class GPT(Sampling):
    """nanoGPT's GPT on femtogpt's compiled kernels.

    model = GPT(GPTConfig(...), seed=0)
    logits, loss = model.forward(idx, targets)   # loss None without targets
    grads = model.backward()                     # {name: ndarray} like state_dict()
    """

    def __init__(self, config, seed=0, init=True):
        # init=False leaves the weights zero, for a caller that fills them next
        # (a checkpoint read into the parameter block): nanoGPT's random init of
        # GPT-2's 124M weights costs seconds.
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.training = True
        # The parameter block's layout, from the one parameter table (params.py).
        offsets, n_total, self.n_decay = params.layout(config)
        self._shapes = {p.key: p.stacked_shape(config) for p in params.present(config)}
        # Both blocks end with GRAD_TAIL spare floats that no kernel touches: a
        # distributed trainer writes a few scalars (its loss, a stop request) into
        # the gradient block's tail, so that one allreduce sums them with the
        # gradients (femtogpt/distributed.py).
        self._params = _core.Buffer(n_total + GRAD_TAIL)
        self._grads = _core.Buffer(n_total + GRAD_TAIL)
        # Flat views of the whole blocks: what AdamW and clipping use.
        self._params_flat = np.asarray(self._params)[:n_total]
        self.grads_flat = np.asarray(self._grads)[:n_total]
        # The gradients and their tail: what a data-parallel allreduce sums.
        self.grads_with_tail = np.asarray(self._grads)
        self._offsets = offsets
        self._stacked_params = self._stacked_views(self._params_flat, offsets)
        self._stacked_grads = self._stacked_views(self.grads_flat, offsets)
        self._graph = _core.Graph(config.vocab_size, config.block_size, config.n_layer,
                                  config.n_head, config.n_embd, self._params, self._grads,
                                  offsets, bias=config.bias,
                                  gelu_exact=config.gelu == "exact")
        self._graph.set_dtype(config.dtype)
        self._named_params = self._named_views(self._stacked_params)
        self._named_grads = self._named_views(self._stacked_grads)
        self.dropout_seed = int(seed)
        self.dropout_calls = 0       # training forwards so far: each gets fresh masks
        if init:
            self._init_weights(seed)

    # -- weights and dtype -------------------------------------------------------------

    @property
    def params_flat(self):
        """The whole parameter block, flat (writable: AdamW updates it in place)."""
        self._need_fp32("params_flat")
        self._graph.weights_changed()
        return self._params_flat

    def weights_changed(self):
        """Say that the weights were written through a view handed out earlier
        (bf16: the packed copies are refreshed at the next forward)."""
        self._graph.weights_changed()

    def set_dtype(self, dtype):
        """Run the matrix products in "fp32" or "bf16" from now on (config.dtype)."""
        from .config import DTYPES
        if dtype not in DTYPES:
            from ..errors import ConfigError
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self._graph.set_dtype(dtype)
        self.config.dtype = dtype
        return self

    # -- profile ---------------------------------------------------------------------

    def profile(self, on=True):
        """Time every kernel of forward, backward and the optimizer (off by default;
        off costs one branch per kernel call).

        profile_report() then returns, summed since the last profile_reset(),
        one dict per (op, phase) that ran:
            {"op": str, "phase": "forward" | "backward" | "optimizer",
             "seconds": float, "flops": float, "calls": int}
        op is the kind of layer, summed over layers: "embedding", "layernorm",
        "qkv" (c_attn), "attention" (q @ k^T, softmax, dropout, att @ v),
        "attproj", "residual", "dropout" (the embeddings' and the branches';
        attention's own is inside "attention"), "fc", "gelu", "fcproj",
        "lm_head", "loss" (softmax + cross-entropy), and in the optimizer phase
        "bf16_pack" (bf16 only: both packed layouts of every matrix, at the
        first forward after a change), "adamw" and "grad_norm" (their calls
        through femtogpt.train.optim). flops counts the matrix products as
        computed, 2 per multiply-add (attention: its full T x T, 4*B*T*T*C
        forward, 8 backward, 10 when it recomputes the probabilities), and is
        0 for every other op. The clock is omp_get_wtime; the time between two
        kernels goes to the next one.
        """
        self._graph.profile(bool(on))
        return self

    @property
    def profiling(self):
        return self._graph.profiling

    def profile_reset(self):
        self._graph.profile_reset()

    def profile_report(self):
        """[{"op", "phase", "seconds", "flops", "calls"}] (see profile())."""
        return self._graph.profile_report()

    def profile_add(self, op, phase, seconds, flops=0.0):
        """Charge time measured outside the graph (the optimizer) to (op, phase)."""
        self._graph.profile_add(op, phase, float(seconds), float(flops))

    # -- layout -------------------------------------------------------------------

    def _stacked_views(self, flat, offsets):
        return {key: flat[offsets[key]:offsets[key] + int(np.prod(shape))].reshape(shape)
                for key, shape in self._shapes.items()}

    def _named_views(self, stacked):
        # nanoGPT's names, in its state_dict order; a layer's tensor is its slice.
        return {name: stacked[p.key] if layer is None else stacked[p.key][layer]
                for name, p, layer in params.state_names(self.config)}

    def named_views(self, flat):
        """{name: view} into any flat array laid out like params_flat (e.g. AdamW moments)."""
        if flat.shape != self._params_flat.shape:
            raise ValueError(f"flat array has shape {flat.shape}, expected {self._params_flat.shape}")
        if np.may_share_memory(flat, self._params_flat):
            self._graph.weights_changed()
        return self._named_views(self._stacked_views(flat, self._offsets))

    def _init_weights(self, seed):
        # nanoGPT: every weight N(0, 0.02), residual projections N(0, 0.02/sqrt(2L)),
        # biases 0, LayerNorm weights 1. Filled in state_dict order from one stream.
        rng = np.random.default_rng(seed)
        std = {"normal": 0.02, "proj": 0.02 / np.sqrt(2 * self.config.n_layer)}
        self._graph.weights_changed()
        self._params_flat[:] = 0.0
        for name, p, _ in params.state_names(self.config):
            view = self._named_params[name]
            if p.init == "ones":
                view[...] = 1.0
            elif p.init in std:
                view[...] = rng.standard_normal(view.shape, dtype=np.float32) * std[p.init]

    # -- state ----------------------------------------------------------------------

    def num_parameters(self):
        return sum(v.size for v in self._named_params.values())

    def state_views(self):
        """{nanoGPT name: view into the model's own memory}: what saving and
        loading a checkpoint read and write directly (no copy). Writing into a
        view changes the model (bf16: write before the next forward, or call
        weights_changed())."""
        self._need_fp32("state_views()")
        self._graph.weights_changed()
        return dict(self._named_params)

    def state_dict(self):
        """{nanoGPT name: float32 array}, copies (the model keeps its own memory)."""
        self._need_fp32("state_dict()")
        return {name: view.copy() for name, view in self._named_params.items()}

    def load_state_dict(self, state_dict):
        """Copy values in. Every name must be present with its exact shape."""
        self._need_fp32("load_state_dict()")
        arrays = _checked_state(self._named_params, state_dict)
        # Only after every check passed: nothing is half-loaded on error.
        for name, value in arrays.items():
            self._named_params[name][...] = value
        self._graph.weights_changed()

    # -- compute ----------------------------------------------------------------------

    def train(self, mode=True):
        """Dropout on (training) or off (evaluation), as in PyTorch."""
        if mode:
            self._need_fp32("train()")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size) float32 and the mean cross-entropy (or None)."""
        if self._graph.fp32_released:
            return self._scored(idx, targets)
        loss = self._run_forward(idx, targets)
        B, T = self._graph.B, self._graph.T
        logits = self._graph.logits_view().reshape(B, T, self.config.vocab_size).copy()
        return logits, loss

    __call__ = forward

    def _run_forward(self, idx, targets):
        cfg = self.config
        idx32 = check_tokens("idx", idx, cfg)
        targets32 = None
        if targets is not None:
            targets32 = check_tokens("targets", targets, cfg, shape=idx32.shape)
        dropout, seed = 0.0, 0
        if self.training and cfg.dropout > 0.0:
            dropout = cfg.dropout
            seed = (self.dropout_seed * 0x9E3779B97F4A7C15 + self.dropout_calls) % 2**64
            self.dropout_calls += 1
        return self._graph.forward(idx32, targets32, dropout, seed)

    def loss(self, idx, targets):
        """The mean loss only: forward without copying the logits out."""
        if self._graph.fp32_released:
            return self._scored(idx, targets)[1]
        return self._run_forward(idx, targets)

    def zero_grad(self):
        self.grads_flat[:] = 0.0

    def backward(self, accumulate=False, loss_scale=1.0):
        """Gradients of the last forward's mean loss: {name: array} like state_dict().

        With accumulate=True they are added to the gradients already held
        (gradient accumulation) and nothing is copied out. loss_scale multiplies
        the loss whose gradient is taken (a data-parallel rank's share of the
        global batch), at no extra cost.
        """
        self._need_fp32("backward()")
        if not self._graph.has_targets:
            raise RuntimeError("backward() needs a forward() with targets first")
        loss_scale = float(loss_scale)
        if not (0.0 < loss_scale < math.inf):
            raise ValueError(f"loss_scale must be positive and finite, got {loss_scale}")
        if not accumulate:
            self.zero_grad()
        self._graph.backward(loss_scale)
        if accumulate:
            return None
        return {name: view.copy() for name, view in self._named_grads.items()}

    def attention_probs(self):
        """The last forward's attention probabilities, (n_layer, B, n_head, T, T)
        float32 (row i: how much position i attends to each position j <= i),
        or None when that batch was too large for them to be kept."""
        view = self._graph.attention_view()
        if view is None:
            return None
        cfg = self.config
        B, T = self._graph.B, self._graph.T
        return view.reshape(cfg.n_layer, B, cfg.n_head, T, T).copy()
