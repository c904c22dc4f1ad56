"""Data-parallel training over MPI: ranks launched with mpiexec (MPICH from PyPI).

The tests that launch ranks are skipped, with the reason, only when MPI cannot
start here (mpi4py or mpiexec missing, or the launcher failing).
"""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import femtogpt
from femtogpt.train import distributed
from femtogpt.files.checkpoint import load_checkpoint
from femtogpt.errors import ConfigError
from femtogpt.train import Run

from test_train import (CLI_FLAGS, PACKAGE_PARENT, TEXT, assert_same_training_state, metrics,
                        tiny)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def _restore_threads():
    saved = femtogpt.get_num_threads()
    yield
    femtogpt.set_num_threads(saved)


# --------------------------------------------------------------------------- no MPI needed


@pytest.mark.parametrize("batch_size,size", [(12, 2), (5, 2), (7, 3), (3, 3), (64, 5)])
def test_batch_shares_cover_the_global_batch_evenly(batch_size, size):
    shares = [distributed.batch_share(batch_size, r, size) for r in range(size)]
    assert sum(shares) == batch_size
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)      # the extra rows go to the first ranks


def test_launcher_environment_is_detected(monkeypatch):
    for name in distributed.LAUNCHER_SIZE_VARS + distributed.LAUNCHER_RANK_VARS:
        monkeypatch.delenv(name, raising=False)
    assert (distributed.launched_size(), distributed.launched_rank()) == (1, 0)
    assert isinstance(distributed.connect(False, 600.0), distributed.Solo)
    monkeypatch.setenv("PMI_SIZE", "4")                 # MPICH / Intel MPI (Hydra)
    monkeypatch.setenv("PMI_RANK", "3")
    assert (distributed.launched_size(), distributed.launched_rank()) == (4, 3)
    monkeypatch.delenv("PMI_SIZE")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")     # Open MPI
    assert distributed.launched_size() == 2


def test_without_mpi4py_distributed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)     # import mpi4py now fails
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    for name in distributed.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match=re.escape("pip install 'femtogpt[mpi]'")):
        distributed.connect(True, 600.0)
    # Launched as 2 ranks without mpi4py: refused (two runs writing one --out),
    # not silently run as two independent trainings.
    monkeypatch.setenv("PMI_SIZE", "2")
    with pytest.raises(ConfigError, match="one of 2 ranks.*pip install"):
        distributed.connect(False, 600.0)
    # A single process does not need mpi4py at all.
    monkeypatch.setenv("PMI_SIZE", "1")
    assert isinstance(distributed.connect(False, 600.0), distributed.Solo)


