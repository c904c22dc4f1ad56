"""scripts/bench.py --profile: where a training step's time goes, per op.

For each preset and each dtype (fp32, bf16), a worker process trains a few
steps with the model's per-op timer on (GPT.profile) and reports, per op of
forward, backward and the optimizer: milliseconds per step, GFLOP/s of its
matrix products, and that as a share of the CPU's roof for the arithmetic it
used. The roof is peak FLOP per cycle per core x cores used x clock:

    fp32 FMA     AVX-512 on Zen 4 (two 256-bit FMA pipes): 32 FLOP/cycle;
                 on Intel with two 512-bit FMA units: 64; AVX2: 32
    AVX512_BF16  vdpbf16ps does twice the fp32 FMA work: 64 (Zen 4), 128 (Intel)
    AMX-BF16     1,024 bf16 FLOP/cycle (Intel Sapphire Rapids and later)

The clock is measured with a chain of dependent adds (gemm_bf16_probe's
clock_ghz, which needs a C compiler), else taken from /proc/cpuinfo, which a
virtual machine may report as nominal: the roof column is an estimate (a
share over 100% says the clock ran faster than assumed), the milliseconds
are not.
"""
import statistics

from bench_common import log, preset_cfg, random_batch, schedule


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set(), "", 0.0
    flags, vendor, mhz = set(), "", []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "vendor_id" and not vendor:
            vendor = value.strip()
        elif key == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    return flags, vendor, (statistics.median(mhz) / 1000.0 if mhz else 0.0)


def measured_clock_ghz():
    """The clock under load, from a chain of dependent adds; None without gcc."""
    import tempfile
    try:
        from gemm_bf16_lib import build
        from gemm_bf16_probe import clock_ghz
        with tempfile.TemporaryDirectory() as tmp:
            return clock_ghz(build(tmp))
    except Exception:       # no compiler, another architecture: fall back to cpuinfo
        return None


def roofs_per_cycle(flags, vendor):
    """{arithmetic: FLOP per cycle per core} for what this CPU has."""
    intel = vendor == "GenuineIntel"
    avx512 = "avx512f" in flags
    fp32 = 64 if (avx512 and intel) else 32 if ("fma" in flags or avx512) else 16
    roofs = {"fp32": fp32}
    if "avx512_bf16" in flags:
        roofs["avx512bf16"] = 2 * fp32
    if "amx_bf16" in flags:
        roofs["amx"] = 1024
    return roofs


def worker_profile(spec):
    """Train spec["steps"] steps of spec's preset at spec["dtype"] with the
    per-op timer on (after spec["warmup"] untimed ones); the report per op."""
    import numpy as np
    import femtogpt
    from bench_femtogpt import femto_model, femto_optimizer, femto_train_step
    femtogpt.set_num_threads(spec["threads"])
    cfg = dict(spec["cfg"], dtype=spec["dtype"])
    model = femto_model(cfg)
    optimizer = femto_optimizer(model, cfg)
    rng = np.random.default_rng(0)
    lrs = spec["lrs"]
    x, y = random_batch(rng, cfg)
    for i in range(spec["warmup"]):
        femto_train_step(model, optimizer, cfg, x, y, lrs[i % len(lrs)])
    model.profile(True)
    model.profile_reset()
    for i in range(spec["steps"]):
        femto_train_step(model, optimizer, cfg, x, y, lrs[i % len(lrs)])
    rows = model.profile_report()
    model.profile(False)
    return {"rows": rows, "steps": spec["steps"],
            "bf16_path": femtogpt.build_info().get("bf16"),
            "core": femtogpt.build_info().get("core")}


PHASES = ("forward", "backward", "optimizer")


def measure_profiles(args, run_worker):
    """{preset: {dtype: worker result}}, each in its own process."""
    out = {}
    steps = 2 if args.quick else 5
    for name in args.presets:
        cfg = preset_cfg(name)
        for dtype in ("fp32", "bf16"):
            log(f"profile {name} {dtype}")
            spec = {"task": "profile", "impl": "femtogpt", "threads": args.threads,
                    "cfg": cfg, "dtype": dtype, "steps": steps, "warmup": 1,
                    "lrs": schedule(name, 8)}
            out.setdefault(name, {})[dtype] = run_worker(spec)
    return out


def profile_table(profiles, threads):
    """The Markdown tables: one per preset, fp32 and bf16 side by side."""
    flags, vendor, ghz = cpu_flags()
    measured = measured_clock_ghz()
    source = "/proc/cpuinfo"
    if measured:
        ghz, source = measured, "measured"
    roofs = roofs_per_cycle(flags, vendor)
    lines = [f"### Where the time goes (per training step, {threads} threads)", ""]
    roof_text = ", ".join(f"{k} {v * threads * ghz:,.0f} GFLOP/s" for k, v in roofs.items())
    lines.append(f"Roofs at {ghz:.2f} GHz ({source}) x {threads} cores: {roof_text}.")
    lines.append("")
    for name, by_dtype in profiles.items():
        results = {d: r for d, r in by_dtype.items() if "rows" in r}
        if not results:
            lines.append(f"{name}: the profile failed ({by_dtype})")
            continue
        paths = {d: (r.get("bf16_path") if d == "bf16" else "fp32") for d, r in results.items()}
        lines.append(f"**{name}** (bf16 path: {paths.get('bf16', '—')})")
        lines.append("")
        lines.append("| phase | op | fp32 ms | fp32 GFLOP/s | bf16 ms | bf16 GFLOP/s (% of roof) |")
        lines.append("|---|---|---|---|---|---|")
        keyed = {}
        for dtype, r in results.items():
            for row in r["rows"]:
                keyed.setdefault((row["phase"], row["op"]), {})[dtype] = (row, r["steps"])
        totals = {d: 0.0 for d in results}
        for phase in PHASES:
            for (ph, op), cells in sorted(keyed.items(), key=lambda kv: -max(
                    c[0]["seconds"] / c[1] for c in kv[1].values())):
                if ph != phase:
                    continue
                out = [phase, op]
                for dtype in ("fp32", "bf16"):
                    if dtype not in cells:
                        out += ["—", "—"]
                        continue
                    row, steps = cells[dtype]
                    ms = row["seconds"] / steps * 1e3
                    totals[dtype] += ms
                    gf = row["flops"] / row["seconds"] / 1e9 if row["flops"] and row["seconds"] else None
                    roof = roofs.get("fp32" if dtype == "fp32" else paths.get("bf16"), 0)
                    roof_gf = roof * threads * ghz
                    if gf is None:
                        gtext = "—"
                    elif dtype == "bf16" and roof_gf:
                        gtext = f"{gf:,.1f} ({100 * gf / roof_gf:.0f}%)"
                    else:
                        gtext = f"{gf:,.1f}" + (f" ({100 * gf / roof_gf:.0f}%)" if roof_gf else "")
                    out += [f"{ms:.2f}", gtext]
                lines.append("| " + " | ".join(out) + " |")
        lines.append(f"| all | total | {totals.get('fp32', 0):.1f} | | "
                     f"{totals.get('bf16', 0):.1f} | |")
        lines.append("")
    return "\n".join(lines)
