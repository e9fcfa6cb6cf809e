# Byte-order loads and stores and 16-byte addresses, shared by the compiled modules
# (spop._codec, wire._packet, servernode._tracker, servernode._sampler). Inline only:
# each cimporting module compiles its own copy, so there is no module to build or import.
#
# The buffers these read and write are unaligned (frames, datagrams, netlink
# messages, keys): big-endian values go byte by byte, host-order ones through
# memcpy, which the compiler turns into one unaligned load.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, strlen
from cpython.exc cimport PyErr_Clear, PyErr_ExceptionMatches
from cpython.unicode cimport PyUnicode_DecodeASCII

cdef extern from "<arpa/inet.h>" nogil:
    int AF_INET, AF_INET6
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, unsigned int size)

cdef extern from "Python.h":
    # Declared without `except NULL`: address_chars sorts the error out itself,
    # cheaper than a try block on the per-message path (pack_key).
    const char *utf8_or_null "PyUnicode_AsUTF8AndSize"(object text, Py_ssize_t *size)

cdef extern from *:
    """
    /* The first 12 bytes of an IPv4-mapped IPv6 address (::ffff:a.b.c.d): how keys,
       records and packets hold IPv4 in 16 bytes. */
    static const unsigned char SPOA_V4_MAPPED[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    """
    const uint8_t SPOA_V4_MAPPED[12]


# -- big-endian (network order) --------------------------------------------------------

cdef inline uint16_t load_be16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]

cdef inline uint32_t load_be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]

cdef inline uint64_t load_be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>load_be32(p) << 32) | load_be32(p + 4)

cdef inline void store_be16(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v

cdef inline void store_be32(uint8_t *p, uint64_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>(v >> 16)
    p[2] = <uint8_t>(v >> 8)
    p[3] = <uint8_t>v

cdef inline void store_be64(uint8_t *p, uint64_t v) noexcept nogil:
    store_be32(p, v >> 32)
    store_be32(p + 4, v)


# -- host order (kernel structures, hashing) -----------------------------------------

cdef inline uint32_t load_u32(const uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v

cdef inline uint64_t load_u64(const uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


# -- 16-byte addresses (IPv4 mapped) ---------------------------------------------------

cdef inline bint is_v4_mapped(const uint8_t *a) noexcept nogil:
    return memcmp(a, SPOA_V4_MAPPED, 12) == 0

cdef inline void put_v4_mapped(uint8_t *out, const uint8_t *a4) noexcept nogil:
    """The 16-byte form of a 4-byte IPv4 address."""
    memcpy(out, SPOA_V4_MAPPED, 12)
    memcpy(out + 12, a4, 4)

cdef inline const char *address_chars(object text) except? NULL:
    """text (a str) as the C string inet_pton reads, or NULL when it cannot be an address:
    not UTF-8 encodable (a lone surrogate), or an embedded NUL (C would stop
    there; Python's socket.inet_pton refuses it)."""
    cdef Py_ssize_t size
    cdef const char *s = utf8_or_null(text, &size)
    if s is NULL:
        if PyErr_ExceptionMatches(UnicodeError):
            PyErr_Clear()
        return NULL  # any other error (MemoryError) stays set and propagates
    return s if <size_t>size == strlen(s) else NULL

cdef inline bint pton_ipv4(const char *s, uint8_t *out) noexcept nogil:
    """IPv4 text -> its 16-byte (mapped) form in out; False when s is not IPv4."""
    if inet_pton(AF_INET, s, out + 12) != 1:
        return False
    memcpy(out, SPOA_V4_MAPPED, 12)
    return True

cdef inline bint pton_ipv6(const char *s, uint8_t *out) noexcept nogil:
    return inet_pton(AF_INET6, s, out) == 1

cdef inline str address_text(const uint8_t *a, bint ipv4):
    """Text of a 16-byte address: dotted IPv4 from its last 4 bytes when ipv4, else IPv6."""
    cdef char buf[48]  # >= INET6_ADDRSTRLEN (46)
    if ipv4:
        inet_ntop(AF_INET, a + 12, buf, sizeof(buf))
    else:
        inet_ntop(AF_INET6, a, buf, sizeof(buf))
    return PyUnicode_DecodeASCII(buf, strlen(buf), NULL)
