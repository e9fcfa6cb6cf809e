# cython: language_level=3
"""Building the frozen record dataclasses of spoa/wire/records.py fast.

Their generated __init__ stores each field with object.__setattr__, which
costs ~0.15 µs a field: it dominated packet decoding (a 16-segment record is
127 fields) and the tracker's publish(). We do what it does, minus the
Python frames: allocate with the type's tp_new, then store each field
through its __slots__ member descriptor. Used only when the classes look
exactly as expected (slots dataclasses, these fields, no __post_init__,
object's __new__); otherwise the constructors are called. tests check
FAST_RECORDS.

The records built here are taken off the cyclic GC's lists: they hold only
ints, str, bytes and a tuple of segment records, and are frozen, so they can
never be part of a reference cycle; a publish() of 100k connections makes
300k of them, and each would otherwise count toward (and be walked by) the
collections they trigger.

Not a twin of records.py: the compiled packet codec and tracker cimport these
constructors; their pure-Python twins call the dataclasses themselves.
"""

from cpython.object cimport PyObject, PyTypeObject, Py_TYPE, descrsetfunc, newfunc

import dataclasses
import types

from spoa.wire.records import ConnectionRecord, PacketHeader, SegmentRecord

cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object o)
    bint PyObject_GC_IsTracked(object o)
    bint PyTuple_CheckExact(object o)

SEG_FIELDS = ("direction", "start_byte_offset", "byte_count", "bytes_transferred", "packets_transferred",
              "timestamp_last_activity_ms", "level")
CONN_FIELDS = ("conn_id", "src", "src_port", "dst", "dst_port", "frontend", "flags", "counter_source",
               "granularity_level", "requested_lease_ms", "predicted_lease_ms", "lease_source", "bytes_in_total",
               "bytes_out_total", "segments")
HEADER_FIELDS = ("node_id", "sequence", "timestamp_ms", "interval_ms", "flags")


def _slot_descriptors(cls, names):
    """The member descriptors of cls's fields in `names` order, or None."""
    if (not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__") or cls.__new__ is not object.__new__
            or tuple(f.name for f in dataclasses.fields(cls)) != names):
        return None
    descriptors = [cls.__dict__.get(name) for name in names]
    if not all(type(d) is types.MemberDescriptorType for d in descriptors):
        return None
    return descriptors


cdef list SEG_DESCRS = _slot_descriptors(SegmentRecord, SEG_FIELDS)
cdef list CONN_DESCRS = _slot_descriptors(ConnectionRecord, CONN_FIELDS)
cdef list HEADER_DESCRS = _slot_descriptors(PacketHeader, HEADER_FIELDS)
FAST_RECORDS = SEG_DESCRS is not None and CONN_DESCRS is not None and HEADER_DESCRS is not None
cdef bint FAST = FAST_RECORDS
cdef descrsetfunc MEMBER_SET = Py_TYPE(SEG_DESCRS[0]).tp_descr_set if FAST else NULL
cdef newfunc SEG_NEW = (<PyTypeObject *>SegmentRecord).tp_new
cdef newfunc CONN_NEW = (<PyTypeObject *>ConnectionRecord).tp_new
cdef newfunc HEADER_NEW = (<PyTypeObject *>PacketHeader).tp_new
cdef tuple NO_ARGS = ()


cdef object new_segment(object direction, object start, object byte_count, object transferred, object packets,
                        object last, object level):
    cdef object seg
    cdef list d = SEG_DESCRS
    if not FAST:
        return SegmentRecord(direction, start, byte_count, transferred, packets, last, level)
    seg = SEG_NEW(SegmentRecord, <PyObject *>NO_ARGS, NULL)
    MEMBER_SET(d[0], seg, direction)
    MEMBER_SET(d[1], seg, start)
    MEMBER_SET(d[2], seg, byte_count)
    MEMBER_SET(d[3], seg, transferred)
    MEMBER_SET(d[4], seg, packets)
    MEMBER_SET(d[5], seg, last)
    MEMBER_SET(d[6], seg, level)
    PyObject_GC_UnTrack(seg)
    return seg


cdef object new_header(object node_id, object sequence, object timestamp_ms, object interval_ms, object flags):
    cdef object header
    cdef list d = HEADER_DESCRS
    if not FAST:
        return PacketHeader(node_id, sequence, timestamp_ms, interval_ms, flags)
    header = HEADER_NEW(PacketHeader, <PyObject *>NO_ARGS, NULL)
    MEMBER_SET(d[0], header, node_id)
    MEMBER_SET(d[1], header, sequence)
    MEMBER_SET(d[2], header, timestamp_ms)
    MEMBER_SET(d[3], header, interval_ms)
    MEMBER_SET(d[4], header, flags)
    PyObject_GC_UnTrack(header)
    return header


cdef object new_connection(tuple values):
    """A ConnectionRecord from its 15 field values in CONN_FIELDS order; the
    last, its segments, a tuple of records made by new_segment."""
    cdef object rec
    cdef list d = CONN_DESCRS
    cdef Py_ssize_t k
    if not FAST:
        return ConnectionRecord(*values)
    rec = CONN_NEW(ConnectionRecord, <PyObject *>NO_ARGS, NULL)
    for k in range(15):
        MEMBER_SET(d[k], rec, values[k])
    segments = values[14]
    if PyTuple_CheckExact(segments) and PyObject_GC_IsTracked(segments):
        PyObject_GC_UnTrack(segments)  # holds untracked segment records only
    PyObject_GC_UnTrack(rec)
    return rec
