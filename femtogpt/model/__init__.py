"""The model: GPTConfig, and GPT (forward, backward, generate) over the
compiled core's one parameter block, one gradient block and one activation
block.

May import: the core (femtogpt._core, chosen by femtogpt._dispatch) and
femtogpt.errors; never text, files, training or the front ends.
"""
from .config import DTYPES, GELU_FORMS, WEIGHT_DTYPES, GPTConfig
from .gpt import GPT

__all__ = ["DTYPES", "GELU_FORMS", "GPT", "GPTConfig", "WEIGHT_DTYPES"]
