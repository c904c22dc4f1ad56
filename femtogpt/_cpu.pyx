# cython: language_level=3
"""Which x86-64 levels this CPU (and its operating system) can run.

Compiled for the baseline x86-64 in every build, so that it runs anywhere and
can be asked before any of the core's builds is loaded (femtogpt/_dispatch.py).
The checks are gcc's and clang's __builtin_cpu_supports, which also confirm
that the operating system saves the AVX and AVX-512 registers (xgetbv): a CPU
flag alone is not enough to run AVX code. The levels are the x86-64 psABI's:
v3 is AVX2 with FMA (Haswell, Zen), v4 adds AVX-512 F/BW/CD/DQ/VL (Skylake-X,
Zen 4). On other architectures nothing is supported but the plain build.

BUILT names the builds of the core that the same `setup.py` run compiled
(femtogpt._core and, on x86-64, femtogpt._core_x86_64_v3 and _v4), so that
modules left behind by an earlier build of another kind are never loaded.
"""

cdef extern from *:
    """
    #if defined(__x86_64__) || defined(_M_X64)
    static int femtogpt_cpu_level(void) {
        __builtin_cpu_init();
        int v2 = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("popcnt")
                 && __builtin_cpu_supports("ssse3");
        int v3 = v2 && __builtin_cpu_supports("avx") && __builtin_cpu_supports("avx2")
                 && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi")
                 && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c")
                 && __builtin_cpu_supports("lzcnt") && __builtin_cpu_supports("movbe");
        int v4 = v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                 && __builtin_cpu_supports("avx512cd") && __builtin_cpu_supports("avx512dq")
                 && __builtin_cpu_supports("avx512vl");
        return v4 ? 4 : v3 ? 3 : v2 ? 2 : 1;
    }
    #else
    static int femtogpt_cpu_level(void) { return 0; }
    #endif
    #ifndef FEMTOGPT_BUILT
    #define FEMTOGPT_BUILT "plain"
    #endif
    """
    int femtogpt_cpu_level() nogil
    const char* FEMTOGPT_BUILT


def cpu_level():
    """The highest x86-64 level this machine runs: 1 (baseline) to 4; 0 if not x86-64."""
    return femtogpt_cpu_level()


BUILT = tuple(FEMTOGPT_BUILT.decode().split(","))
