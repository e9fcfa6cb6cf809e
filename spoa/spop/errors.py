"""Errors raised by the SPOP codec and server.

The message texts live here so that the Cython codec and its pure-Python twin
raise byte-identical errors (the differential tests compare them).
"""

from .constants import Status


class SpopError(Exception):
    """A protocol violation; `status` is the DISCONNECT code to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = Status(status)
        self.detail = detail

    def __repr__(self) -> str:
        return f"SpopError({self.status.name}, {self.detail!r})"


E_FRAME_TOO_BIG = "frame length exceeds max-frame-size"
E_FRAME_TOO_SHORT = "frame length below the 7-byte minimum"
E_TRUNCATED_VARINT = "truncated varint"
E_VARINT_TOO_LONG = "varint longer than 10 bytes or above 2^64-1"
E_TRUNCATED_STRING = "string length runs past the end of the payload"
E_TRUNCATED_DATA = "typed data runs past the end of the payload"
E_UNKNOWN_DATA_TYPE = "unknown typed-data type"
E_TRUNCATED_MESSAGE = "message runs past the end of the payload"
E_BAD_ACTION = "unknown action type or wrong argument count"
