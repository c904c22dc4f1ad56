#!/usr/bin/env python
"""The core's builds side by side: train-step and sampling speed of each code path.

    python scripts/bench_paths.py                       # every build this CPU runs
    python scripts/bench_paths.py --native-dir /tmp/n   # and a FEMTOGPT_NATIVE=1 build

A portable install carries the core compiled for x86-64, x86-64-v3 and x86-64-v4
(femtogpt/_dispatch.py picks one); this runs bench.py's own workers (the same
measurement as its train-step and sampling rows) once per build, forced with
FEMTOGPT_CPU, rounds alternated, and prints the medians and each build's speed
relative to the one that import picks. --native-dir is a source tree built in
place with `FEMTOGPT_NATIVE=1 python setup.py build_ext --inplace`: the
single -march=native build that a portable one must not be slower than.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench  # noqa: E402

import femtogpt  # noqa: E402
from femtogpt import _cpu, _dispatch  # noqa: E402


def run_worker(spec, env):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--worker",
                           json.dumps(spec)], capture_output=True, text=True, env=env,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="femto,baby")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40, help="timed steps per worker")
    ap.add_argument("--native-dir", default=None,
                    help="a source tree built in place (FEMTOGPT_NATIVE=1, or any other "
                         "build to compare with: it is run as the 'native' row)")
    ap.add_argument("--builds", default=None,
                    help="comma-separated subset of the builds (default: all)")
    ap.add_argument("--json", default="bench_paths.json")
    args = ap.parse_args(argv)
    level = _cpu.cpu_level()
    paths = {t: {"FEMTOGPT_CPU": t} for t in _cpu.BUILT
             if _dispatch.LEVELS.get(t, 0) <= level}
    if args.native_dir:
        paths["native"] = {"PYTHONPATH": os.path.abspath(args.native_dir),
                           "FEMTOGPT_CPU": ""}
    if args.builds:
        keep = [b.strip() for b in args.builds.split(",")]
        paths = {k: v for k, v in paths.items() if k in keep}
    chosen = femtogpt.build_info()["core"]
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    results = {path: {p: [] for p in presets + ["sample"]} for path in paths}
    for r in range(args.rounds):
        for path, extra in paths.items():
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **extra)
            for preset in presets:
                out = run_worker({"task": "train", "impl": "femtogpt", "threads": args.threads,
                                  "cfg": bench.preset_cfg(preset), "seed": 1, "reps": args.reps,
                                  "warmup": 2, "lrs": bench.schedule(preset, args.reps + 2)},
                                 env)
                results[path][preset].append(out["median_ms"])
            out = run_worker({"task": "sample", "impl": "femtogpt", "threads": args.threads,
                              "cfg": bench.preset_cfg(bench.SAMPLE_PRESET),
                              "tokens": bench.SAMPLE_TOKENS, "runs": 2}, env)
            results[path]["sample"].append(out["tokens_per_s"])
            print(f"round {r + 1}/{args.rounds} {path}: " + ", ".join(
                f"{k} {v[-1]:,.1f}" for k, v in results[path].items()), file=sys.stderr,
                flush=True)
    medians = {path: {k: statistics.median(v) for k, v in rows.items()}
               for path, rows in results.items()}
    cpu = _dispatch.level_name(level)
    print(f"CPU runs up to {cpu}; import picks {chosen}; {args.threads} threads, "
          f"medians of {args.rounds} alternated rounds\n")
    print("| build | " + " | ".join(f"train step {p} (ms)" for p in presets)
          + " | sampling (tok/s) |")
    print("|---|" + "---|" * (len(presets) + 1))
    for path, m in medians.items():
        ref = medians.get(chosen, m)
        rel = [m[p] / ref[p] for p in presets]
        print(f"| {path}{' (picked)' if path == chosen else ''} | " + " | ".join(
            f"{m[p]:.1f} ({r:.2f}×)" for p, r in zip(presets, rel))
            + f" | {m['sample']:,.0f} |")
    with open(args.json, "w") as f:
        json.dump({"cpu": cpu, "chosen": chosen, "runs": results, "medians": medians}, f,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
