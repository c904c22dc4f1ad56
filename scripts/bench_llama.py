"""scripts/bench.py --vs-llama-cpp DIR: GPT-2 124M sampling, femtogpt beside
llama.cpp's llama-bench, on the same model, threads and types, in one run.

    python scripts/bench.py --vs-llama-cpp ~/llama.cpp/build/bin --quick
    python scripts/bench.py --vs-llama-cpp DIR --types f32,q8_0 --threads 1,2 --rounds 3

The goal it checks (the issue's): batch 1, threads 1 and 2, at the same type
(femtogpt's fp32, bf16, int8 against llama.cpp's f32, bf16, q8_0), decoding
(tg) at >= 1.2x llama.cpp's tokens/s and a 256-token prompt (pp256) at >= 1x.

  the model  a GPT-2 124M-shaped Hugging Face folder made here, random weights
             and a synthetic byte-level vocabulary (bench_gpt2_folder.py), and
             its GGUF files from `femtogpt export --dtype f32|bf16|q8_0`: both
             sides compute with the same weights. Cached under --work-dir.
  llama.cpp  `llama-bench -m X.gguf -p 256 -n 128 -t T -r R -o json`: pp256 is
             one batch of 256 tokens into an empty cache, tg128 is 128
             single-token decodes from an empty context; the per-repetition
             tokens/s (samples_ts) are kept.
  femtogpt   the same two tests in a worker process (bench.py --worker) with
             its thread count fixed: pp = the prompt pass of generate() over 256
             random tokens, tg = 128 decoded tokens after a 1-token prompt, both
             from model.last_generate_stats; a femtogpt without those stats is
             timed by generate's callback (prompt = up to the first token,
             decode = the rest) and its rows are marked.

  ceiling    batch-1 decoding reads every weight once per token, so tg cannot pass
             the machine's memory read bandwidth / the bytes a step reads. Each
             round measures that bandwidth at each thread count
             (memory_bandwidth.py: a 1 GiB buffer summed by T threads) and the
             report turns it into a ceiling in tokens/s, the share of it each
             program reaches, and the highest ratio the ceiling leaves.

The two peers alternate (femtogpt, llama.cpp, femtogpt, ...) round by round, so
that the machine's noise falls on both; each figure is the median of every
repetition of every round, with its min and max, and the ratio is femtogpt's
median over llama.cpp's.
"""
import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

from bench_ceiling import ceiling_rows, ceiling_table, measure_bandwidth
from bench_common import cpu_name, log, machine_info, peak_rss_mb, rss_now_mb
from bench_gpt2_folder import GPT2_124M, export_gguf, make_hf_folder

# GGUF type -> femtogpt dtype: the pairs compared.
TYPES = {"f32": "fp32", "bf16": "bf16", "q8_0": "int8"}
PROMPT, DECODE, QUICK_DECODE = 256, 128, 32
REPS, QUICK_REPS, ROUNDS = 3, 2, 3
GOALS = {"pp": 1.0, "tg": 1.2}      # femtogpt / llama.cpp tokens/s, at least
BUILD_HINT = ("build one from a llama.cpp checkout with\n"
              "  cmake -B build -DLLAMA_BUILD_TESTS=OFF && "
              "cmake --build build --target llama-bench llama-simple\n"
              "and give its build/bin folder: --vs-llama-cpp llama.cpp/build/bin")


# --------------------------------------------------------------------------- llama.cpp


def find_llama_bench(folder):
    """The llama-bench executable in folder (or in folder/build/bin, for a
    checkout), else SystemExit saying how to build one."""
    for path in (os.path.join(folder, "llama-bench"),
                 os.path.join(folder, "build", "bin", "llama-bench")):
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return os.path.abspath(path)
    sys.exit(f"--vs-llama-cpp {folder}: no llama-bench there; {BUILD_HINT}")


