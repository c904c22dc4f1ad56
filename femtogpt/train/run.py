"""Training: a run (its data, model, optimizer and random streams), the loop,
evaluation, saving and resuming.

The loop is nanoGPT's: random windows of the training text, forward, backward,
clip the gradient's global norm, AdamW with linear warmup and cosine decay,
evaluate both splits every eval_interval iterations. Everything needed to
continue a run exactly (weights, AdamW moments, iteration, RNG states) is saved
atomically in OUT/ckpt.safetensors; the best model so far in OUT/best.safetensors.
The settings are config.py's, the optimizer optim.py's, the folder rundir.py's.
"""
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, fields, replace

import numpy as np

from .. import _core
from ..files.checkpoint import model_from_file, model_meta, save_checkpoint
from ..files.rundir import BEST_NAME, LATEST_NAME, checkpoint_path
from ..files.tensorfile import TensorFile
from .config import (ARCHITECTURE, BUNDLED_DATA, FINETUNE_DEFAULTS,  # noqa: F401 (re-exported)
                     PRESETS, TrainConfig)
from .distributed import (TAIL_LOSS, TAIL_STOP_SLOTS, Solo, batch_share, default_threads,
                          fingerprint, rank_dropout_seed)
from .batches import check_split_size, get_batch
from ..errors import CheckpointError, ConfigError, DataError, FemtoGPTError
from ..files.hf import is_hf_folder
from ..model import GPT, GPTConfig
from .optim import AdamW, get_lr, grad_norm  # noqa: F401 (re-exported)
from ..files.rundir import (RUN_FILES, check_out_dir, plot_losses, read_metrics, remove_if_present,
                     remove_stale_temp_files)
from ..text.token_cache import open_tokens



