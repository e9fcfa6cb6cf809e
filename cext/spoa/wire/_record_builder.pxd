# Fast constructors of the frozen record dataclasses of spoa/wire/records.py, shared
# by the compiled modules that build records (bodies and the why: _record_builder.pyx).

cdef object new_segment(object direction, object start, object byte_count, object transferred, object packets,
                        object last, object level)
cdef object new_header(object node_id, object sequence, object timestamp_ms, object interval_ms, object flags)
cdef object new_connection(tuple values)
