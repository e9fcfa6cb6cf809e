"""Agent counters: plain ints bumped on the hot path, read by metrics and tests."""

from __future__ import annotations

from collections import Counter

# Upper bounds of the pipeline-depth histogram buckets (NOTIFY frames that
# were outstanding together, i.e. decoded from one read before any ACK).
DEPTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class AgentStats:
    __slots__ = (
        "connections_total",
        "connections_active",
        "connections_refused",
        "hellos",
        "healthchecks",
        "frames_in",
        "frames_out",
        "bytes_in",
        "bytes_out",
        "notify_frames",
        "fragments",
        "messages",
        "acks",
        "unknown_messages",
        "handler_errors",
        "handler_timeouts",
        "acks_truncated",
        "inflight",
        "max_inflight",
        "max_pipeline_depth",
        "pipeline_depth",
        "errors",
        "disconnects_received",
        "resets",
        "eof_mid_frame",
        "idle_timeouts",
        "frame_timeouts",
        "buffer_budget_closes",
        "buffered_bytes",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        # DISCONNECT status we sent -> count (one per protocol error).
        self.errors: Counter[str] = Counter()
        # DISCONNECT status HAProxy sent us -> count.
        self.disconnects_received: Counter[int] = Counter()
        # bucket upper bound -> batches (see DEPTH_BUCKETS; 0 = above the last)
        self.pipeline_depth: Counter[int] = Counter()

    def observe_depth(self, depth: int) -> None:
        if depth > self.max_pipeline_depth:
            self.max_pipeline_depth = depth
        for bound in DEPTH_BUCKETS:
            if depth <= bound:
                self.pipeline_depth[bound] += 1
                return
        self.pipeline_depth[0] += 1

    def snapshot(self) -> dict:
        out = {}
        for name in self.__slots__:
            value = getattr(self, name)
            out[name] = {str(k): v for k, v in value.items()} if isinstance(value, Counter) else value
        return out
