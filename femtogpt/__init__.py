"""femtogpt: train a small GPT from scratch on your own text, on a CPU.

    from femtogpt import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=65), seed=0)
    logits, loss = model.forward(idx, targets)
    grads = model.backward()

    model, tokenizer = load("out")      # a run directory or checkpoint file
"""
__version__ = "0.1.0"

from ._dispatch import build_info, load_core  # noqa: E402

_core = load_core()     # the build for this CPU, before any module imports _core
from ._core import get_num_threads, set_num_threads  # noqa: E402
from .errors import CheckpointError, ConfigError, DataError, FemtoGPTError, TokenizerError
from .files import load
from .model import GPT, GPTConfig
from .text import BPETokenizer, ByteTokenizer, CharTokenizer

__all__ = [
    "GPT", "GPTConfig", "load", "CharTokenizer", "ByteTokenizer", "BPETokenizer", "get_num_threads", "set_num_threads", "FemtoGPTError",
    "ConfigError", "DataError", "TokenizerError", "CheckpointError", "build_info", "__version__",
]
