#!/usr/bin/env python
"""The default run's final val loss over several seeds, femtogpt beside nanoGPT.

    python scripts/seed_study.py --nanogpt ~/nanoGPT              # seeds 1337, 1..9
    python scripts/seed_study.py --nanogpt ~/nanoGPT --seeds 1337,1,2 --only femtogpt

Each seed runs `femtogpt train --seed S` (the baby preset: nanoGPT's CPU
recipe) and nanoGPT's README CPU command with torch seeded by S (seed 1337 is
nanoGPT as it ships; see NANOGPT_SEED_SHIM in bench.py), one after the other.
The final val loss is the evaluation at step 2000 (20 batches of each split,
as nanoGPT's command asks). Results are appended to --json as they come, so an
interrupted study continues where it stopped; the summary (mean, sample
standard deviation, range, Welch's t for the difference of the means) is
printed at the end. nanoGPT needs torch and its shakespeare_char data
prepared (bench.py --vs-nanogpt says how).
"""
import argparse
import json
import math
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import nanogpt_problem, run_femtogpt_default, run_nanogpt  # noqa: E402

DEFAULT_SEEDS = [1337] + list(range(1, 10))


def summary(values):
    return {"n": len(values), "mean": statistics.mean(values),
            "sd": statistics.stdev(values) if len(values) > 1 else float("nan"),
            "min": min(values), "max": max(values)}


def welch_t(a, b):
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    return (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", metavar="DIR", help="a nanoGPT checkout")
    ap.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    ap.add_argument("--only", choices=["femtogpt", "nanogpt"], default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="seed_study.json")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    impls = [args.only] if args.only else ["femtogpt", "nanogpt"]
    if "nanogpt" in impls:
        if not args.nanogpt:
            ap.error("--nanogpt DIR is needed (or --only femtogpt)")
        problem = nanogpt_problem(args.nanogpt)
        if problem:
            sys.exit(problem)
    done = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            done = json.load(f)
    with tempfile.TemporaryDirectory(prefix="femtogpt-seeds-") as tmp:
        for seed in seeds:
            for impl in impls:
                key = f"{impl}:{seed}"
                if key in done:
                    continue
                out = os.path.join(tmp, key.replace(":", "-"))
                print(f"{impl} seed {seed} ...", file=sys.stderr, flush=True)
                if impl == "femtogpt":
                    result = run_femtogpt_default(seed, out, args.threads)
                else:
                    result = run_nanogpt(args.nanogpt, seed, out, args.threads)
                if "error" in result:
                    sys.exit(f"{impl} seed {seed} failed: {result['error']}")
                print(f"  val loss {result['val_loss']:.4f} at step {result['iter']}, "
                      f"{result['wall_s']:.0f} s", file=sys.stderr, flush=True)
                done[key] = result
                with open(args.json + ".tmp", "w") as f:
                    json.dump(done, f, indent=1)
                os.replace(args.json + ".tmp", args.json)
    finals = {impl: [done[f"{impl}:{s}"]["val_loss"] for s in seeds if f"{impl}:{s}" in done]
              for impl in ("femtogpt", "nanogpt")}
    print(f"| final val loss, seeds {args.seeds} | n | mean | sd | range |")
    print("|---|---|---|---|---|")
    for impl, values in finals.items():
        if values:
            s = summary(values)
            print(f"| {impl} | {s['n']} | {s['mean']:.4f} | {s['sd']:.4f} | "
                  f"{s['min']:.4f}–{s['max']:.4f} |")
    if all(finals.values()):
        print(f"\nWelch's t (femtogpt − nanoGPT): {welch_t(*finals.values()):.2f}")
    for seed in seeds:
        row = [f"{done[f'{i}:{seed}']['val_loss']:.4f}" if f"{i}:{seed}" in done else "—"
               for i in ("femtogpt", "nanogpt")]
        print(f"seed {seed}: femtogpt {row[0]}, nanoGPT {row[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