def llama_commit(bench, override=None):
    """(commit, where it was read): --llama-commit, else a COMMIT file in the
    build folder or one of its parents (bin -> build -> source), else git."""
    if override:
        return override, "--llama-commit"
    folder = os.path.dirname(bench)
    for _ in range(3):
        path = os.path.join(folder, "COMMIT")
        if os.path.isfile(path):
            with open(path) as f:
                return f.read().strip(), path
        folder = os.path.dirname(folder)
    proc = subprocess.run(["git", "-C", os.path.dirname(bench), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return proc.stdout.strip(), "git rev-parse HEAD"
    return None, "unknown: give --llama-commit"


def parse_llama_bench(text):
    """llama-bench -o json's output -> {"pp": test, "tg": test, "model": {...}}, each
    test {"n", "threads", "avg_ts", "stddev_ts", "samples_ts"}; other tests
    (pp+tg, or at a depth) are left out."""
    rows = json.loads(text)
    if not isinstance(rows, list) or not rows:
        raise ValueError("llama-bench printed no results")
    out = {"model": {k: rows[0].get(k) for k in ("model_type", "model_size", "model_n_params",
                                                  "build_commit", "build_number", "cpu_info")}}
    for r in rows:
        if r.get("n_depth", 0):
            continue
        if r["n_gen"] == 0:
            test, n = "pp", r["n_prompt"]
        elif r["n_prompt"] == 0:
            test, n = "tg", r["n_gen"]
        else:
            continue
        out[test] = {"n": n, "threads": r["n_threads"], "avg_ts": r["avg_ts"],
                     "stddev_ts": r["stddev_ts"],
                     "samples_ts": r.get("samples_ts") or [r["avg_ts"]]}
    return out


def run_llama_bench(bench, gguf, threads, reps, prompt, decode):
    """One llama-bench process: its parsed results and its own peak RSS (wait4)."""
    cmd = [bench, "-m", gguf, "-p", str(prompt), "-n", str(decode), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-10:])
        log(f"  llama-bench failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
        return {"error": f"exit {proc.returncode}: {tail[-500:]}"}
    result = parse_llama_bench(stdout)
    result.update(peak_rss_mb=usage.ru_maxrss / 1024.0, wall_s=wall, command=cmd)
    return result


# --------------------------------------------------------------------------- femtogpt


def femtogpt_model(folder, dtype):
    """(model, note): femtogpt.load(folder, dtype=...), or, for a femtogpt whose
    load has no dtype yet, fp32 only with a note; (None, why) when the dtype
    cannot be had."""
    import femtogpt
    try:
        return femtogpt.load(folder, dtype=dtype)[0], None
    except TypeError as err:
        if "dtype" not in str(err):
            raise
        if dtype != "fp32":
            return None, "this femtogpt's load() takes no dtype="
        return femtogpt.load(folder)[0], "load() without dtype= (fp32)"
    except femtogpt.ConfigError as err:
        return None, str(err)


def timed_generate(model, idx, new_tokens, by_callback):
    """generate() greedily; its stats dict (prompt_tokens, prompt_seconds,
    decode_tokens, decode_seconds). by_callback: measured here instead, the
    prompt up to the first new token and the decode after it."""
    if not by_callback:
        model.generate(idx, new_tokens, temperature=0.0, seed=0)
        return dict(model.last_generate_stats)
    marks = []
    t0 = time.perf_counter()
    model.generate(idx, new_tokens, temperature=0.0, seed=0,
                   callback=lambda tokens: marks.append(time.perf_counter()))
    end = time.perf_counter()
    return {"prompt_tokens": idx.shape[1], "prompt_seconds": marks[0] - t0,
            "decode_tokens": len(marks) - 1, "decode_seconds": end - marks[0]}


def weights_bytes(model):
    """(bytes of the weights as the model holds them, what counted them): the
    model's own weights_bytes if it has one, else its fp32 parameter views."""
    value = getattr(model, "weights_bytes", None)
    value = value() if callable(value) else value
    if isinstance(value, int):
        return value, "model.weights_bytes"
    try:
        return sum(v.nbytes for v in model.state_views().values()), "state_views"
    except RuntimeError:         # a model that keeps only converted weights
        return None, None


def worker_llama_femtogpt(spec):
    """bench.py --worker: pp and tg of one dtype at one thread count, femtogpt."""
    import numpy as np
    import femtogpt
    femtogpt.set_num_threads(spec["threads"])
    baseline = rss_now_mb()
    model, note = femtogpt_model(spec["folder"], spec["dtype"])
    if model is None:
        return {"unsupported": note}
    model.eval()
    rng = np.random.default_rng(0)
    V = model.config.vocab_size
    prompt = rng.integers(0, V - 1, (1, spec["prompt"]))     # no end-of-text id
    start = rng.integers(0, V - 1, (1, 1))
    # Warm-up (as llama-bench's): one prompt pass, a few decodes.
    model.generate(prompt, 1, temperature=0.0, seed=0)
    model.generate(start, 8, temperature=0.0, seed=0)
    by_callback = not isinstance(getattr(model, "last_generate_stats", None), dict)
    pp, tg = [], []
    for _ in range(spec["reps"]):
        pp.append(timed_generate(model, prompt, 1, by_callback))
    for _ in range(spec["reps"]):
        # decode + 1 new tokens: the first comes from the 1-token prompt's pass,
        # then `decode` single-token decodes (each sampling one more), which is
        # llama-bench's tg. The rate counts those decodes, whatever the stats
        # count as decode_tokens (the sampled tokens: one more).
        tg.append(timed_generate(model, start, spec["decode"] + 1, by_callback))
    nbytes, counted_by = weights_bytes(model)
    return {"pp_ts": [s["prompt_tokens"] / s["prompt_seconds"] for s in pp],
            "tg_ts": [spec["decode"] / s["decode_seconds"] for s in tg],
            "pp_stats": pp, "tg_stats": tg,
            "timing": "callback" if by_callback else "last_generate_stats", "load_note": note,
            "weights_bytes": nbytes, "weights_bytes_from": counted_by,
            "threads": femtogpt.get_num_threads(), "femtogpt": os.path.dirname(femtogpt.__file__),
            "rss_after_imports_mb": baseline,
            "peak_rss_mb": peak_rss_mb()}


# --------------------------------------------------------------------------- the run


def femtogpt_identity():
    """{"path", "version", "commit"} of the femtogpt this process imports, after
    pinning it for every child (workers, `femtogpt export`) through PYTHONPATH:
    a worker started from scripts/ would otherwise find whichever femtogpt is
    installed, not necessarily the one the parent measured."""
    try:
        import femtogpt
    except ImportError as err:
        sys.exit(f"cannot import femtogpt ({err}): pip install . or set PYTHONPATH to the "
                 f"repository")
    package = os.path.dirname(os.path.abspath(femtogpt.__file__))
    root = os.path.dirname(package)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True,  # noqa: E731
                                    text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or None
    if commit and git("status", "--porcelain", "--", "femtogpt"):
        commit += " (with uncommitted changes in femtogpt/)"
    return {"path": package, "version": femtogpt.__version__, "commit": commit}



def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vs-llama-cpp", "--llama-cpp", dest="llama_cpp", metavar="DIR",
                    required=True, help="the folder holding llama-bench (a build's bin/)")
    ap.add_argument("--types", default="f32,bf16,q8_0",
                    help="GGUF types, each against femtogpt's own (f32=fp32, bf16, q8_0=int8)")
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions per process (default {REPS}; {QUICK_REPS} with --quick)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"alternating rounds (default {ROUNDS}; 1 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run: one round, {QUICK_REPS} repetitions, tg{QUICK_DECODE}")
    ap.add_argument("--work-dir", default=None,
                    help="where the model folder and GGUF files are kept between runs "
                         "(default: a temporary folder, removed at the end)")
    ap.add_argument("--llama-commit", default=None,
                    help="llama.cpp's commit, when no COMMIT file or git checkout says it")
    ap.add_argument("--markdown", default="bench_llama.md",
                    help="Markdown report (default bench_llama.md)")
    ap.add_argument("--json", default="bench_llama.json",
                    help="every number (default bench_llama.json)")
    args = ap.parse_args(argv)
    args.types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in args.types if t not in TYPES]
    if unknown or not args.types:
        ap.error(f"--types: unknown {unknown}; choose from {', '.join(TYPES)}")
    try:
        args.threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads takes a comma-separated list of counts, got {args.threads!r}")
    args.reps = args.reps or (QUICK_REPS if args.quick else REPS)
    args.rounds = args.rounds or (1 if args.quick else ROUNDS)
    args.decode = QUICK_DECODE if args.quick else DECODE
    if not args.threads or min(args.threads) < 1 or args.reps < 1 or args.rounds < 1:
        ap.error("--threads, --reps and --rounds must be >= 1")
    return args


