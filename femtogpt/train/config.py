"""Training configuration: every knob of a run, and the named presets.

Each field of TrainConfig is a `femtogpt train` flag (cli.py builds the parser
from these fields); validate() refuses a bad value by its flag's name before
anything runs. ARCHITECTURE lists the fields that shape the model: a resumed
or --init-from run takes them from its checkpoint.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..model import DTYPES, GELU_FORMS
from ..text.registry import TOKENIZER_KINDS
from ..text.sentencepiece_tokenizer import is_model_path

BUNDLED_DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "tinyshakespeare.txt")

ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "gelu")


@dataclass
class TrainConfig:
    """Every knob of a training run; each field is a `femtogpt train` flag."""
    data: str = BUNDLED_DATA
    out: str = "out"
    cache_dir: str = ""       # the token cache's folder ("": OUT/cache)
    tokenizer: str = "char"
    vocab_size: int = 512     # bpe, sentencepiece: the vocabulary to train up to
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.0
    bias: bool = False        # biases in Linear and LayerNorm layers (GPT-2: yes)
    gelu: str = "exact"       # GELU form: exact (erf, nanoGPT's nn.GELU) or tanh (GPT-2)
    # not architecture: a resume keeps it unless given, --init-from may change it
    dtype: str = "fp32"       # fp32, or bf16 mixed precision (model/config.py: DTYPES)
    # optimisation
    batch_size: int = 12
    grad_accum: int = 1       # micro-batches of batch_size per optimizer step
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # bookkeeping
    eval_interval: int = 250
    eval_iters: int = 20
    save_interval: int = 250
    seed: int = 1337
    threads: int = 0          # 0: OMP_NUM_THREADS, else every core
    sample_tokens: int = 500  # printed at the end of training (0: none)

    def validate(self):
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum",
                    "max_iters",
                    "eval_interval", "eval_iters", "save_interval")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, "
                                  f"got {value!r}")
        if not isinstance(self.bias, bool):
            raise ConfigError(f"bias must be True or False, got {self.bias!r}")
        if self.gelu not in GELU_FORMS:
            raise ConfigError(f"--gelu must be {' or '.join(GELU_FORMS)}, got {self.gelu!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype must be {' or '.join(DTYPES)}, got {self.dtype!r}")
        if self.tokenizer not in TOKENIZER_KINDS + ("gpt2",) and not is_model_path(
                self.tokenizer):
            raise ConfigError(f"--tokenizer must be one of {', '.join(TOKENIZER_KINDS)} or a "
                              f"SentencePiece PATH.model (or gpt2, with --init-from a GPT-2 "
                              f"folder), got {self.tokenizer!r}")
        if not isinstance(self.vocab_size, int) or not 256 <= self.vocab_size <= 65536:
            raise ConfigError(f"--vocab-size must be an integer in [256, 65536] (bpe and "
                              f"sentencepiece start from the 256 byte values), got "
                              f"{self.vocab_size!r}")
        for name in ("warmup_iters", "threads", "sample_tokens", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, "
                                  f"got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"--n-embd ({self.n_embd}) must be divisible by "
                              f"--n-head ({self.n_head})")
        # (checked in float32 too: the core would see 0.99999999 as 1.0)
        if not (0.0 <= self.dropout and np.float32(self.dropout) < 1.0):
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        for name in ("learning_rate", "min_lr"):
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1], got {value}")
        if self.learning_rate == 0.0:
            raise ConfigError("--learning-rate must be positive")
        if self.min_lr > self.learning_rate:
            raise ConfigError(f"--min-lr ({self.min_lr}) must not exceed --learning-rate "
                              f"({self.learning_rate})")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0.0):
            raise ConfigError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if not self.grad_clip >= 0.0:
            raise ConfigError(f"--grad-clip must be >= 0 (0: off), got {self.grad_clip}")
        return self


# nanoGPT's CPU recipe (its README's "baby GPT") and its Shakespeare recipe for a
# GPU, as nanoGPT's train.py runs them (no biases, exact GELU); femtoGPT's own
# model size, with GPT-2's biases and tanh GELU as before.
PRESETS = {
    "baby": TrainConfig(),
    "small": TrainConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64,
                         max_iters=5000, dropout=0.2, eval_iters=200),
    "femto": TrainConfig(n_layer=4, n_head=4, n_embd=64, block_size=64, batch_size=32,
                         bias=True, gelu="tanh"),
}


# Starting from a pretrained GPT-2 (--init-from a Hugging Face folder), the
# settings not given on the command line become these: nanoGPT's fine-tuning
# recipe (config/finetune_shakespeare.py: a small constant learning rate, no
# warmup) at a size a CPU trains in under an hour for GPT-2 124M: 16 sequences
# of 256 tokens per step as 4 micro-batches of 4, 100 steps.
FINETUNE_DEFAULTS = {
    "learning_rate": 3e-5, "min_lr": 3e-5, "warmup_iters": 0, "max_iters": 100,
    "batch_size": 4, "grad_accum": 4, "block_size": 256,
    "eval_interval": 20, "eval_iters": 10, "save_interval": 20,
}
