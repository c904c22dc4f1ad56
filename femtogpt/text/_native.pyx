# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Byte-level BPE encoding in C: the pre-split, the merges and a cache of words.

tokenizer.py's BPETokenizer (and gpt2_tokenizer.py's GPT-2 tokenizer) define
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

Text is split into pieces at safe boundaries (token_cache.safe_cut) and the
pieces are encoded in parallel, one thread each, with prange.
"""
import numpy as np

from cython.parallel cimport prange, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

cimport openmp

cdef enum:
    LETTER = 0
    NUMBER = 1
    SPACE = 2
    OTHER = 3

cdef enum:
    # A word of at most this many bytes is cached with its ids.
    CACHE_KEY = 22
    # Cache slots per thread (a power of two): 2**16 slots of 80 bytes, 5 MB.
    CACHE_SLOTS = 65536
    # Chunks up to this many bytes merge by rescanning; longer ones with a heap.
    SHORT_CHUNK = 24

cdef struct CacheSlot:
    uint64_t hash
    uint8_t n_bytes          # 0: empty slot
    uint8_t n_ids
    uint8_t key[CACHE_KEY]
    uint16_t ids[CACHE_KEY]

# Scratch for one thread: the chunk's tokens while merging (grown as needed).
cdef struct Scratch:
    int32_t* tokens
    int32_t* nxt
    int32_t* prv
    uint64_t* heap
    int64_t capacity


cdef inline int _utf8_length(const uint8_t* s, int64_t i, int64_t n, uint32_t* cp) noexcept nogil:
    """Bytes of the character at s[i] (1..4) and its code point. Input is valid
    UTF-8 (checked by Python before the call); a byte that does not start a
    whole character is taken alone, as an OTHER character, so that the loop
    never reads past n whatever the bytes are."""
    cdef uint8_t c = s[i]
    if c < 0x80:
        cp[0] = c
        return 1
    if c >= 0xC2 and c < 0xE0 and i + 1 < n:
        cp[0] = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F)
        return 2
    if c >= 0xE0 and c < 0xF0 and i + 2 < n:
        cp[0] = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F)
        return 3
    if c >= 0xF0 and c < 0xF5 and i + 3 < n:
        cp[0] = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) \
            | (s[i + 3] & 0x3F)
        if cp[0] > 0x10FFFF:
            cp[0] = 0xFFFD
        return 4
    cp[0] = 0xFFFD     # U+FFFD is OTHER in both patterns
    return 1


cdef inline int _class_at(const uint8_t* s, int64_t i, int64_t n, const uint8_t* classes,
                          int* length) noexcept nogil:
    cdef uint32_t cp = 0
    length[0] = _utf8_length(s, i, n, &cp)
    return classes[cp]


cdef inline int64_t _chunk_end(const uint8_t* s, int64_t i, int64_t n, const uint8_t* classes,
                               bint contractions) noexcept nogil:
    """Where the pre-split chunk that starts at s[i] ends (i < n)."""
    cdef int length = 0, length1 = 0, cls, cls1
    cdef int64_t j, last
    cdef uint8_t c1, c2
    if contractions and s[i] == 39 and i + 1 < n:      # "'"
        c1 = s[i + 1]
        if c1 == 115 or c1 == 116 or c1 == 109 or c1 == 100:     # s t m d
            return i + 2
        if i + 2 < n:
            c2 = s[i + 2]
            if (c1 == 114 and c2 == 101) or (c1 == 118 and c2 == 101) or (c1 == 108 and c2 == 108):
                return i + 3                                     # re ve ll
    cls = _class_at(s, i, n, classes, &length)
    if s[i] == 32 and i + 1 < n:
        # " ?X+": a space leads a run of letters, numbers or others.
        cls1 = _class_at(s, i + 1, n, classes, &length1)
        if cls1 != SPACE:
            cls = cls1
            j = i + 1 + length1
            while j < n and _class_at(s, j, n, classes, &length1) == cls:
                j += length1
            return j
    j = i + length
    if cls != SPACE:
        while j < n and _class_at(s, j, n, classes, &length1) == cls:
            j += length1
        return j
    # A run of white space: S+(?!\S) gives its last character back to the word
    # that follows, when the run has two or more; S+ takes a single one.
    last = i
    while j < n and _class_at(s, j, n, classes, &length1) == SPACE:
        last = j
        j += length1
    if j < n and last > i:
        return last
    return j


cdef inline uint64_t _hash_bytes(const uint8_t* s, int64_t n) noexcept nogil:
    """FNV-1a, then a final mix so that the low bits pick well-spread slots."""
    cdef uint64_t h = 1469598103934665603ULL
    cdef int64_t i
    for i in range(n):
        h = (h ^ s[i]) * 1099511628211ULL
    h ^= h >> 29
    h *= 0xBF58476D1CE4E5B9ULL
    h ^= h >> 32
    return h


cdef inline int32_t _rank(const uint64_t* keys, const int32_t* values, uint64_t mask,
                          int32_t a, int32_t b) noexcept nogil:
    """The merge that joins tokens a and b (its rank), or -1: open addressing."""
    cdef uint64_t key = (<uint64_t>a << 32) | <uint32_t>b
    cdef uint64_t slot = (key * 0x9E3779B97F4A7C15ULL) >> 20
    while True:
        slot &= mask
        if keys[slot] == key:
            return values[slot]
        if keys[slot] == 0xFFFFFFFFFFFFFFFFULL:
            return -1
        slot += 1


cdef inline bint _grow(Scratch* sc, int64_t n) noexcept nogil:
    cdef int64_t cap
    if n <= sc.capacity:
        return True
    cap = n if n > 2 * sc.capacity else 2 * sc.capacity
    sc.tokens = <int32_t*>realloc(sc.tokens, cap * sizeof(int32_t))
    sc.nxt = <int32_t*>realloc(sc.nxt, cap * sizeof(int32_t))
    sc.prv = <int32_t*>realloc(sc.prv, cap * sizeof(int32_t))
    sc.heap = <uint64_t*>realloc(sc.heap, 2 * cap * sizeof(uint64_t))
    if sc.tokens == NULL or sc.nxt == NULL or sc.prv == NULL or sc.heap == NULL:
        return False
    sc.capacity = cap
    return True


cdef inline void _heap_push(uint64_t* heap, int64_t* size, uint64_t item) noexcept nogil:
    cdef int64_t i = size[0], parent
    size[0] += 1
    while i > 0:
        parent = (i - 1) >> 1
        if heap[parent] <= item:
            break
        heap[i] = heap[parent]
        i = parent
    heap[i] = item


cdef inline uint64_t _heap_pop(uint64_t* heap, int64_t* size) noexcept nogil:
    cdef uint64_t top = heap[0], item
    cdef int64_t n, i = 0, child
    size[0] -= 1
    n = size[0]
    item = heap[n]
    while True:
        child = 2 * i + 1
        if child >= n:
            break
        if child + 1 < n and heap[child + 1] < heap[child]:
            child += 1
        if item <= heap[child]:
            break
        heap[i] = heap[child]
        i = child
    heap[i] = item
    return top


cdef int64_t _merge_chunk(const uint8_t* s, int64_t n, const uint64_t* keys,
                          const int32_t* values, uint64_t mask, Scratch* sc,
                          uint32_t* out) noexcept nogil:
    """The ids of one chunk (n bytes) written to out; returns how many, or -1
    when memory ran out."""
    cdef int64_t i, j, k, h, m, count, size = 0
    cdef int32_t best, r, a, b
    cdef uint64_t item
    if n > 0x7FFFFFFF or not _grow(sc, n):
        return -1           # (positions are int32: a 2 GiB word is refused)
    cdef int32_t* t = sc.tokens
    for i in range(n):
        t[i] = s[i]
    if n <= SHORT_CHUNK:
        # Rescan for the lowest-ranked pair and merge each occurrence, left to
        # right: O(n^2), which for a word is less than the heap's bookkeeping.
        m = n
        while m >= 2:
            best = -1
            for i in range(m - 1):
                r = _rank(keys, values, mask, t[i], t[i + 1])
                if r >= 0 and (best < 0 or r < best):
                    best = r
            if best < 0:
                break
            j = 0
            i = 0
            while i < m:
                if i + 1 < m and _rank(keys, values, mask, t[i], t[i + 1]) == best:
                    t[j] = 256 + best
                    i += 2
                else:
                    t[j] = t[i]
                    i += 1
                j += 1
            m = j
        for i in range(m):
            out[i] = t[i]
        return m
    # A long chunk: a linked list of tokens and a heap of (rank, position) for
    # each adjacent pair with a merge; stale entries are skipped when popped.
    cdef int32_t* nxt = sc.nxt
    cdef int32_t* prv = sc.prv
    for i in range(n):
        nxt[i] = <int32_t>(i + 1)
        prv[i] = <int32_t>(i - 1)
    for i in range(n - 1):
        r = _rank(keys, values, mask, t[i], t[i + 1])
        if r >= 0:
            _heap_push(sc.heap, &size, (<uint64_t>r << 32) | <uint64_t>i)
    while size > 0:
        item = _heap_pop(sc.heap, &size)
        r = <int32_t>(item >> 32)
        i = <int64_t>(item & 0xFFFFFFFFULL)
        if t[i] < 0:
            continue
        j = nxt[i]
        if j >= n or _rank(keys, values, mask, t[i], t[j]) != r:
            continue
        t[i] = 256 + r
        t[j] = -1
        k = nxt[j]
        nxt[i] = <int32_t>k
        if k < n:
            prv[k] = <int32_t>i
            a = _rank(keys, values, mask, t[i], t[k])
            if a >= 0:
                _heap_push(sc.heap, &size, (<uint64_t>a << 32) | <uint64_t>i)
        h = prv[i]
        if h >= 0:
            b = _rank(keys, values, mask, t[h], t[i])
            if b >= 0:
                _heap_push(sc.heap, &size, (<uint64_t>b << 32) | <uint64_t>h)
    count = 0
    for i in range(n):
        if t[i] >= 0:
            out[count] = t[i]
            count += 1
    return count


cdef int64_t _encode_piece(const uint8_t* s, int64_t n, const uint8_t* classes,
                           bint contractions, const uint64_t* keys, const int32_t* values,
                           uint64_t mask, CacheSlot* cache, Scratch* sc,
                           uint32_t* out) noexcept nogil:
    """Pre-split s[0:n] and write every chunk's ids to out (at most n ids).
    Returns the number of ids, or -1 when memory ran out."""
    cdef int64_t i = 0, end, length, count = 0, got
    cdef uint64_t h
    cdef CacheSlot* slot
    cdef int q
    while i < n:
        end = _chunk_end(s, i, n, classes, contractions)
        length = end - i
        if length == 1:
            out[count] = s[i]       # a single byte is its own token
            count += 1
            i = end
            continue
        if length <= CACHE_KEY:
            h = _hash_bytes(s + i, length)
            slot = &cache[h & (CACHE_SLOTS - 1)]
            if slot.hash == h and slot.n_bytes == length and memcmp(slot.key, s + i, length) == 0:
                for q in range(slot.n_ids):
                    out[count + q] = slot.ids[q]
                count += slot.n_ids
                i = end
                continue
            got = _merge_chunk(s + i, length, keys, values, mask, sc, out + count)
            if got < 0:
                return -1
            slot.hash = h
            slot.n_bytes = <uint8_t>length
            slot.n_ids = <uint8_t>got
            memcpy(slot.key, s + i, length)
            for q in range(got):
                slot.ids[q] = <uint16_t>out[count + q]
            count += got
        else:
            got = _merge_chunk(s + i, length, keys, values, mask, sc, out + count)
            if got < 0:
                return -1
            count += got
        i = end
    return count


cdef inline int64_t _char_before(const uint8_t* s, int64_t p) noexcept nogil:
    """Where the character that ends just before s[p] starts (p > 0)."""
    cdef int64_t i = p - 1
    while i > 0 and p - i < 4 and (s[i] & 0xC0) == 0x80:
        i -= 1
    return i


cdef inline bint _is_safe_cut(const uint8_t* s, int64_t p, int64_t n,
                              const uint8_t* classes) noexcept nogil:
    """Whether the pre-split always starts a chunk at s[p], and the text before
    p ends the same way whether or not the text after it is there (0 < p < n,
    p at a character boundary). Two kinds, in any script:
      * after one tab, newline, vertical tab, form feed or carriage return
        whose neighbours are not white space: that character is a chunk of
        its own (only U+0020 ever leads a word; a longer white-space run
        would hand its last character on before a word, and not at the end);
      * before a U+0020 whose neighbours are not white space: the run before
        it ends there, and the space leads the next chunk.
    No alternative of the pattern looks behind, so the chunk at p does not
    depend on what precedes it."""
    cdef int length = 0
    cdef uint8_t c = s[p - 1]
    cdef int64_t q
    if c == 9 or c == 10 or c == 11 or c == 12 or c == 13:
        if p < 2:
            return False
        q = _char_before(s, p - 1)
        return (_class_at(s, q, n, classes, &length) != SPACE
                and _class_at(s, p, n, classes, &length) != SPACE)
    if s[p] == 32 and p + 1 < n:
        q = _char_before(s, p)
        return (_class_at(s, q, n, classes, &length) != SPACE
                and _class_at(s, p + 1, n, classes, &length) != SPACE)
    return False


def last_safe_cut(const uint8_t[::1] data not None, const uint8_t[::1] classes not None):
    """The last safe cut of data (whole UTF-8 characters), or -1."""
    cdef int64_t p, n = data.shape[0]
    if classes.shape[0] != 0x110000:
        raise ValueError("classes must hold one entry per code point (0x110000)")
    if n < 2:
        return -1
    with nogil:
        p = n - 1
        while p > 0:
            if (data[p] & 0xC0) != 0x80 and _is_safe_cut(&data[0], p, n, &classes[0]):
                break
            p -= 1
    return p if p > 0 else -1


def first_safe_cut(const uint8_t[::1] data not None, int64_t start, int64_t limit,
                   const uint8_t[::1] classes not None):
    """The first safe cut p of data with start <= p < limit, or -1."""
    cdef int64_t p, n = data.shape[0]
    if classes.shape[0] != 0x110000:
        raise ValueError("classes must hold one entry per code point (0x110000)")
    if limit > n:
        limit = n
    if start < 1:
        start = 1
    cdef int64_t found = -1
    with nogil:
        p = start
        while p < limit:
            if (data[p] & 0xC0) != 0x80 and _is_safe_cut(&data[0], p, n, &classes[0]):
                found = p
                break
            p += 1
    return found


def chunk_ends(const uint8_t[::1] data not None, const uint8_t[::1] classes not None,
               bint contractions):
    """Where each pre-split chunk of data ends (a list of byte offsets): the
    state machine on its own, for tests against the regular expression."""
    cdef int64_t i = 0, n = data.shape[0]
    if classes.shape[0] != 0x110000:
        raise ValueError("classes must hold one entry per code point (0x110000)")
    ends = []
    while i < n:
        i = _chunk_end(&data[0], i, n, &classes[0], contractions)
        ends.append(i)
    return ends


# ----------------------------------------------------------------------------- characters

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


cdef inline int64_t _char_start(const uint8_t* s, int64_t i, int64_t n) noexcept nogil:
    """i moved forward to the start of a character (past continuation bytes)."""
    while i < n and (s[i] & 0xC0) == 0x80:
        i += 1
    return i


cdef inline int64_t _count_chars(const uint8_t* s, int64_t start, int64_t end) noexcept nogil:
    cdef int64_t i, count = 0
    for i in range(start, end):
        if (s[i] & 0xC0) != 0x80:
            count += 1
    return count


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
