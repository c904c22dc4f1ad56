"""GPTConfig: the shape of a GPT, checked when it is made.

Every field is a plain value that a checkpoint stores as JSON (to_dict) and
the command line sets by flag (femtogpt/train/config.py).
"""
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..errors import ConfigError

GELU_FORMS = ("tanh", "exact")
# fp32, or bf16 mixed precision (the matrix products' operands in bf16, fp32
# accumulation; weights, optimizer and everything else fp32: _core's
# training_graph.pxi). Not architecture: checkpoints hold fp32 weights, so a
# model file loads in either.
DTYPES = ("fp32", "bf16")
# The types sampling and scoring read the linear layers' weights in
# (GPT.convert_weights, femtogpt.load(dtype=)): converted once from the fp32
# checkpoint; embeddings and LayerNorms stay fp32 (_core's linear_weights.pxi).
WEIGHT_DTYPES = ("fp32", "bf16", "int8")


@dataclass
class GPTConfig:
    vocab_size: int = 65
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    # GPT-2's model (the defaults) has biases in every Linear and LayerNorm and the
    # tanh GELU; nanoGPT's train.py trains with bias=False and the exact GELU.
    bias: bool = True
    gelu: str = "tanh"        # "tanh" (GPT-2's approximation) or "exact" (erf)
    dtype: str = "fp32"       # "fp32" or "bf16" (mixed precision, see DTYPES)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "bias":
                if not isinstance(value, (bool, np.bool_)):
                    raise ConfigError(f"bias must be True or False, got {value!r}")
                self.bias = bool(value)
                continue
            if f.name == "dtype":
                if value not in DTYPES:
                    raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, "
                                      f"got {value!r}")
                continue
            if f.name == "gelu":
                if value not in GELU_FORMS:
                    raise ConfigError(f"gelu must be one of {', '.join(GELU_FORMS)}, "
                                      f"got {value!r}")
                continue
            if f.name == "dropout":
                if isinstance(value, bool) or not isinstance(value, (int, float, np.floating,
                                                                     np.integer)):
                    raise ConfigError(f"dropout must be a number, got {value!r}")
                # The core works in float32: 0.99999999 would become 1.0 there.
                if not (0.0 <= value and np.float32(value) < 1.0):
                    raise ConfigError(f"dropout must be in [0, 1), got {value}")
                self.dropout = float(value)
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ConfigError(f"{f.name} must be an integer, got {value!r}")
            if value < 1:
                raise ConfigError(f"{f.name} must be positive, got {value}")
            setattr(self, f.name, int(value))
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by "
                              f"n_head ({self.n_head})")

    def to_dict(self):
        return asdict(self)