def spread(samples):
    return ({"median": statistics.median(samples), "min": min(samples), "max": max(samples),
             "n": len(samples)} if samples else None)


def summarise(runs, args):
    """Per (type, threads, test): both peers' median, min, max and the ratio."""
    rows = []
    for gguf_type in args.types:
        # A dtype this femtogpt lacks is asked for once, then skipped.
        lacking = next((r["unsupported"] for key, v in runs.items()
                        if key.startswith(f"{gguf_type}/") for r in v["femtogpt"]
                        if "unsupported" in r), None)
        for th in args.threads:
            key = f"{gguf_type}/t{th}"
            fem = [r for r in runs[key]["femtogpt"] if "pp_ts" in r]
            lla = [r for r in runs[key]["llama.cpp"] if "pp" in r]
            for test, n in (("pp", PROMPT), ("tg", args.decode)):
                f = spread([x for r in fem for x in r[f"{test}_ts"]])
                ll = spread([x for r in lla if test in r for x in r[test]["samples_ts"]])
                ratio = f["median"] / ll["median"] if f and ll else None
                # Each round's two processes ran back to back: their ratio sees the
                # same machine, which a busy neighbour can change between rounds.
                pairs = zip(runs[key]["femtogpt"], runs[key]["llama.cpp"])
                paired = [statistics.median(a[f"{test}_ts"])
                          / statistics.median(b[test]["samples_ts"])
                          for a, b in pairs if "pp_ts" in a and test in b]
                rows.append({
                    "type": gguf_type, "femtogpt_dtype": TYPES[gguf_type], "threads": th,
                    "test": f"{test}{n}", "femtogpt": f, "llama_cpp": ll, "ratio": ratio,
                    "round_ratios": paired,
                    "round_ratio_median": statistics.median(paired) if paired else None,
                    "goal": GOALS[test],
                    "meets_goal": None if ratio is None else ratio >= GOALS[test],
                    "femtogpt_timing": sorted({r["timing"] for r in fem}) or None,
                    "femtogpt_unsupported": lacking,
                    "femtogpt_peak_rss_mb": max((r["peak_rss_mb"] for r in fem), default=None),
                    "femtogpt_weights_bytes": fem[0]["weights_bytes"] if fem else None,
                    "llama_peak_rss_mb": max((r["peak_rss_mb"] for r in lla), default=None),
                    "llama_model_size": lla[0]["model"]["model_size"] if lla else None})
    return rows


