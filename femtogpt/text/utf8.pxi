# The UTF-8 walk every pass shares (included by _native.pyx: see there why
# these are .pxi files). Input is valid UTF-8, checked by Python first; the
# helpers never read past n whatever the bytes are.


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


cdef inline int64_t _char_before(const uint8_t* s, int64_t p) noexcept nogil:
    """Where the character that ends just before s[p] starts (p > 0)."""
    cdef int64_t i = p - 1
    while i > 0 and p - i < 4 and (s[i] & 0xC0) == 0x80:
        i -= 1
    return i


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
