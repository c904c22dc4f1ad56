"""Build the compiled core, femtogpt/_core.pyx, with OpenMP.

Everything else is declared in pyproject.toml. Environment knobs:
  FEMTOGPT_NATIVE=0   do not add -march=native (for a wheel meant for other CPUs)
  FEMTOGPT_ASAN=1     build with AddressSanitizer (scripts/asan_check.sh)
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# -fno-math-errno and -fno-trapping-math let gcc vectorise loops with sqrtf and
# float selects (we never read errno or FP exception flags). Not -ffast-math:
# it would also assume no NaN/inf, and LayerNorm/softmax must handle them.
compile_args = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
link_args = ["-fopenmp"]
if os.environ.get("FEMTOGPT_NATIVE", "1") != "0":
    # The kernels are auto-vectorised loops; let gcc use the CPU that builds them.
    compile_args.append("-march=native")
if os.environ.get("FEMTOGPT_ASAN", "0") == "1":
    compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
    link_args += ["-fsanitize=address"]

extension = Extension(
    "femtogpt._core",
    ["femtogpt/_core.pyx"],
    include_dirs=[numpy.get_include()],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
    define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
)

setup(
    ext_modules=cythonize(
        [extension],
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )
)
