"""Files: tensor files (safetensors with per-tensor digests, written
atomically, read as hostile input), checkpoints, run folders, the Hugging
Face GPT-2 format, and `femtogpt verify`.

May import: the model (to build one from a file), text (a checkpoint carries
its tokenizer) and femtogpt.errors; never training or the front ends.
"""
from .load import load
from .rundir import BEST_NAME, LATEST_NAME, METRICS_NAME, checkpoint_path
from .tensorfile import TensorFile

__all__ = ["BEST_NAME", "LATEST_NAME", "METRICS_NAME", "TensorFile", "checkpoint_path", "load"]
