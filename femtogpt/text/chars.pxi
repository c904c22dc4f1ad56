# The char tokenizer's passes and character counts, in C (included by
# _native.pyx).

def mark_code_points(const uint8_t[::1] data not None, uint8_t[::1] seen not None):
    """seen[c] = 1 for every code point c in data (valid UTF-8: checked by
    Python first; a stray byte counts as U+FFFD)."""
    cdef int64_t i = 0, n = data.shape[0]
    cdef uint32_t cp = 0
    if seen.shape[0] != 0x110000:
        raise ValueError("seen must hold one entry per code point (0x110000)")
    with nogil:
        while i < n:
            i += _utf8_length(&data[0], i, n, &cp)
            seen[cp] = 1


cdef int64_t _char_ids_piece(const uint8_t* s, int64_t start, int64_t end, int64_t n,
                             const int32_t* table, int64_t L, uint32_t* out,
                             int64_t j) noexcept nogil:
    """Ids of s[start:end] written from out[j] on; the index of the first
    character without an id, or -1."""
    cdef int64_t i = start, first_bad = -1
    cdef uint32_t cp = 0
    cdef int32_t id_
    while i < end:
        i += _utf8_length(s, i, n, &cp)
        id_ = table[cp] if cp < L else -1
        if id_ < 0:
            if first_bad < 0:
                first_bad = j
            id_ = 0
        out[j] = <uint32_t>id_
        j += 1
    return first_bad


def count_chars(const uint8_t[::1] data not None):
    """The number of UTF-8 characters in data (its bytes that are not
    continuation bytes)."""
    cdef int64_t n = data.shape[0]
    if n == 0:
        return 0
    with nogil:
        n = _count_chars(&data[0], 0, n)
    return n


def char_offset(const uint8_t[::1] data not None, int64_t k):
    """The byte offset where character k of data (UTF-8) starts; len(data) if
    data has k characters or fewer."""
    cdef int64_t i, n = data.shape[0], seen = 0
    for i in range(n):
        if (data[i] & 0xC0) != 0x80:
            if seen == k:
                return i
            seen += 1
    return n


def char_ids(const uint8_t[::1] data not None, const int32_t[::1] lookup not None,
             uint32_t[::1] out not None):
    """The char tokenizer's ids of data (valid UTF-8), one per character,
    written to out; lookup[c] is code point c's id, -1 if the vocabulary lacks
    it (code points past the table lack it too). Returns (number of ids, index
    of the first character without an id or -1). Parallel over pieces.

    data    IN   (N,) UTF-8 bytes
    lookup  IN   (L,) int32 ids by code point
    out     OUT  (>= characters in data,) ids
    """
    cdef int64_t n = data.shape[0], L = lookup.shape[0]
    cdef int n_pieces = max(1, min(4 * openmp.omp_get_max_threads(), <int>(n >> 16)))
    cdef int p
    edges = np.zeros(n_pieces + 1, dtype=np.int64)
    counts = np.zeros(n_pieces + 1, dtype=np.int64)
    bad = np.full(n_pieces, -1, dtype=np.int64)
    cdef int64_t[::1] e = edges, c = counts, b = bad
    if n == 0:
        return 0, -1
    cdef const uint8_t* s = &data[0]
    for p in range(1, n_pieces):
        e[p] = _char_start(s, n * p // n_pieces, n)
    e[n_pieces] = n
    # Characters per piece (bytes that are not continuation bytes), then where
    # each piece's ids start.
    for p in prange(n_pieces, nogil=True, schedule="static"):
        c[p + 1] = _count_chars(s, e[p], e[p + 1])
    for p in range(n_pieces):
        c[p + 1] += c[p]
    if out.shape[0] < c[n_pieces]:
        raise ValueError("out must hold one id per character")
    cdef uint32_t* dst = &out[0]
    cdef const int32_t* table = &lookup[0]
    for p in prange(n_pieces, nogil=True, schedule="static"):
        b[p] = _char_ids_piece(s, e[p], e[p + 1], n, table, L, dst, c[p])
    for p in range(n_pieces):
        if b[p] >= 0:
            return int(c[n_pieces]), int(b[p])
    return int(c[n_pieces]), -1
