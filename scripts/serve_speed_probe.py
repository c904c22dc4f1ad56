"""Does the playground stream as fast as `femtogpt sample`? (issue #23)

    python scripts/serve_speed_probe.py MODEL [--dtype int8] [--tokens 200] [--rounds 5]

Starts `femtogpt serve --out MODEL --dtype D` (a run folder, checkpoint or
Hugging Face GPT-2 folder) as its own process, asks it for a greedy sample
over HTTP as the page does (POST /api/runs/0/sample, server-sent events),
and times the stream from its first piece of text to its end. Beside it,
alternated, `femtogpt sample --out MODEL --dtype D --stats` as its own
process, the same prompt and length, whose decode rate --stats prints. Each
program is what a user runs: nothing shares a process with the probe (an
OpenMP pool of another thread in the server's process is what made it slow
before, see app/serve.py's in_a_thread_of_its_own). Prints both medians in
tokens/s and their ratio, with the CPU named.
"""
import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import time

import numpy as np

from bench_common import cpu_name


def serve_rate(port, prompt, tokens):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_new_tokens": tokens, "temperature": 0,
                       "seed": 1})
    conn.request("POST", "/api/runs/0/sample", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    pieces = 0
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if line.startswith("event: done"):
            break
        if line.startswith("data:"):
            pieces += 1
            if pieces == 2:            # the prompt comes first, then the tokens
                first = time.perf_counter()
    end = time.perf_counter()
    conn.close()
    return (tokens - 1) / (end - first)


def start_server(model, dtype, threads):
    """(process, port) of `femtogpt serve` on a free port, once it listens."""
    cmd = [sys.executable, "-m", "femtogpt", "serve", "--out", model, "--dtype", dtype,
           "--port", "0"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        found = re.search(r"http://[^:]+:(\d+)", line)
        if found:
            return proc, int(found.group(1))
    proc.wait()
    sys.exit(f"femtogpt serve did not start (exit {proc.returncode})")


def cli_rate(model, dtype, prompt, tokens, threads):
    cmd = [sys.executable, "-m", "femtogpt", "sample", "--out", model, "--dtype", dtype,
           "--stats", "--prompt", prompt, "--max-new-tokens", str(tokens), "--temperature", "0",
           "--seed", "1"] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"decode: (\d+) tokens in ([\d.]+) s", proc.stderr)
    if proc.returncode != 0 or not found:
        sys.exit(f"femtogpt sample failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    return int(found.group(1)) / float(found.group(2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", default="The")
    ap.add_argument("--threads", type=int, default=0, help="both programs' --threads (0: default)")
    args = ap.parse_args()
    import femtogpt
    server, port = start_server(args.model, args.dtype, args.threads)
    try:
        serve_rate(port, args.prompt, 8)                 # warm: the first request
        served, cli = [], []
        for _ in range(args.rounds):
            served.append(serve_rate(port, args.prompt, args.tokens))
            cli.append(cli_rate(args.model, args.dtype, args.prompt, args.tokens, args.threads))
    finally:
        server.terminate()
        server.wait()
    s, c = statistics.median(served), statistics.median(cli)
    threads = args.threads or femtogpt.get_num_threads()
    print(f"{cpu_name()}, {threads} threads, dtype {args.dtype}, "
          f"{args.tokens} greedy tokens, {args.rounds} alternated rounds:")
    print(f"  playground (HTTP stream) {s:,.1f} tok/s (min {min(served):,.1f}, max "
          f"{max(served):,.1f}); femtogpt sample {c:,.1f} tok/s (min {min(cli):,.1f}, max "
          f"{max(cli):,.1f}); playground / CLI {s / c:.2f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
