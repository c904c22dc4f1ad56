#!/usr/bin/env python
"""Benchmark femtogpt on this machine, optionally against the same model in PyTorch.

    PYTHONPATH=. python scripts/bench.py --quick               # smoke run, ~1 minute
    PYTHONPATH=. python scripts/bench.py                       # femto, baby, small
    PYTHONPATH=. python scripts/bench.py --vs-torch            # also PyTorch (pip install torch==2.13.0)
    PYTHONPATH=. python scripts/bench.py --vs-llama-cpp DIR    # only: GPT-2 124M sampling vs llama-bench

What is measured, all in one run:
  * sgemm peak: numpy float32 2048x2048 @ 2048x2048, GFLOP/s. It is the yardstick
    for the model-FLOPs utilisation (MFU) of both implementations.
  * one training step (forward, backward, clip by global norm, AdamW) for each
    preset: median ms, tokens/s and MFU (nanoGPT's flops estimate).
  * sampling: the baby model, batch 1, 500 new tokens from a 1-token prompt.
  * peak resident memory (RSS) of training each preset.
  * the speed-up from 1 thread to --threads threads on the largest preset.
  * data-parallel scaling over MPI (when mpi4py and mpiexec are installed,
    pip install '.[mpi]'): the same preset's real distributed training step
    (femtogpt.train.Run with its allreduce) with 1 rank and with --threads
    ranks, one thread each, the global batch unchanged.
  * with --vs-torch: the same model in PyTorch (nanoGPT's code, written out
    compactly below), first checked to compute the same loss from the same
    weights, then timed in alternation with femtogpt.
  * with --vs-nanogpt DIR (a nanoGPT checkout, with torch installed): the
    default run end to end, as a user types it: `femtogpt train` against the
    CPU command of nanoGPT's README, alternated, each a whole process (wall
    time from start to exit, peak RSS, final val loss).
  * with --vs-llama-cpp DIR (the folder holding a built llama-bench): instead
    of all the above, GPT-2 124M's prompt (pp256) and decoding (tg128) speed
    beside llama.cpp's at the same types and threads (bench_llama.py, which has
    its own options: --types, --threads 1,2, --reps, --work-dir, ...).

Every (implementation, measurement) runs in its own subprocess
(`bench.py --worker SPEC`, which prints one JSON line), so that peak RSS belongs
to that measurement alone, thread settings cannot leak from one to the next, and
femtogpt's processes never import torch (nor torch's femtogpt).

The machine may be shared and noisy: the figures to quote are the medians and
the ratios, which come from measurements taken in alternation.
"""
import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from bench_common import BENCH_PRESETS, PRESET_NAMES, QUICK_REPS, QUICK_WARMUP, REPS, SAMPLE_PRESET, SAMPLE_TOKENS, SGEMM_N, TORCH_INSTALL_HINT, WARMUP, log, machine_info, median_of, preset_cfg, schedule
from bench_e2e import measure_end_to_end, nanogpt_problem
from bench_femtogpt import worker_sample_femtogpt, worker_sgemm, worker_train_femtogpt, worker_train_ranks
from bench_llama import measure_vs_llama, worker_llama_femtogpt
from bench_profile import measure_profiles, profile_table, worker_profile
from bench_report import build_table, fmt, ratio
from bench_torch import worker_check, worker_sample_torch, worker_train_torch


WORKERS = {
    ("sgemm", "numpy"): worker_sgemm, ("sgemm", "torch"): worker_sgemm,
    ("train", "femtogpt"): worker_train_femtogpt, ("train", "torch"): worker_train_torch,
    ("sample", "femtogpt"): worker_sample_femtogpt, ("sample", "torch"): worker_sample_torch,
    ("check", "torch"): worker_check,
    ("ranks", "femtogpt"): worker_train_ranks,
    ("profile", "femtogpt"): worker_profile,
    ("llama", "femtogpt"): worker_llama_femtogpt,
}


def worker_main(spec_json):
    spec = json.loads(spec_json)
    result = WORKERS[(spec["task"], spec["impl"])](spec)
    # One JSON line, the last line of stdout: what the parent reads.
    print(json.dumps(result), flush=True)


def find_mpiexec():
    """mpiexec next to this python (the mpich wheel's) or on PATH, if mpi4py is
    installed too; else None."""
    if importlib.util.find_spec("mpi4py") is None:
        return None
    for folder in [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep):
        path = os.path.join(folder, "mpiexec")
        if os.access(path, os.X_OK):
            return path
    return None