def _train_stream(seed, rank):
    """The data-sampling random stream of one rank. Rank 0's is a single-process
    run's own, so a one-rank distributed run is that run."""
    return np.random.default_rng([seed, 0] if rank == 0 else [seed, 0, rank])


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
            self.finetune_defaults = _finetune_defaults(cfg, explicit, init_from)
            for name, value in self.finetune_defaults.items():
                setattr(cfg, name, value)
        cfg = self.cfg = cfg.validate()
        self.init_from = None if init_from is None else os.path.abspath(init_from)
        self.overwrite = bool(overwrite)
        self.comm = comm = comm or Solo()
        self.writes = comm.rank == 0      # the one rank that prints and saves
        self.log = log
        check_out_dir(cfg.out)
        self.latest_path = os.path.join(cfg.out, LATEST_NAME)
        self.best_path = os.path.join(cfg.out, BEST_NAME)
        self.metrics_path = os.path.join(cfg.out, "metrics.jsonl")
        threads = cfg.threads or (default_threads(comm) if comm.distributed else 0)
        if threads:
            _core.set_num_threads(threads)

        resume = self._decide_resume()
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
            model, given = self._init_from(init_from, explicit)
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
            tokens = self._open_tokens(given, resume, progress, messages.append)
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
                                      dropout=cfg.dropout, bias=cfg.bias, gelu=cfg.gelu),
                            seed=cfg.seed)
            self.model, self.tokenizer = model, tokenizer
            self.optimizer = AdamW(model, cfg.beta1, cfg.beta2, weight_decay=cfg.weight_decay)
            self.iter = 0
            self.last_eval_iter = -1      # the iteration whose evaluation is recorded last
            self.best_val_loss = math.inf
            self.elapsed = 0.0
            # Separate streams, so that evaluating does not change the training batches.
            self.rng_train = _train_stream(cfg.seed, comm.rank)
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

    def _decide_resume(self):
        """Continue the run in --out, or start one; refuse to replace another run.

        The same command again resumes (with --init-from too, when the saved run
        was started from the same source). Anything else that would replace a
        run's files needs overwrite=True (--overwrite).
        """
        out = self.cfg.out
        present = [n for n in RUN_FILES if os.path.exists(os.path.join(out, n))]
        if not present or self.overwrite:
            return False
        how = "use another --out, or --overwrite to replace it"
        if LATEST_NAME in present:
            with TensorFile(self.latest_path) as f:
                saved = f.meta
            started_from = saved.get("init_from")
            if self.init_from is None or self.init_from == started_from:
                return True
            origin = f"started from {started_from}" if started_from else "trained from scratch"
            raise ConfigError(f"--out {out} already holds another run ({origin}, "
                              f"{saved.get('iter', '?')} iterations); starting from "
                              f"{self.init_from} would replace it: {how}")
        # Run files but no training state: a run killed before its first save
        # (the same command starts it again) or the remains of another one.
        if os.path.isfile(self.best_path):
            with TensorFile(self.best_path) as f:
                saved = f.meta
            if (saved.get("train_config") == self._identity()
                    and saved.get("init_from") == self.init_from):
                self.log(f"note: {out} holds the start of this same run, stopped before its "
                         f"first training state was saved: starting it again")
                return False
        raise ConfigError(f"--out {out} holds files of another run ({', '.join(present)}) and "
                          f"no training state to resume: {how}")

    def _open_tokens(self, tokenizer, prefer_fit, progress, log):
        """The corpus as a token cache (token_cache.py), reused or built.
        Distributed, rank 0 builds it while the others wait, then they open it."""
        cfg, comm = self.cfg, self.comm
        fit = (cfg.tokenizer, cfg.vocab_size)

        def open_here(log):
            return open_tokens(cfg.data, cfg.tokenizer, cfg.vocab_size, tokenizer=tokenizer,
                               cache_dir=self.cache_root, log=log, progress=progress,
                               prefer_fit=fit if prefer_fit else None, exclude=[cfg.out])
        if not comm.distributed:
            return open_here(log)
        tokens = status = None
        if comm.rank == 0:
            try:
                tokens = open_here(log)
                status = ("ok",)
            except FemtoGPTError as err:
                status = ("error", str(err))
        statuses = comm.allgather(status or ("ok",))
        failed = [(rank, st[1]) for rank, st in enumerate(statuses) if st[0] == "error"]
        if failed:
            rank, message = failed[0]
            err = DataError(message if rank == comm.rank else f"rank {rank}: {message}")
            err.agreed = True
            raise err
        return tokens if tokens is not None else open_here(lambda message: None)

    def _identity(self):
        """What makes two runs the same run: the config, but where --out is and
        how many threads compute it."""
        identity = asdict(self.cfg)
        identity["data"] = os.path.abspath(identity["data"])
        for name in ("out", "threads", "cache_dir"):
            identity.pop(name)
        return identity

    def prepare_out_dir(self):
        """Create --out, or tidy it for a resumed run (rank 0 only)."""
        out, resume = self.cfg.out, self.resumed
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot use --out {out}: {err.strerror or err}") from None
        remove_stale_temp_files(out)
        if self.overwrite:
            for name in RUN_FILES:
                remove_if_present(os.path.join(out, name))
        if resume:
            # Evaluations the saved state has not seen will be redone: drop their rows.
            rows = [r for r in read_metrics(self.metrics_path)
                    if r.get("iter", -1) <= self.last_eval_iter]
            with open(self.metrics_path + ".tmp", "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
            os.replace(self.metrics_path + ".tmp", self.metrics_path)
        elif os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)    # this same run, started again

    def _init_from(self, source, explicit):
        from ..files.hf import load_hf
        if is_hf_folder(source):
            file = source
            model, tokenizer = load_hf(source)
            cfg = self.cfg
            self.log(f"fine-tuning a pretrained GPT-2 (nanoGPT's recipe for the settings "
                     f"not given): learning rate {cfg.learning_rate:g}"
                     f"{', constant' if cfg.min_lr == cfg.learning_rate else ''}; "
                     f"{cfg.batch_size} sequences x {cfg.grad_accum} micro-batches of "
                     f"{cfg.block_size} tokens per step; {cfg.max_iters} steps")
        else:
            file = checkpoint_path(source, BEST_NAME)
            with TensorFile(file) as f:
                model, tokenizer = model_from_file(f)
        mc = model.config
        crop = "block_size" in explicit or "block_size" in self.finetune_defaults
        if crop and self.cfg.block_size != mc.block_size:
            if self.cfg.block_size > mc.block_size:
                raise ConfigError(f"--block-size {self.cfg.block_size} is more than the "
                                  f"context of the model in {source} ({mc.block_size})")
            model = _cropped(model, self.cfg.block_size)
            self.log(f"context cropped from {mc.block_size} to {self.cfg.block_size} "
                     f"positions (the position table's first rows)")
            mc = model.config
        for name in ARCHITECTURE:
            if name in explicit and getattr(self.cfg, name) != getattr(mc, name):
                raise ConfigError(
                    f"--init-from {source}: its model has {name}={getattr(mc, name)}, "
                    f"but --{name.replace('_', '-')} {getattr(self.cfg, name)} was given; "
                    f"the architecture comes from the source run")
            setattr(self.cfg, name, getattr(mc, name))
        kind = tokenizer.to_dict()["type"]
        if "tokenizer" in explicit and self.cfg.tokenizer != kind:
            raise ConfigError(f"--init-from {source}: its model uses the {kind} tokenizer, "
                              f"not {self.cfg.tokenizer}")
        self.cfg.tokenizer = kind
        if kind == "bpe":
            self.cfg.vocab_size = tokenizer.vocab_size
        model.dropout_seed = self.cfg.seed
        self.dropout_seed = self.cfg.seed
        if self.cfg.dropout != mc.dropout:
            model.config.dropout = self.cfg.dropout
        self.log(f"initialised from {file} (fresh optimizer)")
        return model, tokenizer

    def _resume(self, explicit):
        with TensorFile(self.latest_path) as f:
            meta = f.meta
            if meta.get("kind") != "train_state":
                raise CheckpointError(f"{self.latest_path} is not a training state")
            model, tokenizer = model_from_file(f)
            self._resume_state(explicit, f, model, tokenizer)

    def _resume_state(self, explicit, ckpt, model, tokenizer):
        meta = ckpt.meta
        saved = meta.get("train_config", {})
        mc = model.config
        for name in ARCHITECTURE:
            ours = getattr(self.cfg, name)
            if name in explicit and ours != getattr(mc, name):
                raise ConfigError(
                    f"{self.latest_path} holds a model with {name}={getattr(mc, name)}, "
                    f"but --{name.replace('_', '-')} {ours} was given; use another --out "
                    f"to start a new run, or --init-from to start from its weights")
            setattr(self.cfg, name, getattr(mc, name))
        if "tokenizer" in explicit and self.cfg.tokenizer != tokenizer.to_dict()["type"]:
            raise ConfigError(f"{self.latest_path} was trained with the "
                              f"{tokenizer.to_dict()['type']} tokenizer, not {self.cfg.tokenizer}")
        if ("vocab_size" in explicit and tokenizer.to_dict()["type"] == "bpe"
                and self.cfg.vocab_size != saved.get("vocab_size")):
            raise ConfigError(f"{self.latest_path} has a BPE vocabulary trained up to "
                              f"{saved.get('vocab_size')} tokens, not {self.cfg.vocab_size}")
        if "seed" in explicit and "seed" in saved and self.cfg.seed != saved["seed"]:
            raise ConfigError(f"{self.latest_path} was started with --seed {saved['seed']}, "
                              f"not {self.cfg.seed}: a resumed run continues its own random "
                              f"streams; use another --out to train with another seed")
        # Hyperparameters not given on this command line continue as they were;
        # the ones given apply from here on, and each change is said.
        for f in fields(TrainConfig):
            if f.name not in saved or f.name in ("out", "threads", "data"):
                continue
            if f.name not in explicit:
                setattr(self.cfg, f.name, saved[f.name])
            elif getattr(self.cfg, f.name) != saved[f.name]:
                self.log(f"resuming with {f.name} {getattr(self.cfg, f.name)} "
                         f"(was {saved[f.name]})")
        if "data" not in explicit and "data" in saved:
            self.cfg.data = saved["data"]
        self.cfg.validate()
        model.config.dropout = self.cfg.dropout
        self.model, self.tokenizer = model, tokenizer
        self.optimizer = AdamW(model, self.cfg.beta1, self.cfg.beta2,
                               weight_decay=self.cfg.weight_decay)
        self.optimizer.load_from(ckpt)
        try:
            self.optimizer.step_count = int(meta["optimizer_step"])
            self.iter = int(meta["iter"])
            self.last_eval_iter = int(meta["last_eval_iter"])
            self.best_val_loss = float(meta["best_val_loss"])
            self.elapsed = float(meta["elapsed_s"])
            self.dropout_seed = int(meta["dropout_seed"])
            model.dropout_calls = int(meta["dropout_calls"])
            # One data stream per rank of the run that saved (one: a single process).
            saved_streams = meta.get("rng_train_ranks") or [meta["rng_train"]]
            rank = self.comm.rank
            if rank < len(saved_streams):
                self.rng_train = _rng_from_state(saved_streams[rank])
            else:
                # A rank the saved run did not have: a stream of its own that
                # does not replay the data the run started with.
                self.rng_train = np.random.default_rng([self.cfg.seed, 0, rank, self.iter])
            self.rng_eval = _rng_from_state(meta["rng_eval"])
            self.saved_data_info = dict(meta.get("data") or {})
            saved_threads = meta.get("threads")
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{self.latest_path}: training state is incomplete "
                                  f"({err})") from None
        if len(saved_streams) != self.comm.size:
            self.log(f"warning: this run was saved by {len(saved_streams)} "
                     f"rank{'s' if len(saved_streams) > 1 else ''}, now {self.comm.size}: "
                     f"training continues, but the batches will not be those of an "
                     f"uninterrupted run")
        if saved_threads not in (None, _core.get_num_threads()):
            self.log(f"note: this run was saved with {saved_threads} threads, now "
                     f"{_core.get_num_threads()}: the numbers will differ in the last bits "
                     f"from an uninterrupted run")
        self.log(f"resuming from {self.latest_path} at iteration {self.iter}")

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
        meta.update({
            "kind": "train_state",
            "train_config": asdict(self.cfg),
            "iter": self.iter,
            "optimizer_step": self.optimizer.step_count,
            "last_eval_iter": self.last_eval_iter,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else 1e30,
            "elapsed_s": self.elapsed,
            "dropout_seed": self.dropout_seed,
            "dropout_calls": self.model.dropout_calls,
            "rng_train": streams[0],
            "rng_train_ranks": streams,
            "world_size": self.comm.size,
            "rng_eval": self.rng_eval.bit_generator.state,
            "data": self.data_info,
            "init_from": self.init_from,
            "threads": _core.get_num_threads(),
        })
        save_checkpoint(self.latest_path, tensors, meta)

    def save_best(self, val_loss):
        meta = model_meta(self.model, self.tokenizer)
        meta.update({"kind": "model", "iter": self.iter, "val_loss": val_loss})
        # The config travels with the best model: a run killed before its first
        # training state can be recognised as the same run (_decide_resume).
        meta["train_config"] = self._identity()
        meta["init_from"] = self.init_from
        save_checkpoint(self.best_path, self.model.state_views(), meta)

    def record(self, losses, lr, tokens_per_s):
        entry = {"iter": self.iter, "train_loss": losses["train"], "val_loss": losses["val"],
                 "val_bpc": losses["val"] * (1.0 / self.val_chars_per_token) / math.log(2),
                 "lr": lr, "tokens_per_s": tokens_per_s, "elapsed_s": self.elapsed}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(entry) + "\n")
        self.metrics.append(entry)
        return entry


