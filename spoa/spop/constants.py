"""SPOP protocol constants shared by both codec twins and the server.

Values are HAProxy's (include/haproxy/spoe-t.h, doc/SPOE.txt); see
../shared/notes/spop.md for the per-version notes behind each one.
"""

from enum import IntEnum

SPOP_VERSION = "2.0"
LENGTH_PREFIX_SIZE = 4
# type(1) + flags(4) + stream-id varint(>=1) + frame-id varint(>=1): HAProxy
# rejects anything shorter, so do we.
MIN_FRAME_LENGTH = 7
# HAProxy accepts an agent max-frame-size in [256, announced]; 16380 is its
# default announcement (tune.bufsize 16384 - 4).
MIN_MAX_FRAME_SIZE = 256
HAPROXY_DEFAULT_MAX_FRAME_SIZE = 16380
MAX_VARINT_BYTES = 10

FLAG_FIN = 0x00000001
FLAG_ABORT = 0x00000002


class FrameType(IntEnum):
    UNSET = 0  # continuation fragment of a 2.x fragmented NOTIFY
    HAPROXY_HELLO = 1
    HAPROXY_DISCONNECT = 2
    NOTIFY = 3
    AGENT_HELLO = 101
    AGENT_DISCONNECT = 102
    ACK = 103


class DataType(IntEnum):
    NULL = 0
    BOOL = 1
    INT32 = 2
    UINT32 = 3
    INT64 = 4
    UINT64 = 5
    IPV4 = 6
    IPV6 = 7
    STRING = 8
    BINARY = 9


class ActionType(IntEnum):
    SET_VAR = 1
    UNSET_VAR = 2


class Scope(IntEnum):
    PROC = 0
    SESS = 1
    TXN = 2
    REQ = 3
    RES = 4


class Status(IntEnum):
    """DISCONNECT status codes (doc/SPOE.txt section 3.5)."""

    NORMAL = 0
    IO_ERROR = 1
    TIMEOUT = 2
    TOO_BIG = 3
    INVALID = 4
    NO_VERSION = 5
    NO_MAX_FRAME_SIZE = 6
    NO_CAPABILITIES = 7
    BAD_VERSION = 8
    BAD_FRAME_SIZE = 9
    FRAG_NOT_SUPPORTED = 10
    INTERLACED_FRAMES = 11
    FRAME_ID_NOT_FOUND = 12
    RESOURCE = 13
    UNKNOWN = 99


STATUS_MESSAGES = {
    Status.NORMAL: "normal",
    Status.IO_ERROR: "I/O error",
    Status.TIMEOUT: "a timeout occurred",
    Status.TOO_BIG: "frame is too big",
    Status.INVALID: "invalid frame received",
    Status.NO_VERSION: "version value not found",
    Status.NO_MAX_FRAME_SIZE: "max-frame-size value not found",
    Status.NO_CAPABILITIES: "capabilities value not found",
    Status.BAD_VERSION: "unsupported version",
    Status.BAD_FRAME_SIZE: "max-frame-size too big or too small",
    Status.FRAG_NOT_SUPPORTED: "payload fragmentation is not supported",
    Status.INTERLACED_FRAMES: "invalid interlaced frames",
    Status.FRAME_ID_NOT_FOUND: "frame-id not found",
    Status.RESOURCE: "resource allocation error",
    Status.UNKNOWN: "an unknown error occurred",
}