def run_worker(spec, launcher=()):
    """Run one measurement in a fresh interpreter; its result dict, or {"error": ...}."""
    env = dict(os.environ)
    # Every thread pool a worker may touch gets the same count: femtogpt's
    # OpenMP, torch's OpenMP/MKL, numpy's OpenBLAS.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(spec["threads"])
    cmd = [*launcher, sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        log(f"  worker {spec['task']}/{spec['impl']} failed (exit {proc.returncode}):\n{tail}")
        return {"error": f"exit {proc.returncode}: {tail[-500:]}"}
    result = json.loads(lines[-1])
    result["wall_s"] = wall
    return result


def measure_ranks(args, th, R, reps, warmup):
    import tempfile
    name = args.presets[-1] if "small" not in args.presets else "small"
    mpiexec = find_mpiexec()
    if mpiexec is None:
        log("MPI scaling skipped: mpi4py or mpiexec not installed (pip install '.[mpi]')")
        return {"preset": name, "skipped": "mpi4py or mpiexec not installed"}
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(R):
            for n in (1, th):
                log(f"train {name}, {n} MPI rank(s) x 1 thread, round {r + 1}/{R}")
                spec = {"task": "ranks", "impl": "femtogpt", "threads": 1, "preset": name,
                        "out": os.path.join(tmp, f"ranks{n}-{r}"),
                        "warmup": warmup[name], "reps": reps[name]}
                result = run_worker(spec, launcher=(mpiexec, "-n", str(n)))
                out.setdefault(n, []).append(result)
                if "median_ms" in result:
                    log(f"  {result['median_ms']:,.1f} ms/step ({result['wall_s']:.0f} s)")
    one, many = median_of(out[1], "median_ms"), median_of(out[th], "median_ms")
    return {"preset": name, "ranks": th, "one_rank_ms": one, "many_ranks_ms": many,
            "speedup": ratio(one, many), "runs": {str(k): v for k, v in out.items()}}


def parse_args(argv):
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=min(2, nproc),
                    help="threads for both implementations (default: 2, or nproc if fewer)")
    ap.add_argument("--presets", default=",".join(PRESET_NAMES),
                    help="comma-separated presets to train (default: femto,baby,small)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="alternating rounds per measurement (default 3; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: fewer repetitions, one round, no small preset")
    ap.add_argument("--vs-torch", action="store_true",
                    help=f"also run the same model in PyTorch ({TORCH_INSTALL_HINT})")
    ap.add_argument("--vs-nanogpt", metavar="DIR", default=None,
                    help="also time the default run end to end against nanoGPT's README CPU "
                         "command, in this nanoGPT checkout (needs torch)")
    ap.add_argument("--vs-llama-cpp", metavar="DIR", default=None,
                    help="instead of the rest: GPT-2 124M sampling beside llama.cpp's "
                         "llama-bench in DIR (bench_llama.py; its options: "
                         "--vs-llama-cpp DIR --help)")
    ap.add_argument("--no-scaling", action="store_true",
                    help="skip the 1-thread and MPI-rank runs behind the speed-up rows")
    ap.add_argument("--markdown", default="bench.md", help="Markdown report (default bench.md)")
    ap.add_argument("--json", default="bench.json", help="every number (default bench.json)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="arithmetic of the training steps: femtogpt's --dtype; PyTorch's "
                         "bf16 is torch.autocast('cpu', torch.bfloat16) (default fp32)")
    ap.add_argument("--profile", action="store_true",
                    help="only the per-op profile of a training step, fp32 and bf16 side by "
                         "side (milliseconds, GFLOP/s, share of the CPU's roof)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)    # internal: one measurement
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.threads < 1 or args.rounds < 1:
        ap.error("--threads and --rounds must be >= 1")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in BENCH_PRESETS]
    if unknown or not presets:
        ap.error(f"unknown preset(s) {unknown}; choose from {', '.join(BENCH_PRESETS)}")
    if args.quick:
        presets = [p for p in presets if p != "small"]     # a small step takes seconds
        if not presets:
            ap.error("--quick skips the small preset: give another one in --presets")
    args.presets = presets
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--vs-llama-cpp" or a.startswith("--vs-llama-cpp=") for a in argv) \
            and "--worker" not in argv:
        # A benchmark of its own, with its own options (--threads takes a list).
        return measure_vs_llama(argv, run_worker)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)

    if args.vs_nanogpt:
        problem = nanogpt_problem(args.vs_nanogpt)
        if problem:
            sys.exit(f"--vs-nanogpt: {problem}")
    if (args.vs_torch or args.vs_nanogpt) and importlib.util.find_spec("torch") is None:
        sys.exit(f"--vs-torch needs PyTorch, which is not installed in {sys.executable}.\n"
                 f"Install the CPU build with:  {TORCH_INSTALL_HINT}\n"
                 f"(e.g. pip install torch==2.13.0 --index-url "
                 f"https://download.pytorch.org/whl/cpu)")
    try:
        import femtogpt  # noqa: F401  (fail early, with the reason, before any worker)
    except ImportError as err:
        sys.exit(f"cannot import femtogpt ({err}): pip install . or set PYTHONPATH "
                 f"to the repository")

    if args.profile:
        started = time.perf_counter()
        profiles = measure_profiles(args, run_worker)
        table = profile_table(profiles, args.threads)
        table += (f"\n\nMachine: {machine_info()}.\nCommand: `"
                  + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]) + "`\n")
        print(table)
        with open(args.markdown, "w") as f:
            f.write(table)
        with open(args.json, "w") as f:
            json.dump({"profile": profiles, "threads": args.threads}, f, indent=1)
        log(f"wrote {args.markdown} and {args.json} ({time.perf_counter() - started:.0f} s)")
        return 0
    th, R, quick = args.threads, args.rounds, args.quick
    reps = QUICK_REPS if quick else REPS
    warmup = QUICK_WARMUP if quick else WARMUP
    impls = ["femtogpt", "torch"] if args.vs_torch else ["femtogpt"]
    res = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "machine": machine_info(), "threads": th, "rounds": R, "quick": quick,
        "presets": args.presets, "reps": {p: reps[p] for p in args.presets},
        "warmup": {p: warmup[p] for p in args.presets},
    }
    started = time.perf_counter()

    # 1. Is it the same model? Checked once, before any timing.
    if args.vs_torch:
        res["check"] = {}
        for name in args.presets:
            cfg = preset_cfg(name)
            log(f"numerics check {name}: femtogpt vs torch on the same weights and batch")
            c = run_worker({"task": "check", "impl": "torch", "threads": th, "cfg": cfg,
                            "seed": 7, "batch_size": min(cfg["batch_size"], 16)})
            res["check"][name] = c
            for w in ("init", "spread"):
                if w in c:
                    d = c[w]
                    log(f"  {w:6s} weights: loss femtogpt {d['loss_femtogpt']:.6f} torch "
                        f"{d['loss_torch']:.6f} |diff| {d['loss_abs_diff']:.2e}; grad max rel "
                        f"err {d['max_grad_rel_err']:.1e}; after one AdamW step: max param "
                        f"diff {d['max_param_diff_after_step_in_lr']:.2e} lr, loss |diff| "
                        f"{d['loss_after_step_abs_diff']:.2e}")
            if "ok" in c and not c["ok"]:
                log("  MISMATCH: the two models do not compute the same loss")

    # 2. sgemm peak: numpy is the yardstick; torch.mm alongside for information.
    log(f"sgemm {SGEMM_N}³ float32, {th} threads")
    runs = {"numpy": [], "torch": []}
    for _ in range(R):
        for impl in (["numpy", "torch"] if args.vs_torch else ["numpy"]):
            runs[impl].append(run_worker({"task": "sgemm", "impl": impl, "threads": th,
                                          "warmup": 1 if quick else 2,
                                          "reps": 3 if quick else 10}))
    res["sgemm"] = {impl: median_of(r, "gflops") for impl, r in runs.items() if r}
    res["sgemm_runs"] = runs
    peak = res["sgemm"]["numpy"]
    log(f"  numpy {fmt(peak, '.1f')} GFLOP/s"
        + (f", torch.mm {fmt(res['sgemm'].get('torch'), '.1f')} GFLOP/s" if args.vs_torch else ""))

    # 3. Training steps, the two implementations alternating round by round.
    def train_runs(name, threads):
        cfg = dict(preset_cfg(name), dtype=args.dtype)
        spec = {"task": "train", "threads": threads, "cfg": cfg, "seed": 1,
                "warmup": warmup[name], "reps": reps[name],
                "lrs": schedule(name, warmup[name] + reps[name])}
        out = {impl: [] for impl in impls}
        for r in range(R):
            for impl in impls:
                log(f"train {name} {impl}, {threads} thread(s), round {r + 1}/{R}")
                out[impl].append(run_worker(dict(spec, impl=impl)))
                ms = out[impl][-1].get("median_ms")
                if ms is not None:
                    log(f"  {ms:,.1f} ms/step, peak RSS {out[impl][-1]['peak_rss_mb']:,.0f} MB "
                        f"({out[impl][-1]['wall_s']:.0f} s)")
        return cfg, out

    res["train"] = {}
    for name in args.presets:
        cfg, out = train_runs(name, th)
        entry = {"cfg": cfg, "runs": out}
        for impl, results in out.items():
            ms = median_of(results, "median_ms")
            if ms is None:
                entry[impl] = {"error": "all runs failed"}
                continue
            fpt = median_of(results, "flops_per_token")
            tps = cfg["batch_size"] * cfg["block_size"] / (ms / 1e3)
            peak_rss = median_of(results, "peak_rss_mb")
            base = median_of(results, "rss_after_imports_mb")
            entry[impl] = {
                "median_ms": ms, "tokens_per_s": tps, "flops_per_token": fpt,
                "n_params_no_wpe": median_of(results, "n_params_no_wpe"),
                "mfu": ratio(fpt * tps, peak * 1e9) if peak else None,
                "peak_rss_mb": peak_rss, "rss_after_imports_mb": base,
                "rss_above_imports_mb": None if base is None else peak_rss - base,
            }
        if args.vs_torch:
            entry["speed_ratio"] = ratio(entry["femtogpt"].get("tokens_per_s"),
                                         entry["torch"].get("tokens_per_s"))
            entry["memory_ratio"] = ratio(entry["femtogpt"].get("peak_rss_mb"),
                                          entry["torch"].get("peak_rss_mb"))
        res["train"][name] = entry

    # 4. Thread scaling on the largest preset measured: its 1-thread step time
    # over the step time at --threads (measured above).
    if th > 1 and not args.no_scaling:
        name = args.presets[-1] if "small" not in args.presets else "small"
        cfg, out = train_runs(name, 1)
        sc = {"preset": name, "runs_1_thread": out}
        for impl in impls:
            one = median_of(out[impl], "median_ms")
            many = res["train"][name].get(impl, {}).get("median_ms")
            sc[impl] = ratio(one, many)
            sc[f"{impl}_1_thread_ms"] = one
        res["scaling"] = sc

    # 5. Data-parallel scaling over MPI: 1 rank, then th ranks, 1 thread each.
    if th > 1 and not args.no_scaling:
        res["ranks"] = measure_ranks(args, th, R, reps, warmup)

    # 6. Sampling: the baby model, batch 1, from a 1-token prompt.
    sample = {"cfg": preset_cfg(SAMPLE_PRESET), "runs": {impl: [] for impl in impls}}
    for r in range(R):
        for impl in impls:
            log(f"sampling {SAMPLE_PRESET} {impl}, {SAMPLE_TOKENS} tokens, round {r + 1}/{R}")
            sample["runs"][impl].append(run_worker({
                "task": "sample", "impl": impl, "threads": th, "cfg": sample["cfg"],
                "tokens": SAMPLE_TOKENS, "runs": 2 if quick else 3}))
    for impl in impls:
        sample[impl] = median_of(sample["runs"][impl], "tokens_per_s")
    res["sample"] = sample

    # 7. End to end: the default run against nanoGPT's, whole processes alternated.
    if args.vs_nanogpt:
        res["end_to_end"] = measure_end_to_end(args.vs_nanogpt, R, th)

    # 8. The GPT-2 tokenizer's encoding speed, one thread and all, beside the
    # tokenizers library's (which also builds the vocabulary: no download).
    if importlib.util.find_spec("tokenizers") is not None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from gpt2_probe import tokenizer_speed
        runs = [[tokenizer_speed(8000, threads=t) for t in (1, th)] for _ in range(R)]
        res["tokenizer"] = {
            "vocab": runs[0][0]["vocab"], "mb": runs[0][0]["mb"],
            "same_ids": all(r["same_ids"] for pair in runs for r in pair),
            "femtogpt_1": statistics.median(p[0]["femtogpt_mb_s"] for p in runs),
            "femtogpt_all": statistics.median(p[1]["femtogpt_mb_s"] for p in runs),
            "tokenizers_1": statistics.median(p[0]["tokenizers_mb_s"] for p in runs)}
    else:
        log("GPT-2 tokenizer speed skipped: pip install tokenizers (it builds the vocabulary "
            "to compare against)")

    res["machine"]["loadavg_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - started
    table = build_table(res, args)
    print(table)
    with open(args.markdown, "w") as f:
        f.write(table)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {args.markdown} and {args.json} ({res['elapsed_s']:.0f} s)")
    # A failed equivalence check makes the comparison meaningless: say so in the status.
    if args.vs_torch and not all(c.get("ok") for c in res["check"].values()):
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
