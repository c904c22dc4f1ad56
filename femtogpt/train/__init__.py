"""Training: the settings and presets (config.py), a run's start and resume,
its loop, evaluation and saving, AdamW and its schedule, batches of training
windows, and MPI data parallelism.

May import: the model, files, text and femtogpt.errors; never the front ends.
"""
from .config import ARCHITECTURE, FINETUNE_DEFAULTS, PRESETS, TrainConfig
from .loop import train
from .optim import AdamW, get_lr, grad_norm
from .run import Run

__all__ = ["ARCHITECTURE", "AdamW", "FINETUNE_DEFAULTS", "PRESETS", "Run", "TrainConfig",
           "get_lr", "grad_norm", "train"]
