"""Check and time gemm_bf16_rows (femtogpt/kernels/gemm_bf16_rows.h): the bf16
product of a handful of rows over the GEMM's packed B, for batch-1 decoding.

    python scripts/bf16_rows_probe.py            # checks, then timings
    python scripts/bf16_rows_probe.py --check    # checks only
    python scripts/bf16_rows_probe.py --time --reps 9
    python scripts/bf16_rows_probe.py --time --sweep   # M = 1..16 against the GEMM

The checks build the header alone with gcc (as scripts/gemm_bf16_probe.py
does, at each x86-64 level) and compare gemm_bf16_rows with gemm_bf16_packed
bit for bit on every path this CPU runs, and with float64 on the bf16 inputs.
The timings run GPT-2 124M's decoding products (K=768: N=2304, 768, 3072,
50257; K=3072: N=768) at M=1 and M=4 through the compiled core at 1 and 2
threads (bf16_matmul_packed, which takes this kernel for few rows), beside
the core's fp32 matvec_forward (today's decoding product) and the GEMM
(gemm_bf16_parallel) at M=1. Weights are cycled over enough copies to
exceed the L3 cache, so each call reads them from memory as decoding does.
tests/test_bf16_rows.py runs the checks.
"""
import argparse
import ctypes
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cpu_name, median_time  # noqa: E402
from gemm_bf16_lib import (AMX, AVX512BF16, CFLAGS, F32P, KERNELS, LEVELS, PATH_NAMES,  # noqa: E402,F401
                           PORTABLE, U16P, WRAPPER, BuildError, Lib, bf16_value, find_cc,
                           reference_f64)

ROWS_WRAPPER = WRAPPER + r"""
int probe_rows_max(void) { return GEMM_BF16_ROWS_MAX; }
size_t probe_rows_scratch_size(int M, int K) { return gemm_bf16_rows_scratch_size(M, K); }
void probe_rows(int M, int N, int K, float alpha, const float* A, int lda, const uint16_t* Bp,
                float beta, float* C, int ldc, void* scratch)
{ gemm_bf16_rows(M, N, K, alpha, A, lda, Bp, beta, C, ldc, scratch); }
"""


class RowsLib(Lib):
    """gemm_bf16_lib.Lib plus gemm_bf16_rows."""

    def __init__(self, path, level):
        super().__init__(path, level)
        i, f, sz, vp = ctypes.c_int, ctypes.c_float, ctypes.c_size_t, ctypes.c_void_p
        s = self.so
        s.probe_rows_max.restype, s.probe_rows_max.argtypes = i, []
        s.probe_rows_scratch_size.restype, s.probe_rows_scratch_size.argtypes = sz, [i, i]
        s.probe_rows.restype = None
        s.probe_rows.argtypes = [i, i, i, f, F32P, i, U16P, f, F32P, i, vp]
        self.rows_max = s.probe_rows_max()

    def rows(self, M, N, K, alpha, A, Bp, beta, C, lda=None, ldc=None):
        """C (in place) = alpha A @ packed op(B) + beta C, by gemm_bf16_rows."""
        lda = A.shape[1] if lda is None else lda
        ldc = C.shape[1] if ldc is None else ldc
        scratch = np.zeros(self.so.probe_rows_scratch_size(M, K), np.uint8)
        self.so.probe_rows(M, N, K, alpha, A.ctypes.data_as(F32P), lda, Bp.ctypes.data_as(U16P),
                           beta, C.ctypes.data_as(F32P), ldc, scratch.ctypes.data_as(ctypes.c_void_p))


