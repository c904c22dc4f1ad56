"""The runs `femtogpt serve` shows: each one given on the command line (a run
folder, a checkpoint file or a Hugging Face folder), what the page says about
it, and the models it lends to requests, read again when the checkpoint on
disk changes. Nothing here knows about HTTP.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time

from ..errors import FemtoGPTError

MODELS_PER_RUN = 4          # models (for concurrent requests) kept per run


class Busy(Exception):
    """Every model of a run is in use: a 503, try again."""


class Source:
    """One thing given to serve: a run folder, a checkpoint file or a Hugging
    Face folder. Models are loaded on demand, one per concurrent request, and
    loaded again when the checkpoint on disk changes."""

    def __init__(self, index, path, dtype="fp32", threads=0):
        from ..files.rundir import METRICS_NAME
        self.index, self.path = index, os.path.abspath(path)
        self.dtype = dtype          # the weights' type its models sample in (serve --dtype)
        # OpenMP threads for its models (serve --threads; 0: the default). Set
        # in each thread that uses a model: OpenMP's thread count is per thread,
        # so the main thread's setting does not reach the handlers'.
        self.threads = threads
        # What the page calls it: the folder's name, or a file's with its
        # folder's. Never the path: the page may be seen from other machines
        # (--host), and where the runs are on this one is not theirs to know.
        folder, base = os.path.split(self.path)
        self.name = os.path.join(os.path.basename(folder), base) if os.path.isfile(
            self.path) else base
        self.metrics_path = os.path.join(self.path, METRICS_NAME)
        self._lock = threading.Lock()
        self._idle = []             # [(key, model, tokenizer)]
        self._in_use = 0
        self._freed = threading.Condition(self._lock)

    # -- what it is

    def checkpoint_file(self):
        """The file a model is read from, as `femtogpt sample --out` chooses."""
        from ..files import BEST_NAME, LATEST_NAME
        if os.path.isfile(self.path):
            return self.path
        for name in (BEST_NAME, LATEST_NAME):
            file = os.path.join(self.path, name)
            if os.path.isfile(file):
                return file
        return self.path            # a Hugging Face folder

    def _key(self):
        file = self.checkpoint_file()
        try:
            st = os.stat(file)
        except OSError:
            return (file, None)
        return (file, st.st_mtime_ns, st.st_size)

    def info(self):
        """What the page shows about it: read fresh each time (a run may be training)."""
        from ..files import LATEST_NAME, TensorFile
        info = {"id": self.index, "name": self.name}
        rows = read_rows(self.metrics_path)
        state = os.path.join(self.path, LATEST_NAME)
        config = {}
        if os.path.isfile(state):
            try:
                with TensorFile(state) as f:
                    meta = f.meta
                config = meta.get("train_config") or {}
                info["iter"] = meta.get("iter")
            except FemtoGPTError as err:
                info["problem"] = str(err)
        info["config"] = {k: config.get(k) for k in (
            "n_layer", "n_head", "n_embd", "block_size", "batch_size", "max_iters",
            "learning_rate", "tokenizer", "vocab_size", "data", "dtype") if k in config}
        if isinstance(info["config"].get("data"), str):     # its name, not where it is
            info["config"]["data"] = os.path.basename(info["config"]["data"].rstrip("/"))
        if rows:
            best = min(rows, key=lambda r: r.get("val_loss", math.inf))
            info["best_val_loss"] = best.get("val_loss")
            info["best_val_bpc"] = best.get("val_bpc")
            info["evaluations"] = len(rows)
            info["iter"] = max(info.get("iter") or 0, rows[-1].get("iter", 0))
        try:
            info["modified"] = os.stat(self.metrics_path).st_mtime
        except OSError:
            info["modified"] = None
        try:
            model, tokenizer = self.peek()
            info["parameters"] = model.num_parameters()
            info["model"] = {"n_layer": model.config.n_layer, "n_head": model.config.n_head,
                             "n_embd": model.config.n_embd,
                             "block_size": model.config.block_size,
                             "vocab_size": model.config.vocab_size}
            info["tokenizer"] = tokenizer.to_dict()["type"]
            info["sampling_dtype"] = model.weights_dtype
        except FemtoGPTError as err:
            info.setdefault("problem", str(err))
        if "problem" in info:
            info["problem"] = info["problem"].replace(self.path, self.name)
        return info

    # -- models

    def peek(self):
        """A model and tokenizer to read (not to run): loads one if none is idle."""
        with self.use() as (model, tokenizer):
            return model, tokenizer

    def use(self):
        return _Lease(self)

    def _acquire(self, timeout=60.0):
        from ..files import load
        key = self._key()
        deadline = time.monotonic() + timeout
        with self._lock:
            self._idle = [entry for entry in self._idle if entry[0] == key]
            while not self._idle and self._in_use >= MODELS_PER_RUN:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Busy("every model of this run is busy; try again")
                self._freed.wait(left)
            if self._idle:
                entry = self._idle.pop()
                self._in_use += 1
                return entry
            self._in_use += 1
        try:
            model, tokenizer = load(key[0], dtype=self.dtype)
        except BaseException:
            with self._lock:
                self._in_use -= 1
                self._freed.notify()
            raise
        model.eval()
        return (key, model, tokenizer)

    def _release(self, entry):
        with self._lock:
            self._in_use -= 1
            if entry[0] == self._key() and len(self._idle) < MODELS_PER_RUN:
                self._idle.append(entry)
            self._freed.notify()


def in_a_thread_of_its_own(fn):
    """fn() in a new thread, which ends with it; its result, or its exception.

    Why: an OpenMP thread pool belongs to the thread that first runs a parallel
    region, and lives as long as that thread. Models run in the handlers'
    threads; had the main thread loaded them (a bf16/int8 conversion runs in
    parallel), its pool's idle worker would stay for the process's life, and
    with more OpenMP threads than cores libgomp stops spinning at barriers in
    every other team: the playground streamed at half `femtogpt sample`'s
    speed (int8, GPT-2 124M shape, 2 threads on an AMD EPYC: ~120 vs ~220
    tok/s). A thread that ends takes its pool with it."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as err:        # handed to the caller, raised there
            box["error"] = err

    thread = threading.Thread(target=run, name="femtogpt-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class _Lease:
    def __init__(self, source):
        self.source, self.entry = source, None

    def __enter__(self):
        if self.source.threads:
            from .. import _core
            _core.set_num_threads(self.source.threads)
        self.entry = self.source._acquire()
        return self.entry[1], self.entry[2]

    def __exit__(self, *exc):
        self.source._release(self.entry)
        return False


def read_rows(path, start=0):
    """metrics.jsonl's rows from byte offset start, and the offset after the
    last whole line (a line being written is left for next time)."""
    rows, _ = read_rows_from(path, start)
    return rows


def read_rows_from(path, start=0):
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError:
        return [], start
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, start + end

