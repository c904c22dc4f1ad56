"""Time the q8 GEMM (femtogpt/kernels/gemm_q8.h through the core's
py_q8_* wrappers) on GPT-2 124M's shapes, beside the bf16 GEMM
(gemm_bf16_packed, built alone by gemm_bf16_lib) on the same shapes.

    python scripts/gemm_q8_probe.py [--reps 7] [--threads 1,2] [--paths vnni,portable]

Per shape (out = x @ W^T, W (N, K)), M = 1 (a decode step) and M = 256 (a
prompt pass), for 1 and 2 threads: the median time of --reps runs, GFLOP/s
(2 M N K per product) and GB/s of packed weight read (q8_weight_bytes: ~1.0625
bytes per weight). At M = 1 the product runs over enough copies of the weight
laid end to end (>= 160 MB, five times this L3) that every copy comes from
memory, as in a real decode, where the 124M model's weights are ~131 MB.
bf16 runs the same M = 256 products (one thread; two threads take halves of
the column panels, through ctypes, which lets go of the GIL).
"""
import argparse
import os
import sys
import threading

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from femtogpt import _core  # noqa: E402
import femtogpt  # noqa: E402
from bench_common import cpu_name, median_time  # noqa: E402

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768), (768, 50257)]  # (K, N)
STREAM_BYTES = 160 << 20




def bf16_timer(K, N, M, rng):
    """A function timing gemm_bf16_packed on (M, K) @ (N, K)^T at t threads, or None."""
    try:
        import gemm_bf16_lib
        import tempfile
        lib = gemm_bf16_lib.build(tempfile.mkdtemp(prefix="q8probe"), "x86-64-v4")
    except Exception as err:  # noqa: BLE001
        print(f"(bf16 not timed: {err})")
        return None
    W = rng.standard_normal((N, K)).astype(np.float32)
    x = rng.standard_normal((M, K)).astype(np.float32)
    Bp = lib.pack_b(W, 1, N, K)
    C = np.zeros((M, N), np.float32)
    half = (N // 2 + 31) // 32 * 32
    Kp = (K + 31) // 32 * 32
    scratch = [np.zeros(lib.so.probe_scratch_size(M, N, K, 1), np.uint8) for _ in range(2)]

    def part(i):
        n0, n1 = (0, half) if i == 0 else (half, N)
        lib.so.probe_gemm_packed(0, M, n1 - n0, K, 1.0, x.ctypes.data_as(gemm_bf16_lib.F32P), K,
                                 Bp[n0 * Kp:].ctypes.data_as(gemm_bf16_lib.U16P), 0.0,
                                 C[:, n0:].ctypes.data_as(gemm_bf16_lib.F32P), N,
                                 scratch[i].ctypes.data)

    def run(threads, reps):
        if threads == 1:
            return median_time(lambda: lib.gemm_packed(0, M, N, K, 1.0, x, Bp, 0.0, C), reps)

        def both():
            ts = [threading.Thread(target=part, args=(i,)) for i in range(2)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        return median_time(both, reps)
    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--paths", default=",".join(p for p in ("vnni",) if p in _core.int8_paths_available()) or "portable")
    ap.add_argument("--ms", default="1,256")
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    ms = [int(m) for m in args.ms.split(",")]
    rng = np.random.default_rng(0)
    print(f"{cpu_name()}; core {femtogpt.build_info()['core']}; int8 paths {_core.int8_paths_available()}; "
          f"median of {args.reps}")
    print(f"{'path':9} {'M':>4} {'K':>5} {'N':>6} {'thr':>3} {'ms':>9} {'GFLOP/s':>8} {'GB/s':>6}"
          f" {'bf16 ms':>8} {'bf16 GF/s':>9}")
    for path in args.paths.split(","):
        _core.set_int8_path(path)
        for K, N in SHAPES:
            wbytes = _core.py_q8_weight_bytes(N, K)
            W = (rng.standard_normal((N, K)) * 0.02).astype(np.float32).ravel()
            one = _core.py_q8_pack(W, N, K)
            for M in ms:
                copies = max(1, -(-STREAM_BYTES // wbytes)) if M == 1 else 1
                packed = np.tile(one, copies) if copies > 1 else one
                x = rng.standard_normal(M * K).astype(np.float32)
                out = np.empty(M * N, np.float32)
                bf = None if (args.no_bf16 or M == 1) else bf16_timer(K, N, M, rng)
                for t in threads:
                    _core.set_num_threads(t)
                    reps = args.reps if path != "portable" or M == 1 else max(1, args.reps // 3)
                    sec = median_time(lambda: _core.py_q8_matmul_copies(out, x, packed, copies, M, K, N),
                                      reps) / copies
                    line = (f"{path:9} {M:4d} {K:5d} {N:6d} {t:3d} {sec * 1e3:9.4f} "
                            f"{2 * M * N * K / sec / 1e9:8.1f} {wbytes / sec / 1e9:6.1f}")
                    if bf is not None:
                        bsec = bf(t, args.reps)
                        line += f" {bsec * 1e3:8.3f} {2 * M * N * K / bsec / 1e9:9.1f}"
                    print(line, flush=True)
                del packed
    _core.set_int8_path("auto")


if __name__ == "__main__":
    main()
