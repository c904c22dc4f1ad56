# The pre-split as a state machine over UTF-8, and the safe cuts where a text
# may be cut into independent pieces (included by _native.pyx).

cdef enum:
    LETTER = 0
    NUMBER = 1
    SPACE = 2
    OTHER = 3


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