def build(outdir, level=None, cc=None, defines=()):
    """Compile the header with the wrappers into outdir; returns a RowsLib.
    `defines`: extra -D flags (e.g. GEMM_BF16_ROWS_PREFETCH=8, to time it)."""
    cc = cc or find_cc()
    if cc is None:
        raise BuildError("no C compiler (gcc or cc) found")
    tag = (level or "plain").replace("-", "_") + "".join("_" + d.replace("=", "") for d in defines)
    src = os.path.join(outdir, f"bf16_rows_{tag}.c")
    so = os.path.join(outdir, f"bf16_rows_{tag}.so")
    with open(src, "w") as f:
        f.write(ROWS_WRAPPER)
    cmd = [cc, *CFLAGS, *([f"-march={level}"] if level else []), *[f"-D{d}" for d in defines],
           "-I", os.path.abspath(KERNELS), src, "-o", so, "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return RowsLib(so, level)


# ---------------------------------------------------------------------------
# Checks (each raises AssertionError with what differs)
# ---------------------------------------------------------------------------

# 256 and 291: enough whole panels of 32 for the runs of one row (4 runs of
# 2, then for 291 one whole panel and a partial one left over) and of more rows
NS = [1, 31, 33, 50, 100, 256, 291]
KS = [1, 7, 33, 100, 768]


def compare_rows_with_gemm(lib, M, N, K, alpha=1.0, beta=0.0, pad=0, seed=0):
    """gemm_bf16_rows and gemm_bf16_packed on the same A, packed B and C:
    every element bit for bit, ldc padding untouched, and within the float64
    bound. C starts as NaN where beta == 0 (neither reads it then)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((M, K + pad)).astype(np.float32)
    W = rng.standard_normal((N, K)).astype(np.float32)   # op(B) = W^T: the "wt" layout
    Bp = lib.pack_b(W, 1, N, K)
    ldc = N + pad + 1
    C0 = rng.standard_normal((M, ldc)).astype(np.float32)
    if beta == 0:
        C0[:, :N] = np.nan
    got, want = C0.copy(), C0.copy()
    lib.rows(M, N, K, alpha, A, Bp, beta, got)
    lib.gemm_packed(0, M, N, K, alpha, A, Bp, beta, want)
    where = f"[{lib.level}] M={M} N={N} K={K} alpha={alpha} beta={beta} pad={pad}"
    assert np.array_equal(got[:, N:], C0[:, N:]), f"{where}: wrote past N (into ldc padding)"
    diff = np.nonzero(got.view(np.uint32) != want.view(np.uint32))
    assert diff[0].size == 0, (f"{where}: {diff[0].size} elements differ from the GEMM, first at "
                               f"{(diff[0][0], diff[1][0])}: {got[diff[0][0], diff[1][0]]!r} "
                               f"vs {want[diff[0][0], diff[1][0]]!r}")
    ref, tol = reference_f64(0, 1, M, N, K, alpha, A, W, beta, C0)
    err = np.abs(got[:, :N] - ref)
    assert (err <= tol).all(), f"{where}: max error {err.max():.3g} beyond the float64 bound"
    return got


def check_rows(lib, path, quick=False):
    """gemm_bf16_rows == gemm_bf16_packed bit for bit on `path` for M = 1 ..
    rows_max + 2 (and 12, 13, 17: several row blocks), the tails of NS x KS,
    beta 0 and 1 (a bias), and general alpha/beta. Returns products checked."""
    lib.force(path)
    n = 0
    try:
        ms = list(range(1, lib.rows_max + 3)) + ([] if quick else [12, 13, 17])
        for M in ms:
            for i, N in enumerate(NS):
                for j, K in enumerate(KS):
                    beta = float((i + j + M) % 2)
                    compare_rows_with_gemm(lib, M, N, K, beta=beta, pad=(i + j) % 3, seed=M * 100 + i * 10 + j)
                    n += 1
            compare_rows_with_gemm(lib, M, 300, 3072, beta=1.0, seed=M)   # many panels: the groups' tails
            compare_rows_with_gemm(lib, M, 77, 51, alpha=0.37, beta=1.25, pad=2, seed=M + 1)
            compare_rows_with_gemm(lib, M, 45, 33, alpha=-2.0, beta=-0.75, seed=M + 2)
            n += 3
    finally:
        lib.force(0)
    return n


def check_rows_edges(lib, path):
    """NaN and inf reach exactly their row and column, bf16 denormals count as
    zero, alpha == 0 reads neither A nor B, MXCSR is restored."""
    lib.force(path)
    try:
        csr = lib.so.probe_mxcsr()
        M, N, K = 3, 40, 9
        A = np.ones((M, K), np.float32)
        W = np.ones((N, K), np.float32)
        A[1, 4] = np.nan
        W[3, 6] = np.inf
        C = np.zeros((M, N), np.float32)
        lib.rows(M, N, K, 1.0, A, lib.pack_b(W, 1, N, K), 0.0, C)
        assert np.isnan(C[1]).all() and np.isinf(np.delete(C[:, 3], 1)).all()
        mask = np.ones((M, N), bool)
        mask[1] = False
        mask[:, 3] = False
        assert (C[mask] == K).all()
        assert lib.so.probe_mxcsr() == csr, "MXCSR not restored"
        A = np.full((M, K), 2.0 ** -130, np.float32)   # a denormal: read as zero
        W = np.full((N, K), 2.0 ** 100, np.float32)
        C = np.ones((M, N), np.float32)
        lib.rows(M, N, K, 1.0, A, lib.pack_b(W, 1, N, K), 0.0, C)
        assert (C == 0).all(), f"bf16 denormal not read as zero: {C[0, 0]!r}"
        A[:] = np.nan
        C = np.full((M, N), 3.0, np.float32)
        lib.rows(M, N, K, 0.0, A, lib.pack_b(W, 1, N, K), 0.5, C)
        assert (C == 1.5).all()
    finally:
        lib.force(0)


def check_rows_same_bits(lib, paths):
    """Every path but AMX gives the same bits (the rows kernel has no AMX code)."""
    outs = []
    for path in paths:
        lib.force(path)
        try:
            res = []
            for M, N, K in [(1, 2304, 768), (4, 100, 3072), (7, 333, 101)]:
                rng = np.random.default_rng(M)
                A = rng.standard_normal((M, K)).astype(np.float32)
                W = rng.standard_normal((N, K)).astype(np.float32)
                C = rng.standard_normal((M, N)).astype(np.float32)
                lib.rows(M, N, K, 1.0, A, lib.pack_b(W, 1, N, K), 1.0, C)
                res.append(C)
            outs.append(res)
        finally:
            lib.force(0)
    for path, res in zip(paths[1:], outs[1:]):
        for x, y in zip(outs[0], res):
            assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), \
                f"{PATH_NAMES[path]} differs from {PATH_NAMES[paths[0]]} in bits"


def run_checks(libs, out=print):
    for lib in libs:
        paths = [p for p in (PORTABLE, AVX512BF16) if lib.available(p)]
        for path in paths:
            t = time.perf_counter()
            n = check_rows(lib, path)
            check_rows_edges(lib, path)
            out(f"[{lib.level}] {PATH_NAMES[path]}: gemm_bf16_rows == gemm_bf16_packed bit for bit "
                f"in {n} products; edge cases ok ({time.perf_counter() - t:.1f} s)")
        if len(paths) > 1:
            check_rows_same_bits(lib, paths)
            out(f"[{lib.level}] {' = '.join(PATH_NAMES[p] for p in paths)}: bit-identical")
        if lib.available(AMX):
            out(f"[{lib.level}] amx: the GEMM sums in tdpbf16ps's order; rows runs AVX512_BF16 (not compared)")


# ---------------------------------------------------------------------------
# Timings
# ---------------------------------------------------------------------------

SHAPES = [("qkv", 768, 2304), ("attproj", 768, 768), ("fc", 768, 3072), ("fcproj", 3072, 768),
          ("lm_head", 768, 50257)]


def copies_for(nbytes, cache=64 << 20):
    """Copies of a weight to cycle through so that one cycle exceeds twice the L3."""
    return max(1, -(-cache // nbytes))


def sweep(lib, reps, out=print):
    """One thread, through the header: gemm_bf16_rows against gemm_bf16_packed
    for M = 1..16 on qkv's and fcproj's shapes (weights cycled past the L3):
    where the GEMM catches up is where the front switches."""
    lib.force(AVX512BF16 if lib.available(AVX512BF16) else PORTABLE)
    rng = np.random.default_rng(0)
    out(f"sweep, one thread, -march={lib.level}: microseconds per product (median of {reps}); "
        f"weights cycled past the L3")
    for name, K, N in [("qkv", 768, 2304), ("fcproj", 3072, 768)]:
        W = rng.standard_normal((N, K)).astype(np.float32)
        Bp = lib.pack_b(W, 1, N, K)
        packs = [Bp.copy() for _ in range(copies_for(Bp.nbytes))]
        out(f"{name} K={K} N={N}: {'M':>3s} {'rows':>8s} {'gemm':>8s}")
        for M in range(1, 17):
            A = rng.standard_normal((M, K)).astype(np.float32)
            C = np.zeros((M, N), np.float32)
            it = [0]

            def call(fn):
                it[0] = (it[0] + 1) % len(packs)
                fn(packs[it[0]])
            t_rows = median_time(lambda: call(lambda P: lib.rows(M, N, K, 1.0, A, P, 0.0, C)), reps)
            t_gemm = median_time(lambda: call(lambda P: lib.gemm_packed(0, M, N, K, 1.0, A, P, 0.0, C)), reps)
            out(f"{'':{len(name) + 18}s}{M:3d} {t_rows * 1e6:8.1f} {t_gemm * 1e6:8.1f}")
    lib.force(0)


def run_timings(reps, out=print):
    """Through the compiled core at 1 and 2 threads (femtogpt.set_num_threads):
    this checkout's femtogpt, not an installed one."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import femtogpt
    from femtogpt import _core as core

    saved = femtogpt.get_num_threads()
    path = core.bf16_path()
    out(f"CPU: {cpu_name()}; core build {core.TARGET}; bf16 path {path}; median of {reps} runs, "
        f"weights cycled over copies past 64 MB (read from memory, as in decoding); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work slows the 2-thread runs)")
    out("GB/s = weight bytes read / time (bf16: 2 B per weight, fp32: 4 B); "
        "GFLOP/s = 2 M N K / time")
    out(f"{'shape':8s} {'K':>5s} {'N':>6s} {'thr':>3s} | {'fp32 matvec M=1':>16s} | "
        f"{'gemm M=1':>16s} | {'rows M=1':>16s} | {'rows M=4':>16s} | {'matvec M=4':>16s}")
    out(f"{'':8s} {'':5s} {'':6s} {'':3s} |" + " |".join([f"{'us':>6s} {'GB/s':>5s} {'GF/s':>4s}"] * 5))
    rng = np.random.default_rng(0)
    rows = []
    try:
        for name, K, N in SHAPES:
            W = rng.standard_normal((N, K)).astype(np.float32)
            wt = np.empty(core.py_bf16_packed_size(N, K), np.uint16)
            core.py_bf16_pack_wt(wt, W.ravel(), N, K)
            n16 = copies_for(wt.nbytes)
            packs = [wt.copy() for _ in range(n16)]
            n32 = copies_for(W.nbytes)
            fp32s = [W.ravel().copy() for _ in range(n32)]
            del W
            for threads in (1, 2):
                femtogpt.set_num_threads(threads)
                res = []
                for kind, M in (("matvec", 1), ("gemm", 1), ("rows", 1), ("rows", 4), ("matvec", 4)):
                    inp = rng.standard_normal(M * K).astype(np.float32)
                    outv = np.zeros(M * N, np.float32)
                    it = [0]
                    if kind == "matvec":
                        def fn():
                            it[0] = (it[0] + 1) % n32
                            core.py_matvec_forward(outv, inp, fp32s[it[0]], None, M, K, N)
                        wbytes = 4 * N * K
                    else:
                        ker = "gemm" if kind == "gemm" else "auto"

                        def fn():
                            it[0] = (it[0] + 1) % n16
                            core.py_bf16_matmul_packed(outv, inp, None, M, K, N, packs[it[0]], kernel=ker)
                        wbytes = 2 * N * K
                    t = median_time(fn, reps)
                    res.append((t, wbytes / t / 1e9, 2.0 * M * N * K / t / 1e9))
                out(f"{name:8s} {K:5d} {N:6d} {threads:3d} |" +
                    " |".join(f"{t * 1e6:6.0f} {gb:5.1f} {gf:4.0f}" for t, gb, gf in res))
                rows.append((name, K, N, threads, res))
            del packs, fp32s
    finally:
        femtogpt.set_num_threads(saved)
    for threads in (1, 2):
        tot = [sum(r[4][i][0] for r in rows if r[3] == threads) for i in range(5)]
        out(f"all five, {threads} thread(s): fp32 matvec {tot[0] * 1e3:.2f} ms, gemm M=1 {tot[1] * 1e3:.2f} ms, "
            f"rows M=1 {tot[2] * 1e3:.2f} ms, rows M=4 {tot[3] * 1e3:.2f} ms, matvec M=4 {tot[4] * 1e3:.2f} ms")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the checks only")
    ap.add_argument("--time", action="store_true", help="run the timings only")
    ap.add_argument("--sweep", action="store_true", help="with --time: M = 1..16, rows against the GEMM, one thread")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--level", default="x86-64-v4", help="-march of the swept build")
    ap.add_argument("--define", action="append", default=[],
                    help="with --sweep: a -D for the header, e.g. GEMM_BF16_ROWS_PREFETCH=8")
    args = ap.parse_args(argv)
    both = not args.check and not args.time
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        if args.check or both:
            run_checks([build(tmp, level) for level in LEVELS])
        if args.time and args.sweep:
            sweep(build(tmp, args.level if LEVELS != [None] else None, defines=args.define), args.reps)
        elif args.time or both:
            run_timings(args.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
