# The merge loop: one pre-split chunk's bytes to ids by the merges in rank
# order, and a per-thread cache of recent words (included by _native.pyx).

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
