"""Does the playground stream as fast as `femtogpt sample`? (issue #23)

    python scripts/serve_speed_probe.py MODEL [--dtype int8] [--tokens 200] [--rounds 5]

Serves MODEL (a run folder, checkpoint or Hugging Face GPT-2 folder) with
`femtogpt serve --dtype D`'s server in this process, asks it for a greedy
sample over HTTP as the page does (POST /api/runs/0/sample, server-sent
events), and times the stream from its first piece of text to its end.
Beside it, alternated, the same sample from the CLI's code path
(stream_sample into a sink) on a model loaded at the same dtype. Prints both
medians in tokens/s and their ratio, with the CPU named.
"""
import argparse
import http.client
import io
import json
import statistics
import sys
import threading
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


class _Sink(io.StringIO):
    def __init__(self):
        super().__init__()
        self.first = None

    def write(self, text):
        if self.first is None and self.tell() > 0:
            self.first = time.perf_counter()
        return super().write(text)


def cli_rate(model, tokenizer, prompt, tokens):
    from femtogpt.app.sample import stream_sample
    sink = _Sink()
    stream_sample(model, tokenizer, prompt, tokens, temperature=0, top_k=None, seed=1,
                  out=sink, end="")
    return (tokens - 1) / (time.perf_counter() - sink.first)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", default="The")
    args = ap.parse_args()
    import femtogpt
    from femtogpt.app.serve import make_server
    server = make_server([args.model], port=0, dtype=args.dtype)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    model, tokenizer = femtogpt.load(args.model, dtype=args.dtype)
    served, cli = [], []
    serve_rate(port, args.prompt, 8)                 # the server loads its model
    for _ in range(args.rounds):
        served.append(serve_rate(port, args.prompt, args.tokens))
        cli.append(cli_rate(model, tokenizer, args.prompt, args.tokens))
    server.stopping.set()
    server.shutdown()
    s, c = statistics.median(served), statistics.median(cli)
    print(f"{cpu_name()}, {femtogpt.get_num_threads()} threads, dtype {args.dtype}, "
          f"{args.tokens} greedy tokens, {args.rounds} alternated rounds:")
    print(f"  playground (HTTP stream) {s:,.1f} tok/s (min {min(served):,.1f}, max "
          f"{max(served):,.1f}); CLI code path {c:,.1f} tok/s (min {min(cli):,.1f}, max "
          f"{max(cli):,.1f}); playground / CLI {s / c:.2f}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main())
