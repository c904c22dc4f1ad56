"""The bf16 GEMM header built alone, for scripts/gemm_bf16_probe.py and
tests/test_gemm_bf16.py: compiled with gcc into a small shared library (the
core's flags, once per x86-64 level), called through ctypes on numpy arrays;
and the numpy references its results are checked against (the bf16 rounding,
float64 on the bf16 inputs, the contract's summation order in float32, and
the order of the emulated AMX tiles).

Besides the core's builds there are test-only variants (VARIANTS): the
"amx-emulated" ones define FEMTOGPT_AMX_EMULATE, so that the AMX path runs
over gemm_bf16_amx_emulate.h's plain-C tiles on any x86-64 CPU, in the
SDM's summation order or (-guide) the Intrinsics Guide's.
"""
import ctypes
import os
import platform
import subprocess

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(HERE, "..", "femtogpt", "kernels")

PORTABLE, AVX512BF16, AMX = 1, 2, 3
PATH_NAMES = {PORTABLE: "portable", AVX512BF16: "avx512bf16", AMX: "amx"}

# setup.py's COMPILE_ARGS, so the probe times the code the core will run.
CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]

WRAPPER = r"""
#include "gemm_bf16.h"
#include <time.h>

int probe_force(int path) { return gemm_bf16_force(path); }
int probe_path(void) { return gemm_bf16_path(); }
int probe_available(int path) { return gemm_bf16_available(path); }
void probe_from_f32(uint16_t* out, const float* inp, size_t n) { bf16_from_f32(out, inp, n); }
void probe_to_f32(float* out, const uint16_t* inp, size_t n) { bf16_to_f32(out, inp, n); }
size_t probe_scratch_size(int M, int N, int K, int b_packed) { return gemm_bf16_scratch_size(M, N, K, b_packed); }
size_t probe_packed_b_size(int N, int K) { return gemm_bf16_packed_b_size(N, K); }
void probe_pack_b(uint16_t* packed, int trans_b, int N, int K, const float* B, int ldb)
{ gemm_bf16_pack_b(packed, trans_b, N, K, B, ldb); }
void probe_gemm(int ta, int tb, int M, int N, int K, float alpha, const float* A, int lda,
                const float* B, int ldb, float beta, float* C, int ldc, void* scratch)
{ gemm_bf16(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc, scratch); }
void probe_gemm_packed(int ta, int M, int N, int K, float alpha, const float* A, int lda,
                       const uint16_t* Bp, float beta, float* C, int ldc, void* scratch)
{ gemm_bf16_packed(ta, M, N, K, alpha, A, lda, Bp, beta, C, ldc, scratch); }
#if defined(FEMTOGPT_AMX_EMULATE) && defined(__x86_64__)
/* The emulated tiles (gemm_bf16_amx_emulate.h), for the tests. */
void probe_emu_reset(void) { memset(&gemm_bf16_emu, 0, sizeof gemm_bf16_emu); }
unsigned long probe_emu_faults(void) { return gemm_bf16_emu.faults; }
const char* probe_emu_fault(void) { return gemm_bf16_emu.fault; }
unsigned long probe_emu_count(int kind)
{ return kind >= 0 && kind < GEMM_BF16_EMU_KINDS ? gemm_bf16_emu.count[kind] : 0; }
int probe_emu_configured(void) { return gemm_bf16_emu.palette; }
int probe_emu_order(void) { return FEMTOGPT_AMX_EMULATE_ORDER; }

/* One tdpbf16ps on tiles of the caller's shape: tmm0 = C (m x n fp32), tmm1
 * = A (m rows of k bf16 pairs), tmm2 = B (k rows of n bf16 pairs), each with
 * its row stride in bytes; C is loaded, multiplied into, and stored back. */
void probe_emu_dp(int m, int k, int n, float* C, long ldc, const uint16_t* A, long lda,
                  const uint16_t* B, long ldb)
{
    struct gemm_bf16_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)m; cfg.colsb[0] = (uint16_t)(4 * n);
    cfg.rows[1] = (uint8_t)m; cfg.colsb[1] = (uint16_t)(4 * k);
    cfg.rows[2] = (uint8_t)k; cfg.colsb[2] = (uint16_t)(4 * n);
    _tile_loadconfig(&cfg);
    _tile_loadd(0, C, ldc);
    _tile_loadd(1, A, lda);
    _tile_loadd(2, B, ldb);
    _tile_dpbf16ps(0, 1, 2);
    _tile_stored(0, C, ldc);
    _tile_release();
}

/* Misuse `which` (1 .. PROBE_EMU_MISUSES-1) of the tiles, each one the
 * hardware faults on; 0 is the correct sequence. Returns the faults counted. */
#define PROBE_EMU_MISUSES 17
int probe_emu_misuses(void) { return PROBE_EMU_MISUSES; }
int probe_emu_misuse(int which)
{
    static float buf[16 * 16];
    struct gemm_bf16_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    probe_emu_reset();
    switch (which) {
    case 0:  /* config, zero, loads, product, store, release */
        _tile_loadconfig(&cfg); _tile_zero(0); _tile_loadd(1, buf, 64); _tile_loadd(2, buf, 64);
        _tile_dpbf16ps(0, 1, 2); _tile_stored(0, buf, 64); _tile_release(); break;
    case 1:  /* no config loaded */
        _tile_zero(0); break;
    case 2:  /* after tilerelease */
        _tile_loadconfig(&cfg); _tile_release(); _tile_loadd(0, buf, 64); break;
    case 3:  /* a tile the config leaves out */
        cfg.rows[5] = 0; cfg.colsb[5] = 0; _tile_loadconfig(&cfg); _tile_loadd(5, buf, 64); break;
    case 4:  /* k: src1 has 8 pairs a row, src2 16 rows */
        cfg.colsb[1] = 32; _tile_loadconfig(&cfg); _tile_dpbf16ps(0, 1, 2); break;
    case 5:  /* n: src2 colsb != dst colsb */
        cfg.colsb[2] = 32; _tile_loadconfig(&cfg); _tile_dpbf16ps(0, 1, 2); break;
    case 6:  /* m: src1 rows != dst rows */
        cfg.rows[1] = 8; _tile_loadconfig(&cfg); _tile_dpbf16ps(0, 1, 2); break;
    case 7:  /* one tile as two operands */
        _tile_loadconfig(&cfg); _tile_dpbf16ps(0, 1, 1); break;
    case 8:  /* 17 rows */
        cfg.rows[3] = 17; _tile_loadconfig(&cfg); break;
    case 9:  /* 68 bytes a row */
        cfg.colsb[3] = 68; _tile_loadconfig(&cfg); break;
    case 10: /* rows without colsb */
        cfg.colsb[3] = 0; _tile_loadconfig(&cfg); break;
    case 11: /* a reserved byte */
        cfg.reserved[3] = 1; _tile_loadconfig(&cfg); break;
    case 12: /* tile 8 does not exist in palette 1 */
        cfg.rows[8] = 16; cfg.colsb[8] = 64; _tile_loadconfig(&cfg); break;
    case 13: /* palette 2 */
        cfg.palette = 2; _tile_loadconfig(&cfg); break;
    case 14: /* tmm8 */
        _tile_loadconfig(&cfg); _tile_zero(8); break;
    case 15: /* colsb not a multiple of 4 */
        cfg.colsb[2] = 62; _tile_loadconfig(&cfg); _tile_loadd(2, buf, 64); break;
    case 16: /* start_row past the rows */
        cfg.start_row = 16; _tile_loadconfig(&cfg); _tile_loadd(2, buf, 64); break;
    }
    unsigned long faults = gemm_bf16_emu.faults;
    gemm_bf16_emu_init_state();
    return (int)faults;
}
#endif

unsigned probe_mxcsr(void) {
#if defined(__x86_64__)
    return _mm_getcsr();
#else
    return 0;
#endif
}

/* Seconds for n iterations of 4 dependent 1-cycle adds: the core's clock. */
double probe_clock_chain(long n)
{
    struct timespec t0, t1;
    long x = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < n; i++)
        __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
}

#if defined(__x86_64__)
/* Seconds for n rounds of 24 independent zmm vdpbf16ps (64 FLOP each) on
 * registers only: the measured roof of the bf16 unit. */
GEMM_BF16_AVX512_TARGET double probe_peak_dpbf16(long n)
{
    struct timespec t0, t1;
    __m512 c[24];
    for (int i = 0; i < 24; i++) c[i] = _mm512_setzero_ps();
    __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80), b = (__m512bh)_mm512_set1_epi32(0x00010001);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long t = 0; t < n; t++) {
#pragma GCC unroll 24
        for (int i = 0; i < 24; i++) c[i] = _mm512_dpbf16_ps(c[i], a, b);
        __asm__ volatile("" : : "v"(a), "v"(b));
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    volatile float sink = 0;
    for (int i = 0; i < 24; i++) sink += _mm512_reduce_add_ps(c[i]);
    (void)sink;
    return (t1.tv_sec - t0.tv_sec) + 1e-9 * (t1.tv_nsec - t0.tv_nsec);
}
#else
double probe_peak_dpbf16(long n) { (void)n; return -1.0; }
#endif
"""

