# Threads: one pool, OpenMP's. Its size is OMP_NUM_THREADS (or the number of
# cores) unless set_num_threads() changes it; scipy's BLAS is pinned to one
# thread (femtogpt/_threads.py), so the kernels' prange loops are the only
# threads that run. Below: how work is cut into pieces that threads own.

cimport openmp


def get_num_threads():
    """Threads the kernels use when called from this thread (OMP_NUM_THREADS,
    or the number of cores, unless set_num_threads changed it here)."""
    return openmp.omp_get_max_threads()


def set_num_threads(int n):
    """Use n threads for the kernels that this Python thread calls.

    OpenMP keeps the count per thread: a thread started later begins with
    OMP_NUM_THREADS (or the number of cores), not with what the main thread
    set, so a program that runs models in threads of its own calls this in
    each (femtogpt serve does, in the thread that takes a model). Each thread
    that runs kernels also keeps its own pool of OpenMP threads for as long
    as it lives; with more of them than cores they stop waiting actively and
    every product slows, so run a model's work in one thread at a time, or in
    threads that end (serve_runs.in_a_thread_of_its_own says why)."""
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    openmp.omp_set_num_threads(n)


# Elementwise kernels run a plain loop (which gcc vectorises) over chunks of
# this many elements, one chunk per prange iteration.
DEF ELEM_CHUNK = 4096


cdef inline Py_ssize_t min_size(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# Column-chunk width for weight-gradient reductions over rows: each thread owns
# whole chunks of channels, so no two threads add into the same gradient entry.
DEF COL_CHUNK = 16