def _finetune_defaults(cfg, explicit, folder):
    """{setting: value}: FINETUNE_DEFAULTS for the settings not given. With
    --learning-rate given and --min-lr not, the rate stays constant at the one
    given; the context is at most the model's."""
    from ..files.hf import config_from_hf
    n_positions = config_from_hf(folder).block_size
    chosen = {name: value for name, value in FINETUNE_DEFAULTS.items() if name not in explicit}
    if "min_lr" in chosen and "learning_rate" in explicit:
        chosen["min_lr"] = cfg.learning_rate
    if "block_size" in chosen:
        chosen["block_size"] = min(chosen["block_size"], n_positions)
    return chosen


def _cropped(model, block_size):
    """model with its context cut to block_size: the first rows of its position
    table (nanoGPT's crop_block_size)."""
    config = replace(model.config, block_size=block_size)
    cropped = GPT(config, init=False)
    state = model.state_views()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size]
    cropped.load_state_dict(state)
    return cropped


def _rng_from_state(state):
    rng = np.random.default_rng()
    if not isinstance(state, dict) or state.get("bit_generator") != "PCG64":
        raise ValueError("unsupported RNG state")
    rng.bit_generator.state = state
    return rng


class _StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (`kill`, `timeout`, a batch system's time
    limit) sets a flag: the loop finishes its step, saves and exits."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = 0           # the first signal received, 0 for none
        self._previous = {}

    @property
    def requested(self):
        return self.signum != 0

    def __enter__(self):
        try:
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:        # not the main thread: leave the signals alone
            pass
        return self

    def _handle(self, signum, frame):
        if self.signum:           # a second signal stops at once
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def _start_run(cfg, log, init_from, explicit, comm, overwrite, progress=None):
    """Build the Run; distributed, also check that every rank built the same one.

    Every rank validates and loads on its own (they all read the same --data
    and --out). They then compare notes, so that a problem on any rank stops
    all of them with one message instead of leaving the others waiting.
    """
    if not comm.distributed:
        return Run(cfg, log=log, init_from=init_from, explicit=explicit, comm=comm,
                   overwrite=overwrite, progress=progress)
    run = problem = None
    try:
        run = Run(cfg, log=log, init_from=init_from, explicit=explicit, comm=comm,
                  overwrite=overwrite, progress=progress)
        status = ("ok", run.iter, run.model.config.vocab_size,
                  fingerprint(run.model.params_flat), fingerprint(run.optimizer.exp_avg_sq))
    except FemtoGPTError as err:
        if getattr(err, "agreed", False):
            raise               # every rank already knows (the token cache's exchange)
        problem, status = err, ("error", str(err))
    statuses = comm.allgather(status)
    failed = [(rank, st[1]) for rank, st in enumerate(statuses) if st[0] == "error"]
    if problem is not None:
        problem.agreed = True          # the other ranks stop too
        raise problem
    if failed:
        rank, message = failed[0]
        err = ConfigError(f"rank {rank} could not start: {message}")
        err.agreed = True
        raise err
    if any(st != statuses[0] for st in statuses):
        rank = next(r for r, st in enumerate(statuses) if st != statuses[0])
        err = ConfigError(f"rank {rank} does not start from the same state as rank 0 "
                          f"(iteration {statuses[rank][1]} against {statuses[0][1]}): every "
                          f"rank must see the same --data and --out files (on several "
                          f"machines, a shared filesystem)")
        err.agreed = True
        raise err
    if run.writes:
        run.prepare_out_dir()
    return run