def cell(s):
    return "—" if s is None else f"{s['median']:,.1f} ({s['min']:,.1f}–{s['max']:,.1f})"


def build_table(res):
    m, lc = res["machine"], res["llama_cpp"]
    lines = [f"## GPT-2 124M sampling, femtogpt beside llama.cpp: {m['cpu_model']}, "
             f"{m['nproc']} cores", "",
             "| type (femtogpt ↔ llama.cpp) | threads | test | femtogpt tok/s | "
             "llama.cpp tok/s | femtogpt ÷ llama.cpp | per round (median) | goal |",
             "|---|---|---|---|---|---|---|---|"]
    marked = False
    for r in res["rows"]:
        f = cell(r["femtogpt"])
        if r["femtogpt"] is None and r["femtogpt_unsupported"]:
            f = "not in this femtogpt"
        elif r["femtogpt_timing"] and "callback" in r["femtogpt_timing"]:
            f += " †"
            marked = True
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}×"
        per_round = ("—" if r["round_ratio_median"] is None else
                     f"{r['round_ratio_median']:.2f}× (" + ", ".join(
                         f"{x:.2f}" for x in r["round_ratios"]) + ")")
        goal = f"≥ {r['goal']:.1f}×" + ("" if r["meets_goal"] is None else
                                          (" met" if r["meets_goal"] else " not met"))
        lines.append(f"| {r['femtogpt_dtype']} ↔ {r['type']} | {r['threads']} | {r['test']} | "
                     f"{f} | {cell(r['llama_cpp'])} | {ratio} | {per_round} | {goal} |")
    lines += ["", "| type | threads | femtogpt peak RSS (MB) | femtogpt weights (MB) | "
              "llama-bench peak RSS (MB) | GGUF tensors (MB) |", "|---|---|---|---|---|---|"]
    mb = lambda x, unit=1: "—" if x is None else f"{x / unit:,.0f}"       # noqa: E731
    for r in res["rows"][::2]:           # one per (type, threads): pp's row
        lines.append(f"| {r['femtogpt_dtype']} ↔ {r['type']} | {r['threads']} | "
                     f"{mb(r['femtogpt_peak_rss_mb'])} | {mb(r['femtogpt_weights_bytes'], 1e6)} | "
                     f"{mb(r['llama_peak_rss_mb'])} | {mb(r['llama_model_size'], 1e6)} |")
    lines += ceiling_table(res)
    lines += [
        "",
        f"Tokens/s: median (min–max) over {res['rounds']} round(s) × {res['reps']} "
        f"repetitions; femtogpt and llama.cpp alternated, each measurement its own process, "
        f"the same thread count for both. pp{PROMPT}: one {PROMPT}-token prompt pass; "
        f"tg{res['decode']}: {res['decode']} single-token decodes after a 1-token prompt "
        f"(llama-bench's from an empty context). The ratio is of the two medians; per "
        f"round, of the two processes run back to back in each round (their median, "
        f"then each round's). Goal (the issue's): tg ≥ 1.2×, pp ≥ 1.0× at the same type.",
        "Model: GPT-2 124M's shape (12 layers, 12 heads, 768 wide, 1,024 positions, "
        "50,257 tokens), random N(0, 0.02) weights, synthetic byte-level BPE vocabulary; "
        "llama.cpp reads femtogpt's GGUF export of the same folder.",
        f"femtogpt: {res['femtogpt']['version']}, commit "
        f"{res['femtogpt']['commit'] or 'unknown'} ({res['femtogpt']['path']}).",
        f"llama.cpp: commit {lc['commit'] or 'unknown'} ({lc['commit_from']}), "
        f"`llama-bench -p {PROMPT} -n {res['decode']} -r {res['reps']} -t T -o json` "
        f"(its own figures, avg ± stddev per process, are in the JSON file).",
        f"Machine: {m['cpu_model']}; {m['platform']}, Python {m['python']}, numpy "
        f"{m['numpy']}; load average {m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0]:.2f} at end. Date: {res['date']}.",
        "Weights: femtogpt's as it holds them; llama.cpp's GGUF holds the tied lm_head "
        "twice (token_embd and output), as its gpt2 architecture wants.",
    ]
    if marked:
        lines.append("† this femtogpt has no model.last_generate_stats: timed by generate()'s "
                     "callback (prompt = until the first new token, decode = the rest).")
    lines.append(f"Command: `{res['command']}`")
    return "\n".join(lines) + "\n"


