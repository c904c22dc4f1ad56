"""Optimisation: nanoGPT's learning-rate schedule, AdamW, the gradient's norm.

The update itself is one kernel over the flat parameter block (_core.pyx:
adamw_update); the moments are two more flat blocks with the same layout, so
they are saved and loaded by the same names as the parameters.
"""
import math

import numpy as np

from .. import _core
from ..files.checkpoint import read_tensors_into


def get_lr(it, cfg):
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at max_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.max_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


class AdamW:
    """PyTorch's AdamW over the model's flat parameter block.

    The moments are two more flat blocks with the parameters' layout. Weight
    decay applies to the first model.n_decay elements (the rank >= 2 tensors).
    """

    def __init__(self, model, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1):
        self.model = model
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self._m = _core.Buffer(model.params_flat.size)
        self._v = _core.Buffer(model.params_flat.size)
        self.exp_avg = np.asarray(self._m)
        self.exp_avg_sq = np.asarray(self._v)
        self.step_count = 0

    def step(self, lr, grad_scale=1.0):
        self.step_count += 1
        m = self.model
        t = _core.py_wtime() if m.profiling else 0.0
        # m.params_flat also tells a bf16 model that its weights change here.
        _core.py_adamw_update(m.params_flat, self.exp_avg, self.exp_avg_sq, m.grads_flat,
                              m.n_decay, lr, self.beta1, self.beta2, self.eps,
                              self.weight_decay, grad_scale, self.step_count)
        if m.profiling:
            m.profile_add("adamw", "optimizer", _core.py_wtime() - t)

    def state_views(self):
        """{checkpoint name: view of the moments' own memory} (saved without a copy)."""
        views = {}
        for prefix, flat in (("optimizer.exp_avg.", self.exp_avg),
                             ("optimizer.exp_avg_sq.", self.exp_avg_sq)):
            views.update({prefix + k: v for k, v in self.model.named_views(flat).items()})
        return views

    def load_from(self, f):
        """Read the moments from an open checkpoint straight into their blocks."""
        read_tensors_into(f, self.state_views(), "")


def grad_norm(model):
    t = _core.py_wtime() if model.profiling else 0.0
    norm = math.sqrt(_core.py_sum_of_squares(model.grads_flat))
    if model.profiling:
        model.profile_add("grad_norm", "optimizer", _core.py_wtime() - t)
    return norm
