# Declarations of the SPOP codec (bodies in _codec.pyx). The pure-Python twin
# is spoa/spop/_codec_py.py; both must behave identically.

from libc.stdint cimport uint8_t, uint32_t, uint64_t


cdef enum:
    # SPOP data types (the low 4 bits of a typed value's tag) and action types
    T_NULL = 0
    T_BOOL = 1
    T_INT32 = 2
    T_UINT32 = 3
    T_INT64 = 4
    T_UINT64 = 5
    T_IPV4 = 6
    T_IPV6 = 7
    T_STRING = 8
    T_BINARY = 9
    A_SET_VAR = 1
    A_UNSET_VAR = 2


cdef class Message:
    cdef readonly str name          # SPOE message name, as configured in the spoe-message section
    cdef readonly int nargs         # argument count HAProxy announced (one byte on the wire)
    cdef bytes _buf                 # receive buffer the arguments live in (referenced, never copied)
    cdef Py_ssize_t _start          # offset of the first argument in _buf
    cdef Py_ssize_t _end            # offset just past the last argument
    cdef dict _args                 # name -> value, built on the first access to .args


cdef class Frame:
    cdef readonly int type          # frame type byte (FrameType)
    cdef readonly uint32_t flags    # FIN / ABORT bits
    cdef readonly uint64_t stream_id  # 2.x: HAProxy stream uniq_id; 3.1+: odd per-connection counter
    cdef readonly uint64_t frame_id   # 2.x: 1, 2, ... per stream; 3.1+: always 1
    cdef bytes _buf                 # buffer holding the payload (the receive chunk itself when possible)
    cdef Py_ssize_t _start          # payload start offset in _buf
    cdef Py_ssize_t _end            # payload end offset in _buf


cdef class FrameReader:
    cdef public Py_ssize_t max_frame_size  # frames with a longer length prefix are refused before buffering
    cdef bytes _buf                 # current receive chunk; complete frames are decoded from it in place
    cdef Py_ssize_t _pos            # first unconsumed byte of _buf
    cdef bytearray _acc             # a frame split across chunks, gathered until it is whole (else None)

    cdef int _settle(self) except -1


cdef class FrameWriter:
    cdef char *_data                # output bytes (malloc'd, grows by doubling)
    cdef Py_ssize_t _len            # bytes written
    cdef Py_ssize_t _cap            # bytes allocated
    cdef Py_ssize_t _frame_start    # offset of the open frame's length prefix, -1 when none is open

    cdef int _reserve(self, Py_ssize_t extra) except -1
    cdef int _put_raw(self, const char *data, Py_ssize_t size) except -1
    cdef int _put_byte(self, uint8_t value) except -1
    cdef int _put_varint(self, uint64_t value) except -1
    cdef int _put_name(self, object name) except -1
    cdef int _put_typed(self, object value) except -1
    cdef int _put_typed_as(self, int dtype, object value) except -1


cdef struct ArgView:
    # One argument of a Message as find_args() saw it, read in place (no object built).
    int dtype                       # SPOP data type of its value; -1 when the message has no such argument
    Py_ssize_t at                   # offset of the value's tag in the message's buffer
    const uint8_t *data             # IPv4/IPv6: the address bytes; STRING/BINARY: the bytes; else NULL
    Py_ssize_t size                 # bytes at data (4, 16, or the string's length)
    uint64_t value                  # integer types: the varint as read (INT32/INT64: two's complement)


# The values of names[0..count) (UTF-8, sizes[i] bytes each) into out[0..count), in one pass
# over the arguments that stops once all are found: the same pass, the same errors for a
# malformed message, and the same first-argument-of-a-name-wins rule as Message.get_addresses.
cdef int find_args(Message message, const char **names, const Py_ssize_t *sizes, Py_ssize_t count,
                   ArgView *out) except -1


cdef class NativeHandler:
    # A message handler the agent's message loop calls in C, without a Python call per
    # message (_write_ack); calling the object from Python does the same.
    cdef int answer(self, Message message, FrameWriter out) except -1
