"""How fast this machine reads memory: the ceiling of batch-1 decoding.

    python scripts/memory_bandwidth.py                  # 1 and 2 threads
    python scripts/memory_bandwidth.py --threads 1,2,4 --mib 2048 --reps 9

A decode step reads every weight once, two flops per weight, so its speed is
bytes of weights per token x tokens per second, and that cannot pass what the
cores can stream from memory. This measures that: a buffer several times the
last-level cache, first touched (page faults outside the clock), then summed
with t threads, each reading one contiguous part in order with eight
independent accumulators (so the adds never wait on each other), in 256-bit
vectors; GB/s = bytes / the median time of the passes. It is a plain read:
no writes, no prefetch hints, the same access a weight stream has.

scripts/bench.py --vs-llama-cpp runs it beside each round and turns it into
tokens per second: ceiling tok/s = GB/s / the bytes a decode step streams.
The C is built with gcc at -O2 for the machine it runs on (as the kernel
probes are), in a temporary folder.
"""
import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_name  # noqa: E402
from gemm_bf16_lib import find_cc  # noqa: E402

SOURCE = r"""
#include <stddef.h>
#include <string.h>
#include <omp.h>

typedef float v8 __attribute__((vector_size(32)));

/* Sum of n floats (n a multiple of 64) with eight accumulators. */
static float read_part(const float* p, size_t n)
{
    v8 a[8] = {{0}};
    for (size_t i = 0; i < n; i += 64)
        for (int j = 0; j < 8; j++) {
            v8 x;
            memcpy(&x, p + i + 8 * j, sizeof x);
            a[j] += x;
        }
    for (int j = 1; j < 8; j++)
        a[0] += a[j];
    float s = 0;
    for (int l = 0; l < 8; l++)
        s += a[0][l];
    return s;
}

/* Each of `threads` threads reads its contiguous n / threads floats; returns
 * the sum so that the reads cannot be optimised away. */
float read_all(const float* p, size_t n, int threads)
{
    float total = 0;
    size_t part = n / (size_t)threads / 64 * 64;
    #pragma omp parallel num_threads(threads) reduction(+:total)
    total += read_part(p + (size_t)omp_get_thread_num() * part, part);
    return total;
}

/* Touch every page with `threads` threads, the same parts read_all reads. */
void touch_all(float* p, size_t n, int threads)
{
    size_t part = n / (size_t)threads / 64 * 64;
    #pragma omp parallel num_threads(threads)
    {
        float* q = p + (size_t)omp_get_thread_num() * part;
        for (size_t i = 0; i < part; i++)
            q[i] = 1.0f;
    }
}
"""


class Reader:
    """The compiled reader (a shared library in a temporary folder)."""

    def __init__(self):
        cc = find_cc()
        if cc is None:
            raise RuntimeError("no C compiler (gcc or cc) to build the reader")
        self._tmp = tempfile.TemporaryDirectory(prefix="femtogpt-bandwidth-")
        src = os.path.join(self._tmp.name, "read.c")
        lib = os.path.join(self._tmp.name, "read.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run([cc, "-O2", "-march=native", "-fopenmp", "-fPIC", "-shared", src,
                        "-o", lib], check=True, capture_output=True)
        self.so = ctypes.CDLL(lib)
        fp = ctypes.POINTER(ctypes.c_float)
        self.so.read_all.restype = ctypes.c_float
        self.so.read_all.argtypes = [fp, ctypes.c_size_t, ctypes.c_int]
        self.so.touch_all.restype = None
        self.so.touch_all.argtypes = [fp, ctypes.c_size_t, ctypes.c_int]


def read_bandwidth(threads, mib=1024, reps=7, reader=None):
    """{"threads", "gb_s" (median), "min", "max", "mib", "reps"}: GB/s (1e9
    bytes) of `threads` threads reading a mib-MiB buffer, median of reps passes."""
    import numpy as np
    reader = reader or Reader()
    n = mib * (1 << 20) // 4 // (64 * threads) * (64 * threads)
    buf = np.empty(n, dtype=np.float32)
    ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    reader.so.touch_all(ptr, n, threads)
    reader.so.read_all(ptr, n, threads)          # warm: TLB, frequency
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        reader.so.read_all(ptr, n, threads)
        rates.append(n * 4 / (time.perf_counter() - t0) / 1e9)
    return {"threads": threads, "gb_s": statistics.median(rates), "min": min(rates),
            "max": max(rates), "mib": mib, "reps": reps}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    ap.add_argument("--mib", type=int, default=1024, help="buffer size in MiB (default 1024)")
    ap.add_argument("--reps", type=int, default=7, help="timed passes (default 7)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON list of read_bandwidth's dicts instead")
    args = ap.parse_args(argv)
    reader = Reader()
    if args.json:
        print(json.dumps([read_bandwidth(int(t), args.mib, args.reps, reader)
                          for t in args.threads.split(",")]))
        return
    print(f"memory read bandwidth, {cpu_name()}, {args.mib} MiB buffer, median of {args.reps}")
    for t in (int(x) for x in args.threads.split(",")):
        r = read_bandwidth(t, args.mib, args.reps, reader)
        print(f"  {t} thread(s): {r['gb_s']:.1f} GB/s ({r['min']:.1f}-{r['max']:.1f})")


if __name__ == "__main__":
    main()