# The levels setup.py builds the core for on x86-64 (the header's AVX-512
# and AMX functions carry their own target attributes, so they are in each).
LEVELS = ["x86-64", "x86-64-v3", "x86-64-v4"] if platform.machine().lower() in ("x86_64", "amd64") else [None]

F32P = ctypes.POINTER(ctypes.c_float)
U16P = ctypes.POINTER(ctypes.c_uint16)

# Test-only builds: extra -D flags, and the summation order of their AMX path.
VARIANTS = {
    "amx-emulated": ["-DFEMTOGPT_AMX_EMULATE"],
    "amx-emulated-guide": ["-DFEMTOGPT_AMX_EMULATE", "-DFEMTOGPT_AMX_EMULATE_ORDER=1"],
}
AMX_ORDERS = {0: "amx-sdm", 1: "amx-guide"}  # probe_emu_order() -> reference_order's name
# The AMX code is x86-64 only (so is its emulation's use); built at the baseline level.
EMULATED = list(VARIANTS) if LEVELS != [None] else []

# Emulated instruction kinds, as gemm_bf16_amx_emulate.h counts them.
EMU_LDTILECFG, EMU_TILEZERO, EMU_TILELOADD, EMU_TDPBF16PS, EMU_TILESTORED, EMU_TILERELEASE = range(6)


