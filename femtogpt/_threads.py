"""One thread pool: OpenMP. scipy's BLAS is pinned to one thread.

The core splits every large matrix product across its OpenMP threads itself and
calls sgemm (from scipy.linalg.cython_blas) on each thread's slice. If OpenBLAS
also started its own threads inside each call, 2 cores would run 4 busy threads.
So the BLAS library that scipy links is limited to one thread, once, at import.
numpy's own BLAS (a separate copy) is left alone: user code that multiplies
numpy arrays keeps all its threads.
"""
import os

import scipy
import scipy.linalg.cython_blas  # noqa: F401  (loads the library we call into)
from threadpoolctl import ThreadpoolController


def _scipy_blas_dirs():
    scipy_dir = os.path.dirname(os.path.abspath(scipy.__file__))
    # Wheels put the bundled OpenBLAS in site-packages/scipy.libs/.
    return (scipy_dir + os.sep, scipy_dir + ".libs" + os.sep)


def pin_blas_to_one_thread():
    """Limit scipy's BLAS to one thread; returns the paths of the libraries limited."""
    controller = ThreadpoolController()
    blas = [lib for lib in controller.lib_controllers if lib.user_api == "blas"]
    ours = [lib for lib in blas if lib.filepath.startswith(_scipy_blas_dirs())]
    # A scipy built against a system BLAS (conda, distro packages) shares it with
    # numpy and we cannot tell them apart: limit every BLAS then.
    for lib in ours or blas:
        lib.set_num_threads(1)
    return [lib.filepath for lib in ours or blas]
