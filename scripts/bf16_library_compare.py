"""Our bf16 GEMM against a library's, on GPT-2 124M's products (issue #22).

    python scripts/bf16_library_compare.py [--threads 1,2] [--reps 7]

For each forward product of GPT-2 124M at B*T = 1024 rows (x @ W^T for
c_attn, attn.c_proj, c_fc, mlp.c_proj and the lm_head), the median time of
  femtogpt  the core's bf16 product over the packed weight (what a bf16
            training step runs: the weight packed once per optimizer step,
            the activation rounded and packed inside the call), fp32 out;
  torch     torch.matmul on bf16 tensors (what autocast runs: bf16 out),
            and on fp32 tensors (its sgemm), when PyTorch is installed;
  numpy     float32 x @ W.T (OpenBLAS sgemm).
GFLOP/s = 2*M*N*K / time. Alternated per shape, CPU named. PyTorch is a
measuring stick here, never a dependency.
"""
import argparse

import numpy as np

from bench_common import cpu_name, median_time

SHAPES = {"qkv": (768, 2304), "attproj": (768, 768), "fc": (768, 3072),
          "fcproj": (3072, 768), "lm_head": (768, 50257)}      # (K, N)
M = 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import femtogpt
    from femtogpt import _core
    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    print(f"{cpu_name()}; femtogpt bf16 path {_core.bf16_path()}; "
          f"torch {torch.__version__ if torch else 'not installed'}; M = {M} rows")
    print("| product (K x N) | threads | femtogpt bf16 | torch bf16 | torch fp32 | numpy fp32 |")
    print("|---|---|---|---|---|---|")
    for threads in [int(t) for t in args.threads.split(",")]:
        femtogpt.set_num_threads(threads)
        if torch:
            torch.set_num_threads(threads)
        for name, (K, N) in SHAPES.items():
            x = rng.standard_normal((M, K), dtype=np.float32)
            w = rng.standard_normal((N, K), dtype=np.float32) * 0.02
            packed = np.empty(_core.py_bf16_packed_size(N, K), np.uint16)
            _core.py_bf16_pack_wt(packed, w.ravel(), N, K)
            out = np.empty(M * N, np.float32)
            xf = x.ravel()
            flops = 2.0 * M * N * K
            cells = [median_time(lambda: _core.py_bf16_matmul_packed(out, xf, None, M, K, N, packed),
                           args.reps)]
            if torch:
                tx, tw = torch.from_numpy(x), torch.from_numpy(w)
                bx, bw = tx.to(torch.bfloat16), tw.to(torch.bfloat16)
                cells.append(median_time(lambda: torch.matmul(bx, bw.t()), args.reps))
                cells.append(median_time(lambda: torch.matmul(tx, tw.t()), args.reps))
            else:
                cells += [None, None]
            cells.append(median_time(lambda: x @ w.T, args.reps))
            text = [f"{t * 1e3:.2f} ms, {flops / t / 1e9:.0f} GFLOP/s" if t else "—"
                    for t in cells]
            print(f"| {name} ({K} x {N}) | {threads} | " + " | ".join(text) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