def test_cli_without_mpi4py_exits_2_with_the_hint(tmp_path, monkeypatch, capsys):
    from femtogpt.app.cli import main
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", None)
    assert main(["train", "--distributed", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("femtogpt: error: distributed training needs mpi4py")
    assert not os.path.exists(tmp_path / "run")


def test_rank_dropout_seeds_differ_and_rank_0_keeps_the_run_seed():
    seeds = [distributed.rank_dropout_seed(1337, r) for r in range(8)]
    assert seeds[0] == 1337
    assert len(set(seeds)) == 8


# --------------------------------------------------------------------------- launching ranks


def _find_mpiexec():
    # The venv's own first: the mpich wheel installs it next to python.
    for folder in [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "mpiexec")
        if os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install '.[mpi]')")
    exe = _find_mpiexec()
    # mpi4py without any mpiexec is a broken install (the [test] and [mpi] extras
    # bring MPICH's), not a machine where MPI cannot start: fail, do not skip.
    assert exe is not None, "mpi4py is installed but no mpiexec was found: pip install '.[mpi]'"
    # Up to three tries: a launcher can fail once for a passing reason (a busy
    # machine); one that never starts means MPI cannot run here.
    for attempt in range(3):
        probe = subprocess.run(
            [exe, "-n", "2", sys.executable, "-c",
             "from mpi4py import MPI; print(MPI.COMM_WORLD.Get_size())"],
            capture_output=True, text=True, timeout=120, env=mpi_env(), cwd=PACKAGE_PARENT)
        if probe.returncode == 0 and probe.stdout.split() == ["2", "2"]:
            return exe
        sys.stderr.write(f"MPI probe {attempt + 1} failed (exit {probe.returncode}): "
                         f"{probe.stdout[-300:]} {probe.stderr[-600:]}\n")
    pytest.skip(f"MPI cannot start 2 ranks here (exit {probe.returncode}): "
                f"{(probe.stderr or probe.stdout)[-400:]}")


def mpi_env(threads="1"):
    env = dict(os.environ)
    env["PYTHONPATH"] = PACKAGE_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    for name in distributed.LAUNCHER_SIZE_VARS + distributed.LAUNCHER_RANK_VARS:
        env.pop(name, None)                 # a test run itself under mpiexec
    if threads is None:
        env.pop("OMP_NUM_THREADS", None)
    else:
        env["OMP_NUM_THREADS"] = threads
    return env


def ranks_command(mpiexec, n, *args):
    return [mpiexec, "-n", str(n), sys.executable, "-m", "femtogpt.app.cli", "train", *args]


def run_ranks(mpiexec, n, *args, env=None, timeout=180):
    # cwd: the source tree must not shadow the installed package (see test_cli.run).
    return subprocess.run(ranks_command(mpiexec, n, *args), env=env or mpi_env(),
                          cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=timeout)


def start_ranks_and_wait(mpiexec, out, *args, min_iter=0):
    """Start a 2-rank CLI run writing to out; return (proc, checkpoint path) once
    its saved training state has reached min_iter (saves are atomic renames:
    whenever the file exists it is complete)."""
    proc = subprocess.Popen(ranks_command(mpiexec, 2, "--out", out, *args), env=mpi_env(),
                            cwd=PACKAGE_PARENT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = os.path.join(out, "ckpt.safetensors")
    deadline = time.monotonic() + 120
    while not (os.path.exists(ckpt) and load_checkpoint(ckpt)[1]["iter"] >= min_iter):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.003)
    return proc, ckpt


def descendants(pid):
    """Every process below pid (mpiexec -> proxy -> ranks), from /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rank_pids(proc):
    pids = []
    for pid in descendants(proc.pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"femtogpt.app.cli" in f.read():
                    pids.append(pid)
        except OSError:
            pass
    return sorted(pids)


def with_flag(flags, name, value=None):
    """CLI_FLAGS with `name`'s value replaced (or, value None, the flag removed)."""
    i = flags.index(name)
    return flags[:i] + ([] if value is None else [name, value]) + flags[i + 2:]


# The single-process CLI tests' run, a little heavier, so that a kill lands mid-run.
DIST_FLAGS = with_flag(with_flag(with_flag(CLI_FLAGS, "--n-embd", "32"), "--batch-size", "8"),
                       "--max-iters", "600")


def write_text(folder):
    path = os.path.join(folder, "data.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write(TEXT)
    return path


# -- the arithmetic: N ranks with b each == one process with N*b ------------------------


def _distributed_steps(mpiexec, tmp_path, cfg, steps):
    """mpi_worker.py's record of `steps` steps of cfg on 2 ranks; the ranks' weights
    (which nothing but the allreduce keeps together) must be equal."""
    result = str(tmp_path / "ranks.npz")
    proc = subprocess.run(
        [mpiexec, "-n", "2", sys.executable, os.path.join(HERE, "mpi_worker.py"),
         json.dumps(dataclasses.asdict(cfg)), result, str(steps)],
        env=mpi_env(), cwd=PACKAGE_PARENT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    ranks = np.load(result)
    assert len(set(ranks["fingerprints"].tolist())) == 1
    return ranks


def _assert_one_process_equals(ranks, single_cfg, steps):
    """One process fed the ranks' samples in rank order reproduces their steps."""
    single = Run(single_cfg, log=lambda m: None)
    for step in range(steps):
        loss, _, _ = single.train_step(batch=(ranks["x"][step], ranks["y"][step]))
        # The loss the ranks agreed on is the mean over the whole batch.
        assert abs(loss - ranks["losses"][step]) < 2e-6 * max(1.0, abs(loss))
        if step == 0:
            # The summed gradient is the whole batch's mean gradient: weighting by
            # the wrong share (plain sum, plain mean) would be off by 2x or 1.2x.
            np.testing.assert_allclose(ranks["first_grads"], single.model.grads_flat,
                                       rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(ranks["params"], single.model.params_flat, rtol=0, atol=2e-5)


@pytest.mark.parametrize("batch_size", [4, 5])      # 2+2, and 3+2: shares weighted
def test_two_ranks_equal_one_process_on_the_same_samples(mpiexec, tmp_path, batch_size):
    steps = 4
    cfg = tiny(tmp_path, write_text(str(tmp_path)), out="ranks", batch_size=batch_size,
               dropout=0.0, grad_clip=0.0)
    ranks = _distributed_steps(mpiexec, tmp_path, cfg, steps)
    assert list(ranks["local_batches"]) == [(batch_size + 1) // 2, batch_size // 2]
    x = ranks["x"]
    assert x.shape == (steps, batch_size, cfg.block_size)
    # The ranks draw from different streams: their windows differ.
    share = (batch_size + 1) // 2
    assert not np.array_equal(x[:, :2], x[:, share:share + 2])
    _assert_one_process_equals(ranks, dataclasses.replace(cfg, out=str(tmp_path / "single")),
                               steps)


def test_two_ranks_with_grad_accum_equal_one_process_with_the_whole_batch(mpiexec, tmp_path):
    # 2 ranks (3 + 2 sequences) x 2 micro-batches == one process, one batch of 10.
    steps, accum = 3, 2
    cfg = tiny(tmp_path, write_text(str(tmp_path)), out="ranks", batch_size=5,
               grad_accum=accum, dropout=0.0, grad_clip=0.0)
    ranks = _distributed_steps(mpiexec, tmp_path, cfg, steps)
    assert list(ranks["local_batches"]) == [3 * accum, 2 * accum]
    _assert_one_process_equals(ranks, dataclasses.replace(
        cfg, out=str(tmp_path / "single"), batch_size=10, grad_accum=1), steps)


# -- the command line ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_rank_reference(mpiexec, tmp_path_factory):
    """One uninterrupted 2-rank CLI run (dropout on: per-rank masks must resume too)."""
    root = str(tmp_path_factory.mktemp("ranks_reference"))
    data = write_text(root)
    out = os.path.join(root, "run")
    proc = run_ranks(mpiexec, 2, "--data", data, "--out", out, *DIST_FLAGS)
    assert proc.returncode == 0, proc.stderr
    return data, out, proc


def test_two_rank_run_prints_once_and_saves_every_ranks_stream(two_rank_reference):
    data, out, proc = two_rank_reference
    err = proc.stderr
    # Rank 0 alone prints: one line per eval, not two.
    assert err.count("iter    50:") == 1, err
    assert "distributed: 2 ranks" in err and "each computing 4 of the 8 sequences" in err
    meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]
    assert meta["world_size"] == 2 and meta["iter"] == 600
    streams = meta["rng_train_ranks"]
    assert len(streams) == 2 and streams[0] == meta["rng_train"]
    assert streams[0]["state"] != streams[1]["state"]
    assert [r["iter"] for r in metrics(out)] == list(range(0, 601, 50))


def test_evaluation_shared_out_equals_one_process(two_rank_reference, tmp_path):
    # Iteration 0 is before any step: the same weights and eval batches, so the
    # 2-rank evaluation (each rank computes half of every batch's rows) must give
    # the single process's numbers, to the rounding of the weighted sum.
    data, out, _ = two_rank_reference
    single = str(tmp_path / "single")
    flags = with_flag(DIST_FLAGS, "--max-iters", "1")
    proc = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "train", "--data", data,
                           "--out", single, *flags], env=mpi_env(), cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ours, theirs = metrics(out)[0], metrics(single)[0]
    for key in ("train_loss", "val_loss"):
        assert abs(ours[key] - theirs[key]) < 1e-6, key


def test_rank_killed_mid_run_then_same_command_equals_uninterrupted(mpiexec, tmp_path,
                                                                   two_rank_reference):
    data, reference, _ = two_rank_reference
    out = str(tmp_path / "killed")
    proc, ckpt = start_ranks_and_wait(mpiexec, out, "--data", data, *DIST_FLAGS, min_iter=50)
    victims = rank_pids(proc)
    assert len(victims) == 2
    os.kill(victims[1], signal.SIGKILL)               # rank 1 (or 0) dies mid-step
    started = time.monotonic()
    _, err = proc.communicate(timeout=120)            # the others must not hang
    assert proc.returncode != 0
    assert time.monotonic() - started < 60
    saved = load_checkpoint(ckpt)[1]["iter"]
    assert 50 <= saved < 600
    resumed = run_ranks(mpiexec, 2, "--data", data, "--out", out, *DIST_FLAGS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {ckpt} at iteration {saved}" in resumed.stderr
    assert_same_training_state(reference, out)


@pytest.mark.parametrize("signum,status,how", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "stopped by SIGTERM")])
def test_signal_stops_every_rank_after_the_same_step(mpiexec, tmp_path, two_rank_reference,
                                                     signum, status, how):
    data, reference, _ = two_rank_reference
    out = str(tmp_path / "interrupted")
    proc, ckpt = start_ranks_and_wait(mpiexec, out, "--data", data, *DIST_FLAGS, min_iter=50)
    proc.send_signal(signum)              # mpiexec passes it on to every rank
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    lines = [line for line in err.splitlines() if line.startswith(how + " at")]
    assert len(lines) == 1, err
    n = int(re.match(how + r" at iteration (\d+)", lines[0]).group(1))
    assert load_checkpoint(ckpt)[1]["iter"] == n
    resumed = run_ranks(mpiexec, 2, "--data", data, "--out", out, *DIST_FLAGS)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training_state(reference, out)


def test_signal_to_one_rank_stops_all_with_that_signal(mpiexec, tmp_path):
    # SIGTERM reaches rank 1 alone (a batch system signalling one process): every
    # rank stops after the same step, and rank 0 reports SIGTERM, not Ctrl-C.
    data = write_text(str(tmp_path))
    proc, ckpt = start_ranks_and_wait(mpiexec, str(tmp_path / "run"), "--data", data,
                                      *with_flag(DIST_FLAGS, "--max-iters", "100000"))
    os.kill(rank_pids(proc)[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.startswith("stopped by SIGTERM at")]
    assert len(lines) == 1, err
    n = int(re.match(r"stopped by SIGTERM at iteration (\d+)", lines[0]).group(1))
    assert load_checkpoint(ckpt)[1]["iter"] == n


def test_stuck_rank_stops_the_job_after_the_timeout(mpiexec, tmp_path):
    data = write_text(str(tmp_path))
    proc, _ = start_ranks_and_wait(mpiexec, str(tmp_path / "run"), "--data", data,
                                   "--comm-timeout", "5",
                                   *with_flag(DIST_FLAGS, "--max-iters", "100000"))
    victims = rank_pids(proc)
    os.kill(victims[1], signal.SIGSTOP)           # alive, but never answers again
    try:
        _, err = proc.communicate(timeout=90)
    finally:
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    assert "no answer from the other ranks for 5 s" in err, err
    assert "stopping all ranks" in err


def test_bad_option_is_reported_once_by_every_rank_agreeing(mpiexec, tmp_path):
    data = write_text(str(tmp_path))
    flags = with_flag(DIST_FLAGS, "--batch-size", "1")        # 1 sequence for 2 ranks
    proc = run_ranks(mpiexec, 2, "--data", data, "--out", str(tmp_path / "run"), *flags)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("femtogpt: error")]
    assert errors == ["femtogpt: error: --batch-size 1 is smaller than the number of ranks "
                      "(2): every rank needs at least one sequence"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "run")         # refused: nothing written


def test_resume_with_another_number_of_ranks_warns_and_continues(mpiexec, tmp_path,
                                                                two_rank_reference):
    data, reference, _ = two_rank_reference
    out = str(tmp_path / "copy")
    shutil.copytree(reference, out)
    flags = with_flag(DIST_FLAGS, "--max-iters", "620")
    proc = subprocess.run([sys.executable, "-m", "femtogpt.app.cli", "train", "--data", data,
                           "--out", out, *flags], env=mpi_env(), cwd=PACKAGE_PARENT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "saved by 2 ranks, now 1" in proc.stderr
    meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]
    assert (meta["iter"], meta["world_size"], len(meta["rng_train_ranks"])) == (620, 1, 1)
    # ...and a single-process state continued by 3 ranks (the third gets a new stream).
    flags = with_flag(DIST_FLAGS, "--max-iters", "640")
    proc = run_ranks(mpiexec, 3, "--data", data, "--out", out, *flags)
    assert proc.returncode == 0, proc.stderr
    assert "saved by 1 rank, now 3" in proc.stderr
    meta = load_checkpoint(os.path.join(out, "ckpt.safetensors"))[1]
    assert (meta["iter"], meta["world_size"]) == (640, 3)
    assert len({json.dumps(s) for s in meta["rng_train_ranks"]}) == 3


def test_threads_default_to_the_cores_shared_among_local_ranks(mpiexec, tmp_path):
    data = write_text(str(tmp_path))
    flags = with_flag(with_flag(DIST_FLAGS, "--threads"), "--max-iters", "1")
    proc = run_ranks(mpiexec, 2, "--data", data, "--out", str(tmp_path / "run"), *flags,
                     env=mpi_env(threads=None))
    assert proc.returncode == 0, proc.stderr
    expected = max(1, distributed.available_cores() // 2)
    assert f"; {expected} threads per rank" in proc.stderr, proc.stderr