def measure_vs_llama(argv, run_worker):
    """The whole comparison; run_worker is bench.py's (a spec in a fresh process)."""
    args = parse_args(argv)
    bench = find_llama_bench(args.llama_cpp)
    commit, commit_from = llama_commit(bench, args.llama_commit)
    femto = femtogpt_identity()
    log(f"femtogpt {femto['version']} from {femto['path']}, commit {femto['commit']}; "
        f"llama.cpp {commit} ({bench})")
    temp = None
    if args.work_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="femtogpt-bench-llama-")
        args.work_dir = temp.name
    started = time.perf_counter()
    res = {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
           "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "machine": machine_info(), "cpu": cpu_name(), "shape": GPT2_124M,
           "types": args.types, "threads": args.threads, "reps": args.reps,
           "rounds": args.rounds, "prompt": PROMPT, "decode": args.decode, "quick": args.quick,
           "femtogpt": femto,
           "llama_cpp": {"bench": bench, "commit": commit, "commit_from": commit_from}}
    try:
        folder = make_hf_folder(args.work_dir, log=log)
        ggufs = {t: export_gguf(folder, t, log=log) for t in args.types}
        runs = {f"{t}/t{th}": {"femtogpt": [], "llama.cpp": []}
                for t in args.types for th in args.threads}
        unsupported = set()
        res["bandwidth"] = {str(th): [] for th in args.threads}
        for r in range(args.rounds):
            for th in args.threads:
                bw = measure_bandwidth(th)
                res["bandwidth"][str(th)].append(bw)
                log(f"memory read, {th} thread(s): " + (f"{bw['gb_s']:.1f} GB/s" if "gb_s" in bw
                                                         else bw["error"]))
                for t in args.types:
                    key, d = f"{t}/t{th}", TYPES[t]
                    if d not in unsupported:
                        log(f"femtogpt {d}, {th} thread(s), round {r + 1}/{args.rounds}")
                        out = run_worker({"task": "llama", "impl": "femtogpt", "threads": th,
                                          "folder": folder, "dtype": d, "prompt": PROMPT,
                                          "decode": args.decode, "reps": args.reps})
                        runs[key]["femtogpt"].append(out)
                        if "unsupported" in out:
                            log(f"  skipped: {out['unsupported']}")
                            unsupported.add(d)
                        elif "pp_ts" in out:
                            log(f"  pp {statistics.median(out['pp_ts']):,.1f} tok/s, tg "
                                f"{statistics.median(out['tg_ts']):,.1f} tok/s ({out['timing']})")
                    log(f"llama.cpp {t}, {th} thread(s), round {r + 1}/{args.rounds}")
                    out = run_llama_bench(bench, ggufs[t], th, args.reps, PROMPT, args.decode)
                    runs[key]["llama.cpp"].append(out)
                    if "pp" in out:
                        log(f"  pp {statistics.median(out['pp']['samples_ts']):,.1f} tok/s, tg "
                            f"{statistics.median(out['tg']['samples_ts']):,.1f} tok/s")
    finally:
        if temp is not None:
            temp.cleanup()
    res["runs"] = runs
    res["rows"] = summarise(runs, args)
    res["ceiling"] = ceiling_rows(res)
    built = next((r["model"] for v in runs.values() for r in v["llama.cpp"] if "model" in r), {})
    res["llama_cpp"].update(build_commit=built.get("build_commit"),
                            build_number=built.get("build_number"),
                            cpu_info=built.get("cpu_info"))
    res["machine"]["loadavg_end"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - started
    table = build_table(res)
    print(table)
    with open(args.markdown, "w") as f:
        f.write(table)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    log(f"wrote {args.markdown} and {args.json} ({res['elapsed_s']:.0f} s)")
    return 0
