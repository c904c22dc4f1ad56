"""Build the compiled core, femtogpt/_core.pyx and the files it includes from
femtogpt/kernels/, with OpenMP (and femtogpt/text/_native.pyx, the BPE encoder
for long texts, and femtogpt/_cpu.pyx, the CPU check).

Everything else is declared in pyproject.toml.

On x86-64 the core is compiled three times, for the baseline x86-64 (any 64-bit
x86 CPU), x86-64-v3 (AVX2, FMA) and x86-64-v4 (AVX-512), as the modules
femtogpt._core, femtogpt._core_x86_64_v3 and femtogpt._core_x86_64_v4; at import
femtogpt/_dispatch.py loads the best one the CPU runs. The kernels are
auto-vectorised loops, so the instruction set is chosen per module, at compile
time, for all of them at once: a wheel built here runs on any x86-64 machine,
and at full speed on this one. Elsewhere (aarch64, ...) it is one plain build.

Environment knobs (a build of another kind rebuilds everything):
  FEMTOGPT_NATIVE=1   one build for the CPU that compiles it (-march=native),
                      for a machine that builds and runs its own copy
  FEMTOGPT_ASAN=1     one build with AddressSanitizer (scripts/asan_check.sh)
Needs gcc >= 11 or clang >= 12 (for -march=x86-64-v3 and -v4).
"""
import glob
import os
import platform

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -fno-math-errno and -fno-trapping-math let gcc vectorise loops with sqrtf and
# float selects (we never read errno or FP exception flags). Not -ffast-math:
# it would also assume no NaN/inf, and LayerNorm/softmax must handle them.
COMPILE_ARGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
LINK_ARGS = ["-fopenmp"]
# (target, module, extra compiler flags) of a portable x86-64 build.
X86_64_BUILDS = [
    ("x86-64", "femtogpt._core", []),
    ("x86-64-v3", "femtogpt._core_x86_64_v3", ["-march=x86-64-v3"]),
    ("x86-64-v4", "femtogpt._core_x86_64_v4", ["-march=x86-64-v4"]),
]


def core_builds():
    """[(target, module, extra flags)] this build compiles, and extra link flags."""
    if os.environ.get("FEMTOGPT_ASAN", "0") == "1":
        return [("asan", "femtogpt._core",
                 ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"])], \
            ["-fsanitize=address"]
    if os.environ.get("FEMTOGPT_NATIVE", "0") == "1":
        return [("native", "femtogpt._core", ["-march=native"])], []
    if platform.machine().lower() in ("x86_64", "amd64"):
        return X86_64_BUILDS, []
    return [("plain", "femtogpt._core", [])], []


def c_string(text):
    return '"' + text + '"'


BUILDS, EXTRA_LINK = core_builds()
MACROS = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
# The core is _core.pyx and the files it includes, one per idea, from
# femtogpt/kernels/ (the per-target modules include _core.pyx itself), and any C
# header there (`cdef extern from`). They are the core's depends: editing any one
# rebuilds every target. (depends does not put them in the sdist: pyproject's
# package data does, and a header must be listed there too.)
CORE_DEPENDS = ["femtogpt/_core.pyx"] + sorted(
    glob.glob("femtogpt/kernels/*.pxi") + glob.glob("femtogpt/kernels/*.h"))
extensions = [
    Extension(module, [module.replace(".", "/") + ".pyx"],
              depends=CORE_DEPENDS,
              include_dirs=[numpy.get_include()],
              extra_compile_args=COMPILE_ARGS + flags,
              extra_link_args=LINK_ARGS + EXTRA_LINK,
              define_macros=MACROS + [("FEMTOGPT_TARGET", c_string(target))])
    for target, module, flags in BUILDS
]
# Byte-level BPE encoding of long texts (tokenizer.py and token_cache.py call it):
# scalar code, one baseline build, with ASan when the core has it.
extensions.append(Extension(
    "femtogpt.text._native", ["femtogpt/text/_native.pyx"],
    include_dirs=[numpy.get_include()],
    extra_compile_args=COMPILE_ARGS + (BUILDS[0][2] if BUILDS[0][0] == "asan" else []),
    extra_link_args=LINK_ARGS + EXTRA_LINK, define_macros=MACROS))
# The CPU check: baseline code, so that it runs before we know what the CPU has.
extensions.append(Extension(
    "femtogpt._cpu", ["femtogpt/_cpu.pyx"],
    define_macros=[("FEMTOGPT_BUILT", c_string(",".join(t for t, _, _ in BUILDS)))]))


class BuildExt(build_ext):
    """build_ext that rebuilds everything when the kind of build changes.

    setuptools skips an extension whose file is newer than its sources, and
    never looks at the flags: without this, switching FEMTOGPT_NATIVE or
    FEMTOGPT_ASAN in the same tree would keep the previous kind's modules.
    """

    def run(self):
        kind = repr(BUILDS)
        stamp = os.path.join(self.build_temp, "femtogpt-build-kind")
        try:
            with open(stamp) as f:
                previous = f.read()
        except OSError:
            previous = None
        if previous != kind:
            self.force = True
        # The three compiles of the core are independent: one per core at once.
        self.parallel = self.parallel or True
        super().run()
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(kind)


setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    ),
)
