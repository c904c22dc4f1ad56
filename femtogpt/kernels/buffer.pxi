# Buffer: the core's float32 storage. Every parameter, gradient, moment and
# activation block is one of these; numpy views it without copying.

from libc.stdlib cimport free
from libc.string cimport memset
from posix.mman cimport (mmap, munmap, madvise, PROT_READ, PROT_WRITE, MAP_PRIVATE,
                         MAP_ANONYMOUS, MAP_FAILED, MADV_DONTNEED)


cdef extern from "sys/mman.h":
    int MADV_HUGEPAGE


cdef extern from "stdlib.h":
    int posix_memalign(void **memptr, size_t alignment, size_t size) nogil


DEF ALIGN_BYTES = 64      # one cache line, and one AVX-512 register
DEF ALIGN_FLOATS = 16     # the same in float32 elements


# Buffers at least this large are mapped from the kernel rather than taken
# from malloc: their pages are zero already and cost memory only once
# written. A model that only samples never writes its gradient block, so it
# pays for its weights alone (GPT-2 XL: 6.2 GB of gradients not spent).
DEF MAP_MIN_BYTES = 1 << 20


cdef class Buffer:
    """`size` float32 values, 64-byte aligned, zero-filled, owned by the core.

    `np.asarray(buffer)` is a writable 1-D view of the same memory (no copy);
    the view keeps the Buffer alive.
    """
    cdef float* data
    cdef readonly Py_ssize_t size
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]
    cdef size_t mapped      # bytes mapped with mmap, 0 if from posix_memalign

    def __cinit__(self, Py_ssize_t size):
        cdef void* ptr = NULL
        cdef size_t nbytes
        self.mapped = 0
        if size < 0:
            raise ValueError(f"Buffer size must be >= 0, got {size}")
        # Round up to whole cache lines; allocate at least one so data is never NULL.
        nbytes = ((<size_t>size * 4 + ALIGN_BYTES - 1) // ALIGN_BYTES) * ALIGN_BYTES
        if nbytes == 0:
            nbytes = ALIGN_BYTES
        if nbytes >= MAP_MIN_BYTES:
            # Page-aligned, so 64-byte aligned too.
            ptr = mmap(NULL, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if ptr == MAP_FAILED:
                raise MemoryError(f"could not allocate {nbytes} bytes")
            self.mapped = nbytes
        else:
            if posix_memalign(&ptr, ALIGN_BYTES, nbytes) != 0:
                raise MemoryError(f"could not allocate {nbytes} bytes")
            memset(ptr, 0, nbytes)
        self.data = <float*>ptr
        self.size = size
        self.shape[0] = size
        self.strides[0] = 4

    def __dealloc__(self):
        if self.mapped:
            munmap(self.data, self.mapped)
        else:
            free(self.data)

    def __getbuffer__(self, Py_buffer* view, int flags):
        view.buf = <void*>self.data
        view.obj = self
        view.len = self.size * 4
        view.itemsize = 4
        view.readonly = 0
        view.ndim = 1
        view.format = b"f"
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer* view):
        """Nothing to release: the memory belongs to the Buffer, which the view keeps alive."""

    cdef Py_ssize_t release(self, Py_ssize_t start, Py_ssize_t count):
        # Give the whole pages inside elements start..start+count back to the
        # kernel (a mapped Buffer only): they read as zero afterwards and cost no
        # memory until written. Sampling at bf16/int8 does this to the fp32
        # matrices it has converted. Returns the bytes released.
        cdef size_t page = 4096, lo, hi
        if not self.mapped or count <= 0:
            return 0
        if start < 0 or start + count > self.size:
            raise ValueError(f"release({start}, {count}) outside a Buffer of {self.size}")
        lo = (<size_t>self.data + <size_t>start * 4 + page - 1) // page * page
        hi = (<size_t>self.data + <size_t>(start + count) * 4) // page * page
        if hi <= lo:
            return 0
        if madvise(<void*>lo, hi - lo, MADV_DONTNEED) != 0:
            return 0
        return <Py_ssize_t>(hi - lo)

    cdef void prefer_huge_pages(self) noexcept:
        # Ask for 2 MB pages (transparent huge pages; a hint, ignored where the
        # kernel has them off) before the Buffer is first written. For weights
        # that every decode step streams end to end: 512 times fewer pages to
        # walk. Measured on Zen 4 (GPT-2 124M shape, int8 decode, one thread,
        # alternated runs): 154-162 tok/s with them, 134-153 without; fp32
        # and bf16 within the noise. Training buffers are left as they are.
        if self.mapped:
            madvise(<void*>self.data, self.mapped, MADV_HUGEPAGE)

    def address(self):
        """The address of the first element (tests check the alignment)."""
        return <size_t>self.data
