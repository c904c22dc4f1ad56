"""scripts/bench.py's shared pieces: the presets and repetition counts it
measures, memory readings, FLOP counts, random batches, timing a step."""
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time


PRESET_NAMES = ("femto", "baby", "small")


# GPT-2 124M's shape (random weights, 50,257 tokens), fine-tuned at batch 4 with
# contexts of 256 and 1,024 tokens: `--presets gpt2-t256,gpt2-t1024`.
GPT2_SHAPES = {"gpt2-t256": 256, "gpt2-t1024": 1024}


BENCH_PRESETS = PRESET_NAMES + tuple(GPT2_SHAPES)


VOCAB = 65                      # Tiny Shakespeare's characters, as in the presets


SGEMM_N = 2048


SAMPLE_TOKENS = 500


SAMPLE_PRESET = "baby"


TORCH_INSTALL_HINT = "pip install torch==2.13.0"


# Timed steps per worker (after warm-up). A small step takes seconds, a femto
# step milliseconds: the rep counts keep each worker to a similar wall time.
REPS = {"femto": 20, "baby": 20, "small": 3, "gpt2-t256": 3, "gpt2-t1024": 2}


WARMUP = {"femto": 3, "baby": 3, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}


QUICK_REPS = {"femto": 5, "baby": 5, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}


QUICK_WARMUP = {"femto": 1, "baby": 1, "small": 1, "gpt2-t256": 1, "gpt2-t1024": 1}


def median_time(fn, reps):
    """Seconds of fn(), the median of reps calls after one warm-up call (the
    kernel probes' clock)."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def log(message):
    # Progress goes to stderr: stdout carries only the final table.
    print(message, file=sys.stderr, flush=True)


def rss_now_mb():
    """Current resident set size (MB), from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb():
    """Peak RSS of this process so far (MB). ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def flops_per_token(n_params_no_wpe, cfg):
    """nanoGPT's estimate (estimate_mfu): 6N for the matmuls' forward + backward,
    plus 12*L*C*T for attention's score and value products."""
    return 6 * n_params_no_wpe + 12 * cfg["n_layer"] * cfg["n_embd"] * cfg["block_size"]


def random_batch(rng, cfg, batch_size=None):
    # Data content does not change the work done, so uniform random ids will do.
    shape = (batch_size or cfg["batch_size"], cfg["block_size"])
    V = cfg.get("vocab_size", VOCAB)
    return rng.integers(0, V, shape), rng.integers(0, V, shape)


def time_steps(step, n_warmup, n_reps):
    """Run step(i) n_warmup + n_reps times; seconds of each timed call."""
    for i in range(n_warmup):
        step(i)
    times = []
    for i in range(n_warmup, n_warmup + n_reps):
        times.append(step(i))
    return times


def summarise_steps(times, cfg, n_params_no_wpe, baseline_mb):
    t = statistics.median(times)
    return {
        "step_s": times,
        "median_ms": 1e3 * t,
        "tokens_per_s": cfg["batch_size"] * cfg["block_size"] / t,
        "n_params_no_wpe": n_params_no_wpe,
        "flops_per_token": flops_per_token(n_params_no_wpe, cfg),
        "rss_after_imports_mb": baseline_mb,
        "peak_rss_mb": peak_rss_mb(),
    }


def median_of(results, key):
    values = [r[key] for r in results if key in r]
    return statistics.median(values) if values else None


def preset_cfg(name):
    """The preset's model and optimiser settings as plain data for the workers,
    so that torch workers need not import femtogpt."""
    from femtogpt.train import PRESETS
    if name in GPT2_SHAPES:
        return {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": GPT2_SHAPES[name],
                "batch_size": 4, "dropout": 0.0, "bias": True, "gelu": "tanh",
                "learning_rate": 3e-5, "beta1": 0.9, "beta2": 0.99, "weight_decay": 0.1,
                "grad_clip": 1.0, "seed": 1337, "vocab_size": 50257}
    p = PRESETS[name]
    keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dropout", "bias",
            "gelu", "learning_rate", "beta1", "beta2", "weight_decay", "grad_clip", "seed")
    return {k: getattr(p, k) for k in keys}


def schedule(name, n_steps):
    """femtogpt's learning rates for the first n_steps iterations (get_lr)."""
    from femtogpt.train import PRESETS, get_lr
    if name in GPT2_SHAPES:
        return [3e-5] * n_steps      # fine-tuning: constant
    return [get_lr(it, PRESETS[name]) for it in range(n_steps)]


def cpu_name():
    """The CPU's model name as /proc/cpuinfo gives it (what every figure names)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info():
    import numpy
    import scipy
    torch_version = None
    if importlib.util.find_spec("torch") is not None:
        from importlib.metadata import version, PackageNotFoundError
        try:
            torch_version = version("torch")
        except PackageNotFoundError:
            torch_version = "unknown"
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "nproc": usable, "cpu_count": os.cpu_count(), "cpu_model": cpu_name(),
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": numpy.__version__, "scipy": scipy.__version__, "torch": torch_version,
        "loadavg_start": os.getloadavg(),
    }
