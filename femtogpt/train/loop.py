"""The training loop: `femtogpt train` and femtogpt.train.train().

nanoGPT's loop: random windows of the training text, forward, backward, clip
the gradient's global norm, AdamW with linear warmup and cosine decay,
evaluate both splits every eval_interval iterations, keep the best model.
Everything needed to continue a run exactly is saved atomically in
OUT/ckpt.safetensors, every save_interval steps and when a signal stops it.
"""
import os
import signal
import sys
import time

from .. import _core
from ..errors import ConfigError, FemtoGPTError
from ..files.rundir import PLOT_NAME, plot_losses
from .distributed import Solo, batch_share, fingerprint
from .optim import get_lr
from .run import Run


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
                    have_plot = plot_losses(run.metrics_path, os.path.join(cfg.out, PLOT_NAME))
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
        log(f"loss curve: {os.path.join(cfg.out, PLOT_NAME)}")
    log(f"done: best val loss {run.best_val_loss:.4f}; model in {run.best_path}")
    return run
