# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Byte-level BPE encoding in C: the pre-split, the merges and a cache of words.

bpe.py's BPETokenizer (and gpt2.py's GPT-2 tokenizer) define
the encoding; this is the same encoding, written for speed, for the texts
that are too long for Python's loop: a corpus being prepared (token_cache.py)
or a long encode_array. tests/test_text_encoder.py checks that the two give
the same ids on texts of every script.

The pre-split is the regular expression both patterns share, run as a small
state machine over UTF-8:
    ('s|'t|'re|'ve|'m|'ll|'d)?  (GPT-2 only)
    | ?L+ | ?N+ | ?O+ | S+(?!\\S) | S+
where every code point has one class, L (letter), N (number), S (white space)
or O (anything else), read from a table that tokenizer.py builds from the
pattern's own character classes. A chunk's ids are looked up in a per-thread
cache of recent words (a corpus repeats the same few thousand words), else
computed by applying the merges in rank order: the lowest-ranked adjacent
pair first, leftmost first, which is what the Python loop does.

Text is split into pieces at safe boundaries (bulk_encode.piece_bounds) and the
pieces are encoded in parallel, one thread each, with prange.
"""
import numpy as np

from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

cimport openmp

# The encoder is one extension made of four .pxi files joined by `include`,
# not four extensions joined by cimport: the hot helpers (_utf8_length,
# _class_at, _rank) are `cdef inline` and are called from every file, and an
# include lets the C compiler inline them across files, which a cimport
# through a .pxd (a call through a function pointer table) would not. One
# extension also keeps setup.py's single entry for the encoder.
include "utf8.pxi"          # the UTF-8 walk every pass shares
include "presplit.pxi"      # the pre-split state machine and the safe cuts
include "merge.pxi"         # the merges of one chunk and the word cache
include "chars.pxi"         # the char tokenizer's passes, character counts


def max_threads():
    """The OpenMP threads an encode call uses (set by _core.set_num_threads)."""
    return openmp.omp_get_max_threads()


cdef class Encoder:
    """One tokenizer's merges and character classes, ready to encode UTF-8.

    merges: (M, 2) int32, merge r joins tokens merges[r] into token 256 + r
    (internal ids: bytes are 0..255). classes: uint8 (0x110000,), the class of
    each code point. contractions: GPT-2's English contractions come first.
    """
    cdef uint64_t[::1] keys
    cdef int32_t[::1] values
    cdef uint64_t mask
    cdef const uint8_t[::1] classes
    cdef bint contractions
    cdef CacheSlot* caches
    cdef int n_caches

    def __cinit__(self):
        self.caches = NULL

    def __init__(self, const int32_t[:, ::1] merges not None, const uint8_t[::1] classes not None,
                 bint contractions):
        cdef int64_t m = merges.shape[0], capacity = 16, r
        cdef uint64_t key, slot
        if merges.shape[1] != 2:
            raise ValueError("merges must have shape (M, 2)")
        if classes.shape[0] != 0x110000:
            raise ValueError("classes must hold one entry per code point (0x110000)")
        for r in range(0x110000):
            if classes[r] > OTHER:
                raise ValueError("classes must be 0..3")
        for r in range(m):
            if not (0 <= merges[r, 0] < 256 + r and 0 <= merges[r, 1] < 256 + r):
                raise ValueError(f"merge {r} refers to a token that does not exist yet")
        if 256 + m > 65536:
            raise ValueError("at most 65280 merges (ids must fit in 16 bits)")
        while capacity < 2 * m:
            capacity *= 2
        self.keys = np.full(capacity, 0xFFFFFFFFFFFFFFFF, dtype=np.uint64)
        self.values = np.full(capacity, -1, dtype=np.int32)
        self.mask = capacity - 1
        for r in range(m):
            key = (<uint64_t>merges[r, 0] << 32) | <uint32_t>merges[r, 1]
            slot = (key * 0x9E3779B97F4A7C15ULL) >> 20
            while True:
                slot &= self.mask
                if self.keys[slot] == key:
                    break           # a repeated pair: the first (lowest) rank wins
                if self.keys[slot] == 0xFFFFFFFFFFFFFFFFULL:
                    self.keys[slot] = key
                    self.values[slot] = <int32_t>r
                    break
                slot += 1
        self.classes = classes
        self.contractions = contractions
        self.n_caches = openmp.omp_get_max_threads()
        self.caches = <CacheSlot*>malloc(self.n_caches * CACHE_SLOTS * sizeof(CacheSlot))
        if self.caches == NULL:
            raise MemoryError()
        self.clear_cache()

    def __dealloc__(self):
        free(self.caches)

    def clear_cache(self):
        cdef int64_t i
        for i in range(<int64_t>self.n_caches * CACHE_SLOTS):
            self.caches[i].n_bytes = 0
            self.caches[i].hash = 0

    def encode(self, const uint8_t[::1] data not None, const int64_t[::1] bounds not None,
               uint32_t[::1] out not None, int64_t[::1] counts not None):
        """Encode each piece data[bounds[p]:bounds[p + 1]] on its own (a complete
        text) into out[bounds[p]:], and set counts[p] to its number of ids.

        data    IN   (N,) UTF-8 bytes
        bounds  IN   (P + 1,) piece edges, 0 = bounds[0] <= ... <= bounds[P] = N
        out     OUT  (N,) ids; piece p's start at out[bounds[p]] (a piece has at
                     most as many ids as bytes)
        counts  OUT  (P,)
        """
        cdef int64_t n_pieces = bounds.shape[0] - 1, p, q, n = data.shape[0]
        cdef int n_threads = min(openmp.omp_get_max_threads(), self.n_caches)
        cdef int failed = 0
        if n_pieces < 0 or bounds[0] != 0 or bounds[n_pieces] != n:
            raise ValueError("bounds must start at 0 and end at len(data)")
        for p in range(n_pieces):
            if bounds[p + 1] < bounds[p]:
                raise ValueError("bounds must not decrease")
        if out.shape[0] < n or counts.shape[0] < n_pieces:
            raise ValueError("out must hold len(data) ids and counts one per piece")
        if n_threads < 1:
            n_threads = 1
        cdef Scratch* scratch = <Scratch*>malloc(n_threads * sizeof(Scratch))
        if scratch == NULL:
            raise MemoryError()
        for q in range(n_threads):
            scratch[q].tokens = NULL
            scratch[q].nxt = NULL
            scratch[q].prv = NULL
            scratch[q].heap = NULL
            scratch[q].capacity = 0
        cdef const uint8_t* src = &data[0] if n > 0 else NULL
        cdef uint32_t* dst = &out[0] if n > 0 else NULL
        cdef const uint8_t* classes = &self.classes[0]
        cdef const uint64_t* keys = &self.keys[0]
        cdef const int32_t* values = &self.values[0]
        cdef const int64_t* edges = &bounds[0]
        cdef int64_t* n_ids = &counts[0] if n_pieces > 0 else NULL
        cdef uint64_t mask = self.mask
        cdef bint contractions = self.contractions
        cdef CacheSlot* caches = self.caches
        cdef int64_t got
        cdef int tid
        for p in prange(n_pieces, nogil=True, schedule="dynamic", chunksize=1,
                        num_threads=n_threads):
            tid = threadid()
            if edges[p + 1] > edges[p]:
                got = _encode_piece(src + edges[p], edges[p + 1] - edges[p], classes,
                                    contractions, keys, values, mask,
                                    caches + <int64_t>tid * CACHE_SLOTS, &scratch[tid],
                                    dst + edges[p])
            else:
                got = 0
            n_ids[p] = got
        for q in range(n_threads):
            free(scratch[q].tokens)
            free(scratch[q].nxt)
            free(scratch[q].prv)
            free(scratch[q].heap)
        free(scratch)
        for p in range(n_pieces):
            if counts[p] < 0:
                raise MemoryError("out of memory while encoding text")
