# The boundary: checks that every Python entry point runs before it releases
# the GIL. The kernels trust their arguments (see _core.pyx), so whatever they
# index is checked here first.
#
# Each kernel file ends with its `def py_*` wrappers: the same kernels, callable
# on numpy arrays, for tests and for reading. Each takes C-contiguous 1-D
# float32 arrays (pass `a.ravel()` of a contiguous array) in the kernel's
# argument order and checks every length before running. They sit beside their
# kernels rather than in one file of wrappers so that a kernel, its argument
# order and the checks that guard it are read, and changed, in one place.

from libc.stdint cimport int32_t


cdef _need(name, Py_ssize_t got, Py_ssize_t want):
    if got != want:
        raise ValueError(f"{name}: expected {want} elements, got {got}")


def _need_positive(**sizes):
    for name, value in sizes.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


cdef _need_ids(const int32_t[::1] ids, Py_ssize_t n, int limit, name):
    cdef Py_ssize_t i
    _need(name, ids.shape[0], n)
    for i in range(n):
        if ids[i] < 0 or ids[i] >= limit:
            raise ValueError(f"{name}[{i}] = {ids[i]} is outside [0, {limit})")