class BuildError(RuntimeError):
    pass


class Lib:
    """The header compiled at one -march level, with numpy-facing calls.

    An emulated build (variant "amx-emulated..."): each product through
    gemm/gemm_packed starts the emulator afresh and, after it, raises
    AssertionError if a tile instruction faulted or the tiles were left
    configured; emu_count() then tells how many of each instruction ran."""

    def __init__(self, path, level, variant=None):
        self.level = level
        self.variant = variant
        self.name = (level or "plain") + (f" {variant}" if variant else "")
        self.so = ctypes.CDLL(path)
        s = self.so
        i, f, sz, vp = ctypes.c_int, ctypes.c_float, ctypes.c_size_t, ctypes.c_void_p
        for name, res, args in [
            ("probe_force", i, [i]), ("probe_path", i, []), ("probe_available", i, [i]),
            ("probe_from_f32", None, [U16P, F32P, sz]), ("probe_to_f32", None, [F32P, U16P, sz]),
            ("probe_scratch_size", sz, [i, i, i, i]), ("probe_packed_b_size", sz, [i, i]),
            ("probe_pack_b", None, [U16P, i, i, i, F32P, i]),
            ("probe_gemm", None, [i, i, i, i, i, f, F32P, i, F32P, i, f, F32P, i, vp]),
            ("probe_gemm_packed", None, [i, i, i, i, f, F32P, i, U16P, f, F32P, i, vp]),
            ("probe_mxcsr", ctypes.c_uint, []),
            ("probe_clock_chain", ctypes.c_double, [ctypes.c_long]),
            ("probe_peak_dpbf16", ctypes.c_double, [ctypes.c_long]),
        ]:
            fn = getattr(s, name)
            fn.restype, fn.argtypes = res, args
        self._scratch = np.zeros(0, np.uint8)
        self.emulated = hasattr(s, "probe_emu_order")
        self.amx_order = None  # the AMX path's summation order, where it is known
        if self.emulated:
            ul, cp = ctypes.c_ulong, ctypes.c_char_p
            for name, res, args in [
                ("probe_emu_reset", None, []), ("probe_emu_faults", ul, []), ("probe_emu_fault", cp, []),
                ("probe_emu_count", ul, [i]), ("probe_emu_configured", i, []), ("probe_emu_order", i, []),
                ("probe_emu_dp", None, [i, i, i, F32P, ctypes.c_long, U16P, ctypes.c_long, U16P, ctypes.c_long]),
                ("probe_emu_misuses", i, []), ("probe_emu_misuse", i, [i]),
            ]:
                fn = getattr(s, name)
                fn.restype, fn.argtypes = res, args
            self.amx_order = AMX_ORDERS[s.probe_emu_order()]

    def emu_check(self):
        """Raise AssertionError if an emulated tile instruction faulted, or the tiles stay configured."""
        n = self.so.probe_emu_faults()
        if n:
            raise AssertionError(f"AMX emulator: {n} faulting tile instructions, the first: "
                                 f"{self.so.probe_emu_fault().decode()}")
        if self.so.probe_emu_configured():
            raise AssertionError("AMX emulator: the tiles are still configured after the call (no tilerelease)")

    def emu_count(self, kind):
        return int(self.so.probe_emu_count(kind))

    def _call(self, fn, *args):
        if self.emulated:
            self.so.probe_emu_reset()
        fn(*args)
        if self.emulated:
            self.emu_check()

    def available(self, path):
        return bool(self.so.probe_available(path))

    def force(self, path):
        """Force `path` for the following calls (0 = auto); returns the path in force."""
        got = self.so.probe_force(path)
        if got < 0:
            raise RuntimeError(f"path {path} does not run on this CPU")
        return got

    def from_f32(self, x):
        x = np.ascontiguousarray(x, np.float32)
        out = np.empty(x.shape, np.uint16)
        self.so.probe_from_f32(out.ctypes.data_as(U16P), x.ctypes.data_as(F32P), x.size)
        return out

    def to_f32(self, h):
        h = np.ascontiguousarray(h, np.uint16)
        out = np.empty(h.shape, np.float32)
        self.so.probe_to_f32(out.ctypes.data_as(F32P), h.ctypes.data_as(U16P), h.size)
        return out

    def scratch(self, M, N, K, b_packed):
        n = self.so.probe_scratch_size(M, N, K, int(b_packed))
        if self._scratch.size < n:
            self._scratch = np.zeros(n, np.uint8)
        return self._scratch.ctypes.data_as(ctypes.c_void_p)

    def pack_b(self, B, trans_b, N, K, ldb=None):
        ldb = B.shape[1] if ldb is None else ldb
        packed = np.empty(self.so.probe_packed_b_size(N, K), np.uint16)
        self.so.probe_pack_b(packed.ctypes.data_as(U16P), int(trans_b), N, K,
                             B.ctypes.data_as(F32P), ldb)
        return packed

    def gemm(self, ta, tb, M, N, K, alpha, A, B, beta, C, lda=None, ldb=None, ldc=None):
        """C (in place) = alpha op(A) op(B) + beta C; strides default to the arrays' rows."""
        lda = A.shape[1] if lda is None else lda
        ldb = B.shape[1] if ldb is None else ldb
        ldc = C.shape[1] if ldc is None else ldc
        self._call(self.so.probe_gemm, int(ta), int(tb), M, N, K, alpha, A.ctypes.data_as(F32P), lda,
                   B.ctypes.data_as(F32P), ldb, beta, C.ctypes.data_as(F32P), ldc,
                   self.scratch(M, N, K, False))

    def gemm_packed(self, ta, M, N, K, alpha, A, Bp, beta, C, lda=None, ldc=None):
        lda = A.shape[1] if lda is None else lda
        ldc = C.shape[1] if ldc is None else ldc
        self._call(self.so.probe_gemm_packed, int(ta), M, N, K, alpha, A.ctypes.data_as(F32P), lda,
                   Bp.ctypes.data_as(U16P), beta, C.ctypes.data_as(F32P), ldc,
                   self.scratch(M, N, K, True))


