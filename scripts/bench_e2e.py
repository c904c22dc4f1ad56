"""scripts/bench.py --vs-nanogpt: the default run end to end, `femtogpt train`
against nanoGPT's README CPU command, alternated, each a whole process."""
import json
import os
import resource
import subprocess
import sys
import time

from bench_common import log, median_of


# nanoGPT's README, "I only have a macbook" (its CPU recipe, the baby GPT).
NANOGPT_CPU_ARGS = ["train.py", "config/train_shakespeare_char.py", "--device=cpu",
                    "--compile=False", "--eval_iters=20", "--log_interval=1",
                    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4",
                    "--n_embd=128", "--max_iters=2000", "--lr_decay_iters=2000",
                    "--dropout=0.0"]


# nanoGPT seeds torch with 1337 (+ a DDP rank offset) and has no option for it:
# this shim shifts the seed it asks for, so seed 1337 is nanoGPT unchanged.
NANOGPT_SEED_SHIM = ("import runpy, sys, torch; seed = int(sys.argv.pop(1)); "
                     "sys.argv = sys.argv[1:]; "
                     "real = torch.manual_seed; "
                     "torch.manual_seed = lambda s: real(s - 1337 + seed); "
                     "runpy.run_path(sys.argv[0], run_name='__main__')")


def nanogpt_problem(folder):
    """Why folder cannot run nanoGPT's CPU recipe, or None."""
    if not os.path.isfile(os.path.join(folder, "train.py")):
        return f"{folder} is not a nanoGPT checkout (no train.py)"
    data = os.path.join(folder, "data", "shakespeare_char")
    if not os.path.isfile(os.path.join(data, "train.bin")):
        return (f"{data}/train.bin is missing: copy Tiny Shakespeare to {data}/input.txt "
                f"(femtogpt ships it: femtogpt/data/tinyshakespeare.txt) and run "
                f"`python prepare.py` there")
    return None


def timed_process(cmd, cwd=None, env=None):
    """Run cmd to its end: (exit status, stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0


def run_femtogpt_default(seed, out, threads):
    """`femtogpt train` with only --out (and --seed, unless it is the default)."""
    cmd = [sys.executable, "-m", "femtogpt.app.cli", "train", "--out", out, "--no-progress"]
    if seed != 1337:
        cmd += ["--seed", str(seed)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code, stdout, stderr, wall = timed_process(cmd, env=env)
    if code != 0:
        return {"error": f"exit {code}: {stderr[-500:]}"}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    last = rows[-1]
    return {"wall_s": wall, "val_loss": last["val_loss"], "iter": last["iter"],
            "best_val_loss": min(r["val_loss"] for r in rows)}


def run_nanogpt(folder, seed, out, threads):
    """nanoGPT's README CPU command with torch seeded by `seed` (1337: unchanged)."""
    cmd = [sys.executable, "-c", NANOGPT_SEED_SHIM, str(seed), *NANOGPT_CPU_ARGS,
           f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code, stdout, stderr, wall = timed_process(cmd, cwd=folder, env=env)
    if code != 0:
        return {"error": f"exit {code}: {stderr[-500:]}"}
    evals = [line for line in stdout.splitlines() if line.startswith("step ")]
    # "step 2000: train loss 1.7663, val loss 1.8857"
    last = evals[-1]
    losses = [float(line.rsplit("val loss", 1)[1]) for line in evals]
    return {"wall_s": wall, "val_loss": losses[-1], "iter": int(last.split()[1].rstrip(":")),
            "best_val_loss": min(losses)}


def peak_rss_of(function, *args):
    """function(*args) in a forked child, so that RUSAGE_CHILDREN's peak is its own."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        return pool.apply(_with_child_peak, (function, *args))


def _with_child_peak(function, *args):
    result = function(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return result


def measure_end_to_end(nanogpt_dir, rounds, threads):
    import tempfile
    runs = {"femtogpt": [], "nanogpt": []}
    with tempfile.TemporaryDirectory(prefix="femtogpt-e2e-") as tmp:
        for r in range(rounds):
            for impl in ("femtogpt", "nanogpt"):
                out = os.path.join(tmp, f"{impl}-{r}")
                log(f"end to end: {impl}, round {r + 1}/{rounds} (about two minutes)")
                if impl == "femtogpt":
                    result = peak_rss_of(run_femtogpt_default, 1337, out, threads)
                else:
                    result = peak_rss_of(run_nanogpt, nanogpt_dir, 1337, out, threads)
                runs[impl].append(result)
                if "error" in result:
                    log(f"  failed: {result['error']}")
                else:
                    log(f"  {result['wall_s']:.1f} s, val loss {result['val_loss']:.4f}, "
                        f"peak RSS {result['peak_rss_mb']:,.0f} MB")
    return {impl: {"wall_s": median_of(rs, "wall_s"), "val_loss": median_of(rs, "val_loss"),
                   "peak_rss_mb": median_of(rs, "peak_rss_mb"), "runs": rs}
            for impl, rs in runs.items()}
