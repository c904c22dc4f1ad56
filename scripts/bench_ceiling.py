"""The decode ceiling for scripts/bench.py --vs-llama-cpp: batch-1 decoding
reads every weight once per token, so its tokens/s cannot pass the memory's
read bandwidth / the bytes of weights a step reads. Each round of the
comparison measures the bandwidth (memory_bandwidth.py, in its own process);
this turns it into a ceiling per type and thread count, the share of it each
program reaches, and the highest ratio of the two it leaves.
"""
import json
import os
import statistics
import subprocess
import sys

# Bytes per weight of the linear layers, as both programs hold them: f32, bf16,
# and q8_0 / femtogpt's int8 (blocks of 32 int8 with one fp16 scale: 34 / 32).
BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "q8_0": 34 / 32}


def streamed_bytes(shape, gguf_type):
    """Bytes of weights one decode step reads: each block's four matrices
    (12 C^2) and the V x C lm_head, once, at the type. Left out: the embedding
    rows and LayerNorms (a few KB a step), the biases, and the KV cache (at
    GPT-2's shape 1.2 MB of fp32 per 16 positions), which both programs read too."""
    C, L, V = shape["n_embd"], shape["n_layer"], shape["vocab_size"]
    return (12 * C * C * L + V * C) * BYTES_PER_WEIGHT[gguf_type]


def measure_bandwidth(threads):
    """memory_bandwidth.py's read_bandwidth at this thread count, in its own
    process (its 1 GiB buffer must not raise this process's peak RSS, which
    the workers and llama-bench inherit until they exec), or {"error": why}."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory_bandwidth.py")
    proc = subprocess.run([sys.executable, script, "--threads", str(threads), "--mib", "1024",
                           "--reps", "5", "--json"], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS=str(threads)))
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"memory bandwidth not measured: {why}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])[0]


def ceiling_rows(res):
    """Per (type, threads): the decode ceiling and each program's share of it."""
    rows = []
    for r in res["rows"]:
        if not r["test"].startswith("tg"):
            continue
        bw = [b["gb_s"] for b in res["bandwidth"].get(str(r["threads"]), []) if "gb_s" in b]
        nbytes = streamed_bytes(res["shape"], r["type"])
        gb_s = statistics.median(bw) if bw else None
        ceiling = gb_s * 1e9 / nbytes if gb_s else None
        f = r["femtogpt"]["median"] if r["femtogpt"] else None
        ll = r["llama_cpp"]["median"] if r["llama_cpp"] else None
        rows.append({
            "type": r["type"], "femtogpt_dtype": r["femtogpt_dtype"], "threads": r["threads"],
            "streamed_mb": nbytes / 1e6, "read_gb_s": gb_s, "read_gb_s_rounds": bw,
            "ceiling_ts": ceiling,
            "femtogpt_gb_s": f * nbytes / 1e9 if f else None,
            "llama_gb_s": ll * nbytes / 1e9 if ll else None,
            "femtogpt_of_ceiling": f / ceiling if f and ceiling else None,
            "llama_of_ceiling": ll / ceiling if ll and ceiling else None,
            "most_ratio": ceiling / ll if ll and ceiling else None})
    return rows


def ceiling_table(res):
    """The report's lines for res["ceiling"] (none when it was not measured)."""
    if not res.get("ceiling"):
        return []
    pct = lambda x: "—" if x is None else f"{100 * x:.0f}%"       # noqa: E731
    num = lambda x, f="{:,.1f}": "—" if x is None else f.format(x)   # noqa: E731
    lines = ["", "Decode against the memory's ceiling (tokens/s cannot pass read "
             "bandwidth ÷ bytes of weights per token):", "",
             "| type | threads | weights read per token (MB) | memory read (GB/s) | "
             "ceiling (tok/s) | femtogpt: GB/s, share of ceiling | llama.cpp: GB/s, "
             "share | most femtogpt ÷ llama.cpp can reach |",
             "|---|---|---|---|---|---|---|---|"]
    for c in res["ceiling"]:
        lines.append(
            f"| {c['femtogpt_dtype']} ↔ {c['type']} | {c['threads']} | "
            f"{c['streamed_mb']:,.0f} | {num(c['read_gb_s'])} | {num(c['ceiling_ts'])} | "
            f"{num(c['femtogpt_gb_s'])}, {pct(c['femtogpt_of_ceiling'])} | "
            f"{num(c['llama_gb_s'])}, {pct(c['llama_of_ceiling'])} | "
            f"{num(c['most_ratio'], '{:.2f}×')} |")
    lines += sorted({b["error"] for v in res["bandwidth"].values() for b in v if "error" in b})
    return lines