def find_cc():
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if not cc:
            continue
        try:
            subprocess.run([cc, "--version"], capture_output=True, check=True)
            return cc
        except (OSError, subprocess.CalledProcessError):
            continue
    return None


def build(outdir, level=None, cc=None, variant=None):
    """Compile the header with the wrapper into outdir; returns a Lib.
    `variant`: None (the core's code) or a test-only build of VARIANTS."""
    cc = cc or find_cc()
    if cc is None:
        raise BuildError("no C compiler (gcc or cc) found")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: {', '.join(VARIANTS)}")
    src = os.path.join(outdir, "gemm_bf16_probe.c")
    name = "gemm_bf16_" + "_".join([level or "plain", *([variant] if variant else [])]).replace("-", "_") + ".so"
    so = os.path.join(outdir, name)
    with open(src, "w") as f:
        f.write(WRAPPER)
    cmd = [cc, *CFLAGS, *([f"-march={level}"] if level else []), *VARIANTS.get(variant, []),
           "-I", os.path.abspath(KERNELS), src, "-o", so, "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BuildError(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return Lib(so, level, variant)


# ---------------------------------------------------------------------------
# numpy references
# ---------------------------------------------------------------------------

def bf16_round_ref(x):
    """Round to nearest even float32 -> bf16 bits (uint16), NaN quiet, denormals kept."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = np.where(nan, (u >> 16) | 0x40, r)
    return r.astype(np.uint16)


def bf16_value(x):
    """float32 of bf16(x), with bf16 denormals read as zero (what the kernels use)."""
    h = bf16_round_ref(x).astype(np.uint32)
    h = np.where((h & 0x7F80) == 0, h & 0x8000, h)
    return (h << 16).astype(np.uint32).view(np.float32)


def op(X, trans, rows, cols):
    """op(X) as a (rows x cols) array from the stored array (which may have padding)."""
    return X[:cols, :rows].T if trans else X[:rows, :cols]


def reference_f64(ta, tb, M, N, K, alpha, A, B, beta, C0):
    """float64 product of the bf16 inputs, and the elementwise error bound of a
    float32 sequential sum: (K + 4) u (|alpha| |A||B| + |beta C|), u = 2^-24."""
    a = bf16_value(op(A, ta, M, K)).astype(np.float64)
    b = bf16_value(op(B, tb, K, N)).astype(np.float64)
    ref = alpha * (a @ b)
    mag = abs(alpha) * (np.abs(a) @ np.abs(b))
    if beta != 0:
        c = C0[:M, :N].astype(np.float64)
        ref = ref + beta * c
        mag = mag + abs(beta) * np.abs(c)
    return ref, (K + 4) * 2.0 ** -24 * mag + 1e-30


ORDERS = ("contract", "amx-sdm", "amx-guide")


def reference_order(ta, tb, M, N, K, alpha, A, B, beta, C0, order="contract"):
    """A summation order in numpy float32, then the contract's epilogue:
      contract   acc += a[2p+1]b[2p+1]; acc += a[2p]b[2p], p in order (gemm_bf16.h)
      amx-sdm    the AMX path over emulated tiles in the SDM's order: per 32 k
                 (one tdpbf16ps), even = sum a[2p]b[2p], odd = sum a[2p+1]b[2p+1]
                 over its 16 pairs from +0, then acc += (even + odd)
      amx-guide  the same in the Intrinsics Guide's order: acc += a[2p]b[2p];
                 acc += a[2p+1]b[2p+1], p in order
    (gemm_bf16_amx_emulate.h). A product of two bf16 is exact in float32, so
    each step is the FMA's one rounding (inputs whose products stay normal).

    Exact for alpha a power of two (then alpha*acc is exact, and the fma's one
    rounding is the float32 rounding of a float64 sum of two float32, which
    double rounding cannot spoil)."""
    if order not in ORDERS:
        raise ValueError(f"unknown order {order!r}")
    a = bf16_value(op(A, ta, M, K))
    b = bf16_value(op(B, tb, K, N))
    kpad = K + K % 2 if order == "contract" else -(-K // 32) * 32  # AMX: K padded to Kp
    if kpad > K:
        a = np.concatenate([a, np.zeros((M, kpad - K), np.float32)], axis=1)
        b = np.concatenate([b, np.zeros((kpad - K, N), np.float32)], axis=0)
    acc = np.zeros((M, N), np.float32)
    with np.errstate(all="ignore"):
        if order == "amx-sdm":
            for k0 in range(0, kpad, 32):
                even = np.zeros((M, N), np.float32)
                odd = np.zeros((M, N), np.float32)
                for k in range(k0, k0 + 32, 2):
                    even = even + np.outer(a[:, k], b[k])
                    odd = odd + np.outer(a[:, k + 1], b[k + 1])
                acc = acc + (even + odd)
        else:
            first, second = (1, 0) if order == "contract" else (0, 1)
            for k in range(0, kpad, 2):
                acc = acc + np.outer(a[:, k + first], b[k + first])
                acc = acc + np.outer(a[:, k + second], b[k + second])
        acc = np.float32(alpha) * acc
        if beta == 0:
            return acc
        t = np.float32(beta) * C0[:M, :N]
        return (acc.astype(np.float64) + t.astype(np.float64)).astype(np.float32)


def operands(rng, ta, tb, M, N, K, pad=0, scale=1.0):
    """Stored A, B (with `pad` extra columns, so lda/ldb exceed the logical width)."""
    ash = (K, M) if ta else (M, K)
    bsh = (N, K) if tb else (K, N)
    A = (rng.standard_normal((ash[0], ash[1] + pad)) * scale).astype(np.float32)
    B = (rng.standard_normal((bsh[0], bsh[1] + pad)) * scale).astype(np.float32)
    return A, B


def run(lib, ta, tb, M, N, K, alpha, A, B, beta, C, packed=False, ldc=None):
    if packed:
        Bp = lib.pack_b(B, tb, N, K)
        lib.gemm_packed(ta, M, N, K, alpha, A, Bp, beta, C, ldc=ldc)
    else:
        lib.gemm(ta, tb, M, N, K, alpha, A, B, beta, C, ldc=ldc)
    return C
