"""scripts/bench.py's report: the Markdown table of every measurement."""


from bench_common import SAMPLE_PRESET, SAMPLE_TOKENS, SGEMM_N
from bench_e2e import NANOGPT_CPU_ARGS


def fmt(value, spec, missing="—"):
    return missing if value is None else format(value, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(x):
    return "—" if x is None else f"{x:.2f}×"


def build_table(res, args):
    """The Markdown report: one row per piece of work, femtogpt | PyTorch | ratio."""
    vs = args.vs_torch
    th = args.threads
    rows = []

    def row(work, f, t, r):
        rows.append(f"| {work} | {f} | {t if vs else '—'} | {r if vs else '—'} |")

    sg = res["sgemm"]
    row(f"sgemm peak, {SGEMM_N}³ float32, {th} threads (GFLOP/s; ratio numpy ÷ torch.mm)",
        f"{fmt(sg['numpy'], '.1f')} (numpy)", f"{fmt(sg.get('torch'), '.1f')} (torch.mm)",
        fmt(ratio(sg["numpy"], sg.get("torch")), ".2f"))
    for name, tr in res["train"].items():
        cells = {}
        for impl in ("femtogpt", "torch"):
            m = tr.get(impl)
            if not m or m.get("median_ms") is None:
                cells[impl] = "failed" if m else "—"
                continue
            cells[impl] = (f"{m['median_ms']:,.1f} ms, {m['tokens_per_s']:,.0f} tok/s, "
                           f"MFU {fmt(m['mfu'] and 100 * m['mfu'], '.1f')}%")
        c = tr["cfg"]
        row(f"train step {name} (B={c['batch_size']}, T={c['block_size']}, L={c['n_layer']}, "
            f"C={c['n_embd']}, dropout {c['dropout']:g})", cells["femtogpt"], cells["torch"],
            times(tr.get("speed_ratio")))
    sm = res["sample"]
    row(f"sampling {SAMPLE_PRESET}, batch 1, {SAMPLE_TOKENS} tokens (tok/s)",
        fmt(sm.get("femtogpt"), ",.0f") + " (KV cache)",
        fmt(sm.get("torch"), ",.0f") + " (nanoGPT: no cache)",
        times(ratio(sm.get("femtogpt"), sm.get("torch"))))
    for name, tr in res["train"].items():
        f, t = tr.get("femtogpt", {}), tr.get("torch", {})
        row(f"peak RSS training {name} (MB; above imports)",
            f"{fmt(f.get('peak_rss_mb'), ',.0f')} ({fmt(f.get('rss_above_imports_mb'), ',.0f')})",
            f"{fmt(t.get('peak_rss_mb'), ',.0f')} ({fmt(t.get('rss_above_imports_mb'), ',.0f')})",
            fmt(ratio(f.get("peak_rss_mb"), t.get("peak_rss_mb")), ".2f"))
    sc = res.get("scaling")
    if sc:
        row(f"{sc['preset']}: 1 → {th} threads speed-up",
            times(sc.get("femtogpt")), times(sc.get("torch")), "—")
    rk = res.get("ranks")
    if rk and not rk.get("skipped"):
        row(f"{rk['preset']}: 1 → {rk['ranks']} MPI ranks × 1 thread speed-up "
            f"({fmt(rk['one_rank_ms'], ',.0f')} → {fmt(rk['many_ranks_ms'], ',.0f')} ms/step)",
            times(rk.get("speedup")), "—", "—")
    ee = res.get("end_to_end")
    if ee:
        f, n = ee["femtogpt"], ee["nanogpt"]
        rows.append(f"| the default run end to end (wall s; val loss at step 2000) | "
                    f"{fmt(f['wall_s'], '.1f')} s; {fmt(f['val_loss'], '.4f')} | "
                    f"{fmt(n['wall_s'], '.1f')} s; {fmt(n['val_loss'], '.4f')} (nanoGPT) | "
                    f"{times(ratio(n['wall_s'], f['wall_s']))} |")
        rows.append(f"| peak RSS of the default run (MB) | {fmt(f['peak_rss_mb'], ',.0f')} | "
                    f"{fmt(n['peak_rss_mb'], ',.0f')} (nanoGPT) | "
                    f"{fmt(ratio(f['peak_rss_mb'], n['peak_rss_mb']), '.2f')} |")
    tk = res.get("tokenizer")
    if tk:
        rows.append(f"| GPT-2 tokenizer ({tk['vocab']:,} tokens) encoding Tiny Shakespeare x10 "
                    f"({tk['mb']:.1f} MB), MB/s, 1 thread ({th} threads) | "
                    f"{fmt(tk['femtogpt_1'], '.1f')} ({fmt(tk['femtogpt_all'], '.1f')}) | "
                    f"{fmt(tk['tokenizers_1'], '.1f')} (tokenizers, 1 thread) | "
                    f"{times(ratio(tk['femtogpt_1'], tk['tokenizers_1']))}; same ids: "
                    f"{'yes' if tk['same_ids'] else 'NO'} |")
    ck = res.get("check")
    if ck:
        for name, c in ck.items():
            if "error" in c:
                row(f"numerics {name}", "check failed to run", "", "")
                continue
            s = c["spread"]
            # No "|" inside a cell: it would split the Markdown table.
            row(f"numerics {name}: loss on the same O(1) weights and batch (B={c['batch_size']})",
                f"{s['loss_femtogpt']:.6f}", f"{s['loss_torch']:.6f}",
                f"Δloss {s['loss_abs_diff']:.1e}, Δgrad {s['max_grad_rel_err']:.1e} (rel): "
                f"{'OK' if c['ok'] else 'MISMATCH'}")

    m = res["machine"]
    steps = ", ".join(f"{p} {res['reps'][p]} steps" for p in res["train"])
    lines = [
        f"## femtogpt benchmark: {m['cpu_model']}, {m['nproc']} cores, {th} threads",
        "",
        "| work | femtogpt | PyTorch | ratio |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Ratios are femtogpt ÷ PyTorch: above 1 femtogpt is faster (speed) or uses "
        f"more memory (RSS)." if vs else "PyTorch not measured (add --vs-torch).",
        f"Each figure is the median over {args.rounds} round(s) of each worker's median "
        f"(training: {steps} after warm-up); femtogpt and PyTorch ran alternately in "
        f"separate processes. "
        f"The machine may be shared and noisy (load average "
        f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end): "
        f"quote the medians and the ratios, not single runs.",
        "MFU = (6·N + 12·L·C·T) flops per token × tokens/s ÷ the sgemm peak above "
        "(nanoGPT's estimate; N excludes the position embedding); both columns use the "
        "numpy peak" + (", the fp32 roof: bf16 products can exceed 100% of it (their own "
                        "roof is twice as high where the CPU has AVX512_BF16)."
                        if getattr(args, "dtype", "fp32") == "bf16" else "."),
        "Sampling: femtogpt uses its KV cache; nanoGPT's generate recomputes the "
        "whole window for every token, so that ratio compares methods, not kernels.",
    ]
    if ck:
        done = [c for c in ck.values() if "error" not in c]
        worst = lambda key: max((c[w][key] for c in done for w in ("init", "spread")),
                                default=float("nan"))           # noqa: E731
        lines.append(
            "Numerics, checked before timing with dropout off, at nanoGPT's init and at O(1) "
            f"random weights: worst loss difference {worst('loss_abs_diff'):.1e} (tolerance "
            f"1e-4), worst relative gradient error {worst('max_grad_rel_err'):.1e}, after one "
            f"AdamW step (lr 1e-3, clipping) worst parameter difference "
            f"{worst('max_param_diff_after_step_in_lr'):.1e}·lr and loss difference "
            f"{worst('loss_after_step_abs_diff'):.1e}.")
    if vs:
        lines.append("The PyTorch model is nanoGPT's, with each preset's biases and GELU "
                     "form (femto: biases, tanh; baby and small: nanoGPT's bias=False and "
                     "exact GELU); attention is "
                     "F.scaled_dot_product_attention(is_causal=True).")
    if ee:
        lines.append(
            f"End to end: `femtogpt train` (its default: the baby preset) and nanoGPT's "
            f"README CPU command (`{' '.join(NANOGPT_CPU_ARGS)}`), each a whole process from "
            f"start to exit, alternated over {len(ee['femtogpt']['runs'])} round(s); the "
            f"ratio is nanoGPT's wall time ÷ femtogpt's (above 1: femtogpt is faster).")
    lines += ["", f"Machine: {m['platform']}, Python {m['python']}, numpy {m['numpy']}, "
              f"scipy {m['scipy']}, torch {m['torch'] or 'not installed'}.",
              f"Command: `{res['command']}`"]
    return "\n".join(lines) + "\n"