def train(cfg, init_from=None, explicit=None, progress=None, stream=None, comm=None,
          overwrite=False):
    """Run (or continue) training as cfg says. Returns the Run (run.cfg holds the
    settings it used; cfg itself is not changed).

    If cfg.out holds this run's training state, training continues: the fields
    of cfg that differ from the saved ones apply from there (more iterations,
    another learning rate...), and a change that cannot apply to a run under
    way (its architecture, tokenizer or seed) is refused by name. explicit, a
    set of field names, limits that to the fields given (the command line's
    flags). A run of something else in cfg.out is refused unless overwrite.

    comm: femtogpt.distributed's MPIComm for data-parallel training (every rank
    calls train() with the same arguments); None for a single process.
    """
    from tqdm import tqdm
    stream = stream or sys.stderr
    comm = comm or Solo()
    bar = None

    def log(message):
        if comm.rank != 0:
            return
        if bar is not None:
            bar.write(message, file=stream)
        else:
            print(message, file=stream)

    run = _start_run(cfg, log, init_from, explicit, comm, overwrite, progress)
    cfg = run.cfg
    model = run.model
    n_params = model.num_parameters()
    log(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, {cfg.n_embd} wide, block "
        f"{cfg.block_size}, vocab {model.config.vocab_size} ({cfg.tokenizer}), "
        f"{'biases' if cfg.bias else 'no biases'}, {cfg.gelu} GELU: "
        f"{n_params / 1e6:.2f}M parameters; {_core.get_num_threads()} threads"
        + (" per rank" if comm.distributed else ""))
    if comm.distributed:
        shares = sorted({batch_share(cfg.batch_size, r, comm.size) for r in range(comm.size)},
                        reverse=True)
        log(f"distributed: {comm.size} ranks ({comm.local_size} on this machine), each "
            f"computing {' or '.join(map(str, shares))} of the {cfg.batch_size} sequences "
            f"of every step (the global batch is --batch-size)")
    files = run.data_info["files"]
    log(f"data: {run.data_info['path']}{f' ({files:,} files)' if files > 1 else ''} "
        f"({len(run.train_ids):,} train / "
        f"{len(run.val_ids):,} val tokens); out: {cfg.out}")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * cfg.block_size
    have_plot = True
    last_val = float("nan")
    interrupted = False
    bar = tqdm(total=cfg.max_iters, initial=min(run.iter, cfg.max_iters), file=stream,
               # progress None: tqdm decides (a bar on a terminal, none in a log file)
               disable=(True if comm.rank != 0 else
                        None if progress is None else not progress),
               dynamic_ncols=True, unit="it",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
    window_start, window_tokens = time.perf_counter(), 0
    tokens_per_s = 0.0
    if run.iter >= cfg.max_iters and run.last_eval_iter == run.iter:
        bar.close()
        bar = None
        log(f"{cfg.out} has already trained for {run.iter} iterations (best val loss "
            f"{run.best_val_loss:.4f}); raise --max-iters to train further")
        run.interrupted = False
        return run
    with _StopOnSignal() as stop:
        t_last = time.perf_counter()
        while True:
            it = run.iter
            due = it % cfg.eval_interval == 0 or it >= cfg.max_iters
            if due and it != run.last_eval_iter:
                if window_tokens:
                    tokens_per_s = window_tokens / max(1e-9, time.perf_counter() - window_start)
                losses = run.estimate_loss()
                run.elapsed += time.perf_counter() - t_last
                t_last = time.perf_counter()
                run.last_eval_iter = it
                last_val = losses["val"]
                if run.writes:
                    entry = run.record(losses, get_lr(min(it, cfg.max_iters), cfg),
                                       tokens_per_s)
                    log(f"iter {it:5d}: train loss {losses['train']:.4f}, val loss "
                        f"{losses['val']:.4f}, val {entry['val_bpc']:.3f} bits/char, "
                        f"{tokens_per_s:,.0f} tokens/s, {run.elapsed:.1f}s")
                if losses["val"] < run.best_val_loss:
                    run.best_val_loss = losses["val"]
                    if run.writes:
                        run.save_best(losses["val"])
                if have_plot and run.writes:
                    have_plot = plot_losses(run.metrics_path, os.path.join(cfg.out, "loss.png"))
                window_start, window_tokens = time.perf_counter(), 0
            if it >= cfg.max_iters:
                break
            loss, lr, stopping = run.train_step(stop=stop.signum)
            window_tokens += tokens_per_step
            now = time.perf_counter()
            run.elapsed += now - t_last
            t_last = now
            if not bar.disable:
                rate = window_tokens / max(1e-9, now - window_start)
                bar.set_postfix_str(f"loss {loss:.4f}, val {last_val:.4f}, {rate:,.0f} tok/s",
                                    refresh=False)
                bar.update(1)
            if run.iter % cfg.save_interval == 0 and run.iter < cfg.max_iters:
                run.save_latest()
            # (a single process also stops for a Ctrl-C that came during the step)
            if stopping or (stop.requested and not comm.distributed):
                interrupted = True
                run.stop_signal = stopping or stop.signum
                break
    run.save_latest()
    bar.close()
    bar = None
    if interrupted:
        how = ("interrupted" if run.stop_signal == signal.SIGINT else
               f"stopped by {signal.Signals(run.stop_signal).name}")
        log(f"{how} at iteration {run.iter}: saved {run.latest_path}; "
            f"run the same command to continue")
        run.interrupted = True
        return run
    run.interrupted = False
    if not have_plot:
        log(f"loss curve not drawn: matplotlib is not installed (pip install matplotlib); "
            f"the numbers are in {run.metrics_path}")
    else:
        log(f"loss curve: {os.path.join(cfg.out, 'loss.png')}")
    log(f"done: best val loss {run.best_val_loss:.4f}; model in {run.best_path}")
    return run
