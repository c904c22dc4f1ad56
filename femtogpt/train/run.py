"""A training run: its data, model, optimizer and random streams; one step,
an evaluation, a save.

Where it starts from and which settings it then has is start.py's; its folder
(resume or start, tidying, metrics) folder.py's; what a training state holds
state.py's; the loop around it loop.py's.
"""
import math
import os
import shutil
from dataclasses import fields, replace

import numpy as np

from .. import _core
from ..errors import CheckpointError, ConfigError, FemtoGPTError
from ..files.checkpoint import model_from_file, model_meta, save_checkpoint
from ..files.hf import is_hf_folder
from ..files.tensorfile import TensorFile
from ..model import GPT, GPTConfig
from . import start, state
from .batches import check_split_size, get_batch
from .config import ARCHITECTURE, TrainConfig
from .distributed import (TAIL_LOSS, TAIL_STOP_SLOTS, Solo, batch_share, default_threads,
                          fingerprint, rank_dropout_seed)
from .folder import RunFolder
from .optim import AdamW, get_lr, grad_norm
from .state import identity as start_identity


class Run:
    """One training run: data, model, optimizer, RNG streams and bookkeeping.

    With a distributed `comm` (femtogpt/distributed.py), this is one rank's
    part of the run: it computes its share of each batch, and only rank 0
    writes to the run directory.
    """

    def __init__(self, cfg, log=print, init_from=None, explicit=None, comm=None,
                 overwrite=False, progress=None):
        """explicit: the fields the user gave (the command line's flags); on a
        resume the others continue as saved. None (the Python API): every field
        of cfg is meant, except the architecture and tokenizer under init_from,
        which come from the source. overwrite: replace a run already in cfg.out.
        progress: the token cache's progress bars (None: on a terminal only)."""
        # Everything that can be wrong (options, data, checkpoints) is checked
        # before anything is written: a refused run leaves the disk as it was.
        # A copy: the caller's config (a preset, say) is never changed.
        cfg = replace(cfg)
        if explicit is None:
            explicit = {f.name for f in fields(TrainConfig)}
            if init_from is not None:
                explicit -= set(ARCHITECTURE) | {"tokenizer", "vocab_size"}
        explicit = set(explicit)
        # Starting from a pretrained GPT-2: nanoGPT's fine-tuning recipe for the
        # settings not given, before they are checked (a resume then takes the
        # saved ones instead, as for any setting not given).
        self.finetune_defaults = {}
        if init_from is not None and is_hf_folder(init_from):
            self.finetune_defaults = start.finetune_defaults(cfg, explicit, init_from)
            for name, value in self.finetune_defaults.items():
                setattr(cfg, name, value)
        cfg = self.cfg = cfg.validate()
        self.init_from = None if init_from is None else os.path.abspath(init_from)
        self.overwrite = bool(overwrite)
        self.comm = comm = comm or Solo()
        self.writes = comm.rank == 0      # the one rank that prints and saves
        self.log = log
        self.folder = RunFolder(cfg.out)
        self.latest_path = self.folder.latest_path
        self.best_path = self.folder.best_path
        self.metrics_path = self.folder.metrics_path
        threads = cfg.threads or (default_threads(comm) if comm.distributed else 0)
        if threads:
            _core.set_num_threads(threads)

        resume = self.folder.decide_resume(self.init_from, start_identity(cfg),
                                           self.overwrite, log)
        if resume:
            self._resume(explicit)    # the run's own settings, --data included
        if self.cfg.batch_size < comm.size:
            raise ConfigError(f"--batch-size {self.cfg.batch_size} is smaller than the number "
                              f"of ranks ({comm.size}): every rank needs at least one sequence")
        # Saved absolute, so that a resume from another directory finds the text.
        self.cfg.data = os.path.abspath(self.cfg.data)
        cfg = self.cfg
        if resume:
            given = self.tokenizer
        elif init_from is not None:
            model, given = start.init_from(self.cfg, init_from, explicit,
                                           self.finetune_defaults, self.log)
            self.dropout_seed = self.cfg.seed
        else:
            if cfg.tokenizer == "gpt2":
                raise ConfigError("--tokenizer gpt2 comes with a GPT-2 model: use "
                                  "--init-from GPT2_FOLDER (a Hugging Face GPT-2 folder)")
            given = None        # fitted to the corpus, in the token cache
        # What this start creates, so that a run refused from here on (its data
        # is too short, say) leaves the disk as it was; the cache's messages are
        # printed once the data is accepted (a refusal is then one line).
        cache_root = self.cache_root = cfg.cache_dir or os.path.join(cfg.out, "cache")
        created = [p for p in (cfg.out, cache_root) if not os.path.exists(p)]
        messages, tokens = [], None
        try:
            tokens = start.open_corpus(cfg, comm, cache_root, given, resume, progress,
                                       messages.append)
            self._start_with(tokens, resume, init_from, given,
                             model if init_from is not None and not resume else None)
        except FemtoGPTError:
            if tokens is not None and tokens.built:
                shutil.rmtree(tokens.folder, ignore_errors=True)
            for path in reversed(created):
                try:
                    os.rmdir(path)          # only if nothing else is in it
                except OSError:
                    pass
            raise
        for message in messages:
            self.log(message)
        self.metrics = []
        self.resumed = resume
        if not comm.distributed:
            self.prepare_out_dir()
        # (distributed: _start_run does it once every rank has started)

    def _start_with(self, tokens, resume, init_from, given, model):
        """The model (for a fresh run), the streams and the data checks."""
        cfg, comm = self.cfg, self.comm
        if not resume:
            tokenizer = tokens.tokenizer if given is None else given
            if init_from is None:
                model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size,
                                      block_size=cfg.block_size, n_layer=cfg.n_layer,
                                      n_head=cfg.n_head, n_embd=cfg.n_embd,
                                      dropout=cfg.dropout, bias=cfg.bias, gelu=cfg.gelu,
                                      dtype=cfg.dtype),
                            seed=cfg.seed)
            self.model, self.tokenizer = model, tokenizer
            self.optimizer = AdamW(model, cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay)
            self.iter = 0
            self.last_eval_iter = -1      # the iteration whose evaluation is recorded last
            self.best_val_loss = math.inf
            self.elapsed = 0.0
            # Separate streams, so that evaluating does not change the training batches.
            self.rng_train = state.train_stream(cfg.seed, comm.rank)
            self.rng_eval = np.random.default_rng([cfg.seed, 1])
            self.dropout_seed = self.model.dropout_seed
        self.model.dropout_seed = rank_dropout_seed(self.dropout_seed, comm.rank)
        self.model.train()
        # The global batch is cfg.batch_size; this rank computes its share of it,
        # and weights its gradient and loss by that share before they are summed.
        self.local_batch = batch_share(cfg.batch_size, comm.rank, comm.size)
        self.share = self.local_batch / cfg.batch_size
        # Where this rank's rows start in a batch that every rank draws whole (eval).
        self.batch_offset = sum(batch_share(cfg.batch_size, r, comm.size)
                                for r in range(comm.rank))

        self.tokens = tokens
        self.train_ids, self.val_ids = tokens.train, tokens.val
        check_split_size(self.train_ids, cfg.block_size, "train")
        check_split_size(self.val_ids, cfg.block_size, "val")
        # Characters per token of the val split: bits per character compare runs
        # whose tokenizers differ.
        self.val_chars_per_token = tokens.val_chars / len(self.val_ids)
        self.data_info = {"path": cfg.data, "chars": tokens.chars,
                          "tokens": int(len(self.train_ids) + len(self.val_ids)),
                          "files": len(tokens.sources), "digest": tokens.digest}
        saved_digest = self.saved_data_info.get("digest") if resume else None
        saved_chars = self.saved_data_info.get("chars") if resume else None
        if (saved_digest not in (None, tokens.digest)
                or saved_chars not in (None, tokens.chars)):
            self.log(f"warning: {cfg.data} has changed since this run was saved "
                     f"({tokens.chars:,} characters, was {saved_chars:,}): "
                     f"training continues on the new text, so it will not match an "
                     f"uninterrupted run")

    def _resume(self, explicit):
        with TensorFile(self.latest_path) as f:
            meta = f.meta
            if meta.get("kind") != state.TRAIN_STATE:
                raise CheckpointError(f"{self.latest_path} is not a training state")
            model, tokenizer = model_from_file(f)
            start.resume_settings(self.cfg, explicit, meta, model, tokenizer,
                                  self.latest_path, self.log)
            self.cfg.validate()
            model.config.dropout = self.cfg.dropout
            self.model, self.tokenizer = model, tokenizer
            self.optimizer = AdamW(model, self.cfg.beta1, self.cfg.beta2,
                                   weight_decay=self.cfg.weight_decay)
            self.optimizer.load_from(f)
        n_streams, saved_threads = state.restore(self, meta, self.latest_path)
        if n_streams != self.comm.size:
            self.log(f"warning: this run was saved by {n_streams} "
                     f"rank{'s' if n_streams > 1 else ''}, now {self.comm.size}: "
                     f"training continues, but the batches will not be those of an "
                     f"uninterrupted run")
        if saved_threads not in (None, _core.get_num_threads()):
            self.log(f"note: this run was saved with {saved_threads} threads, now "
                     f"{_core.get_num_threads()}: the numbers will differ in the last bits "
                     f"from an uninterrupted run")
        self.log(f"resuming from {self.latest_path} at iteration {self.iter}")

    def prepare_out_dir(self):
        """Create --out, or tidy it for a resumed run (rank 0 only)."""
        self.folder.prepare(self.resumed, self.overwrite, self.last_eval_iter)


    # -- one step -----------------------------------------------------------------

    def train_step(self, stop=0, batch=None):
        """One optimisation step; returns (loss, lr, stop).

        `stop` is the signal (SIGINT, SIGTERM) this rank received, 0 for none;
        the returned stop is the one received on any rank, so that every rank
        stops after the same step and reports the same signal.
        `batch` (x, y), or a list of grad_accum of them, replaces the random
        draw (tests feed chosen samples).
        """
        cfg, model, comm = self.cfg, self.model, self.comm
        micro = cfg.grad_accum
        if batch is None:
            batches = [get_batch(self.train_ids, self.local_batch, cfg.block_size,
                                 self.rng_train, "train") for _ in range(micro)]
        else:
            batches = [batch] if isinstance(batch, tuple) else list(batch)
            if len(batches) != micro:
                raise ValueError(f"expected {micro} micro-batches, got {len(batches)}")
        model.zero_grad()
        loss = 0.0
        for x, y in batches:
            # The step's mean gradient is the sum over ranks and micro-batches of
            # each one's mean gradient, weighted by its share of the rank's batch
            # (1 in one process) over the number of micro-batches: one batch
            # grad_accum times larger, computed in one micro-batch's memory.
            loss += model.loss(x, y) / micro
            model.backward(accumulate=True, loss_scale=self.share / micro)
        if comm.distributed:
            tail = model.grads_with_tail[model.grads_flat.size:]
            tail[:] = 0.0
            tail[TAIL_LOSS] = loss * self.share
            if stop:
                tail[TAIL_STOP_SLOTS[stop]] = 1.0
            comm.allreduce_sum(model.grads_with_tail)
            loss = float(tail[TAIL_LOSS])
            stop = max((signum for signum, slot in TAIL_STOP_SLOTS.items()
                        if tail[slot] > 0.0), default=0)
        norm = grad_norm(model)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            err = FloatingPointError(
                f"loss became {loss} (gradient norm {norm}) at iteration {self.iter}; "
                f"stopped without saving. Try a lower --learning-rate")
            err.agreed = True       # every rank sees the same summed numbers
            raise err
        scale = 1.0
        if cfg.grad_clip > 0.0 and norm > cfg.grad_clip:
            scale = cfg.grad_clip / (norm + 1e-6)
        lr = get_lr(self.iter, cfg)
        self.optimizer.step(lr, scale)
        self.iter += 1
        return loss, lr, stop

    def estimate_loss(self):
        """Mean loss over eval_iters random batches of each split, dropout off.

        Distributed, every rank draws every batch (so the stream stays in step)
        and computes its own rows of it, as in training, so that no rank ever
        needs the activations of the whole batch; one sum gathers the losses,
        weighted by each rank's share.
        """
        cfg, model, comm = self.cfg, self.model, self.comm
        rows = slice(self.batch_offset, self.batch_offset + self.local_batch)
        model.eval()
        losses = np.zeros((2, cfg.eval_iters))
        for row, (split, ids) in enumerate((("train", self.train_ids),
                                            ("val", self.val_ids))):
            for i in range(cfg.eval_iters):
                x, y = get_batch(ids, cfg.batch_size, cfg.block_size, self.rng_eval, split)
                losses[row, i] = model.loss(x[rows], y[rows]) * self.share
        comm.allreduce_sum(losses, "the evaluation sum")
        model.train()
        return {"train": float(np.mean(losses[0])), "val": float(np.mean(losses[1]))}

    # -- saving --------------------------------------------------------------------

    def save_latest(self):
        """Write the whole training state (rank 0; every rank must call it, since
        each rank's data stream is part of the state)."""
        if not np.all(np.isfinite(self.model.params_flat)):
            err = FloatingPointError("weights are not finite; the last good checkpoint "
                                     "was kept")
            err.agreed = True       # the weights are the same on every rank
            raise err
        gathered = self.comm.gather((self.rng_train.bit_generator.state,
                                     fingerprint(self.model.params_flat)
                                     if self.comm.distributed else 0))
        if not self.writes:
            return
        streams = [state for state, _ in gathered]
        prints = [p for _, p in gathered]
        if any(p != prints[0] for p in prints):
            bad = next(r for r, p in enumerate(prints) if p != prints[0])
            raise FemtoGPTError(f"at iteration {self.iter} the weights of rank {bad} differ "
                                f"from rank 0's (the MPI library's allreduce did not give "
                                f"every rank the same sum); the last checkpoint was kept")
        # Views, not copies: the tensors go from the model's memory to the file.
        tensors = self.model.state_views()
        tensors.update(self.optimizer.state_views())
        meta = model_meta(self.model, self.tokenizer)
        meta.update(state.state_meta(self, streams, _core.get_num_threads()))
        save_checkpoint(self.latest_path, tensors, meta)

    def save_best(self, val_loss):
        meta = model_meta(self.model, self.tokenizer)
        meta.update(state.best_meta(self, val_loss))
        save_checkpoint(self.best_path, self.model.state_views(), meta)

    def record(self, losses, lr, tokens_per_s):
        entry = {"iter": self.iter, "train_loss": losses["train"], "val_loss": losses["val"],
                 "val_bpc": losses["val"] * (1.0 / self.val_chars_per_token) / math.log(2),
                 "lr": lr, "tokens_per_s": tokens_per_s, "elapsed_s": self.elapsed}
        self.folder.append_metrics(entry)
        self.metrics.append(entry)
        return entry
