"""Bounded-time fuzzing of the compiled codec's decoding paths.

Random bytes, frames with random payloads and mutated valid frames go, in
random chunks, through FrameReader and then kv() / messages() / actions() of
spoa.spop._codec. The only exception allowed out is SpopError: an IndexError,
MemoryError, SystemError or a crash means the C code trusted a length it
should have checked. The reader's `buffered` must also stay bounded.

Two parts share one check (fuzz_case):
- test_fuzz_time_boxed runs a seeded mutational fuzzer in a child process
  for SPOA_FUZZ_SECONDS (default 6), so that a segfault fails this test
  with the offending input instead of killing pytest;
- test_fuzz_hypothesis runs in-process and shrinks a failure to a small input.

Longer runs, outside pytest:
    PYTHONPATH=. python tests/spop/test_codec_fuzz.py --seconds 600 [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import spoa
import spoa.spop._codec_py as reference
from spoa.spop import frames
from spoa.spop.constants import LENGTH_PREFIX_SIZE, MIN_FRAME_LENGTH, FrameType, Scope, Status
from spoa.spop.errors import SpopError

REPO_ROOT = Path(spoa.__file__).resolve().parent.parent
FUZZ_SECONDS = float(os.environ.get("SPOA_FUZZ_SECONDS", "6"))
DEFAULT_MAX_FRAME_SIZE = 16380

# Bytes that mean something to the decoder: type tags 0-15, bool true, the
# varint marker and continuation edges.
INTERESTING_BYTES = [*range(0x10), 0x10, 0x11, 0x7F, 0x80, 0xEF, 0xF0, 0xFE, 0xFF]
# Length-prefix values around every check the reader makes.
INTERESTING_LENGTHS = [0, 1, 6, 7, 8, 255, 256, 16379, 16380, 16381, 2**31 - 1, 2**31, 2**32 - 1]


def build_corpus() -> list[bytes]:
    """Valid frames of every kind to mutate, built with the reference writer."""
    writer = reference.FrameWriter()
    frames.write_haproxy_hello(writer, DEFAULT_MAX_FRAME_SIZE, "", healthcheck=True)
    frames.write_haproxy_hello(writer, DEFAULT_MAX_FRAME_SIZE, "pipelining,async", engine_id="4127d137")
    frames.write_agent_hello(writer, DEFAULT_MAX_FRAME_SIZE, ["pipelining"])
    frames.write_disconnect(writer, FrameType.AGENT_DISCONNECT, Status.INVALID, "invalid frame received")
    frames.write_notify(writer, 1, 1, [])
    frames.write_notify(
        writer,
        2**64 - 1,
        2288,
        [
            ("conn", [("ip", IPv4Address("192.0.2.10")), ("port", 51234), ("ip6", IPv6Address("2001:db8::1"))]),
            (
                "edges",
                [("", None), ("t", True), ("f", False), ("neg", -1), ("big", 2**64 - 1)]
                + [("s", "x" * 250), ("b", b"\0"), ("v6", IPv6Address("::"))],
            ),
            ("empty", []),
        ],
    )
    writer.begin_frame(FrameType.ACK, 7, 1)
    writer.set_var(Scope.TXN, "lease", 30000)
    writer.set_var(Scope.SESS, "ip", IPv6Address("::1"))
    writer.set_var(Scope.REQ, "nothing", None)
    writer.unset_var(Scope.RES, "x")
    writer.end_frame()
    stream = writer.take()
    corpus = []
    while stream:
        size = LENGTH_PREFIX_SIZE + int.from_bytes(stream[:LENGTH_PREFIX_SIZE], "big")
        corpus.append(stream[:size])
        stream = stream[size:]
    return corpus


CORPUS = build_corpus()


# -- the check -----------------------------------------------------------------------


def exercise_frame(frame, max_frame_size: int) -> None:
    """Every decoding entry point of one frame; SpopError is the only way out."""
    # Header and payload must come from inside the frame the prefix announced.
    assert 0 <= frame.payload_length <= max_frame_size - MIN_FRAME_LENGTH
    assert len(frame.payload) == frame.payload_length
    repr(frame)
    for decode in (frame.kv, frame.actions):
        try:
            decode()
        except SpopError as exc:
            assert exc.status == Status.INVALID, exc
    try:
        messages = frame.messages()
    except SpopError as exc:
        assert exc.status == Status.INVALID, exc
        return
    for message in messages:
        # messages() validated every argument: reading them cannot fail now.
        items = message.items()
        assert len(items) == message.nargs == len(message)
        args = message.args
        for name, _ in items:
            assert name in args
            message.get(name)
        message.get("not-an-argument-name")
        repr(message)


def fuzz_case(codec, data: bytes, chunk_sizes: list[int], max_frame_size: int) -> None:
    """Feed `data` in chunks (the last chunk takes the rest) and decode everything."""
    # The bytes as a standalone payload first: past the reader's header checks.
    exercise_frame(codec.Frame.from_payload(FrameType.NOTIFY, 1, 1, 1, data), len(data) + MIN_FRAME_LENGTH)
    reader = codec.FrameReader(max_frame_size)
    position = 0
    for size in [*chunk_sizes, len(data)]:
        chunk = data[position : position + size]
        position += len(chunk)
        before = reader.buffered
        reader.feed(chunk)
        assert reader.buffered == before + len(chunk)
        while True:
            try:
                frame = reader.next_frame()
            except SpopError as exc:
                # The connection would close here; the prefix checks are the
                # only reader errors besides malformed header varints.
                assert exc.status in (Status.TOO_BIG, Status.INVALID), exc
                return
            if frame is None:
                break
            exercise_frame(frame, max_frame_size)
        # Drained: at most one incomplete frame is left, whose prefix
        # (4 bytes, not counted by max-frame-size) announced <= max_frame_size
        # bytes. So after the next feed, buffered <= max_frame_size + 3 + chunk.
        assert reader.buffered <= max_frame_size + LENGTH_PREFIX_SIZE - 1
        if position >= len(data):
            break


# -- seeded mutational generator (the time-boxed part) ----------------------------


def mutate(rng: random.Random, data: bytearray) -> None:
    position = rng.randrange(len(data)) if data else 0
    choice = rng.randrange(9)
    if choice == 0 and data:
        data[position] ^= 1 << rng.randrange(8)
    elif choice == 1 and data:
        data[position] = rng.choice(INTERESTING_BYTES)
    elif choice == 2:
        data[position:position] = rng.randbytes(rng.randint(1, 8))
    elif choice == 3:
        del data[position : position + rng.randint(1, 16)]
    elif choice == 4 and data:
        start = rng.randrange(len(data))
        data[position:position] = data[start : start + rng.randint(1, 32)]
    elif choice == 5:
        del data[position:]
    elif choice == 6:
        # Rewrite a length prefix, or any 4 bytes as if they were one.
        length = rng.choice(INTERESTING_LENGTHS + [len(data) - LENGTH_PREFIX_SIZE + rng.randint(-3, 3)])
        data[position : position + 4] = max(0, min(length, 2**32 - 1)).to_bytes(4, "big")
    elif choice == 7:
        data += rng.choice(CORPUS)
    else:
        # A varint where a byte was: shifts everything after it.
        value = rng.choice([239, 240, 2287, 2288, 2**32 - 1, 2**64 - 1])
        data[position : position + 1] = reference.encode_varint(value)


def generate_case(rng: random.Random) -> tuple[bytes, list[int], int]:
    kind = rng.random()
    if kind < 0.15:
        data = rng.randbytes(rng.randint(0, 64))
    elif kind < 0.4:
        # Valid header, random payload biased towards meaningful bytes.
        size = rng.randint(0, 80)
        payload = bytes(
            rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
            for _ in range(size)
        )
        body = bytes([rng.choice([1, 2, 3, 101, 102, 103])]) + b"\x00\x00\x00\x01\x01\x01" + payload
        data = len(body).to_bytes(4, "big") + body
    else:
        buffer = bytearray(b"".join(rng.choice(CORPUS) for _ in range(rng.randint(1, 3))))
        for _ in range(rng.randint(1, 6)):
            mutate(rng, buffer)
        data = bytes(buffer)
    cut = rng.random()
    if cut < 0.1:
        chunk_sizes = [1] * len(data)
    elif cut < 0.5:
        chunk_sizes = []
    else:
        chunk_sizes = [rng.randint(0, 32) for _ in range(rng.randint(1, 12))]
    # Mostly the default; sometimes just below the size of the data itself.
    near_data = [max(0, len(data) - 4), max(0, len(data) - 9)]
    max_frame_size = rng.choice([DEFAULT_MAX_FRAME_SIZE] * 4 + [0, 7, 8, 64, 256] + near_data)
    return data, chunk_sizes, max_frame_size


def run_fuzz(codec, seconds: float, seed: int, crash_file: str | None = None) -> int:
    """Fuzz until the time is up; return the number of cases run."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    crash_fd = os.open(crash_file, os.O_WRONLY | os.O_CREAT) if crash_file else None
    count = 0
    while time.monotonic() < deadline:
        for _ in range(200):  # amortise the clock reads
            data, chunk_sizes, max_frame_size = generate_case(rng)
            case = {"data": data.hex(), "chunk_sizes": chunk_sizes, "max_frame_size": max_frame_size, "case": count}
            if crash_fd is not None:
                # Left on disk for the parent if this case kills the process.
                record = json.dumps(case).encode()
                os.pwrite(crash_fd, record, 0)
                os.ftruncate(crash_fd, len(record))
            try:
                fuzz_case(codec, data, chunk_sizes, max_frame_size)
            except Exception as exc:
                raise AssertionError(f"seed={seed} {json.dumps(case)}: {type(exc).__name__}: {exc}") from exc
            count += 1
    return count


# -- pytest ---------------------------------------------------------------------------


def test_fuzz_time_boxed(compiled_codec, tmp_path):
    seed = int(os.environ.get("SPOA_FUZZ_SEED", random.randrange(2**32)))
    crash_file = tmp_path / "current-case.json"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONFAULTHANDLER="1")
    command = [sys.executable, __file__, "--seconds", str(FUZZ_SECONDS), "--seed", str(seed)]
    command += ["--crash-file", str(crash_file)]
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=FUZZ_SECONDS + 60)
    if result.returncode < 0:
        case = crash_file.read_text() if crash_file.exists() else "(no case recorded)"
        crash = signal.Signals(-result.returncode).name
        pytest.fail(f"compiled codec crashed ({crash}), seed={seed}, input: {case}\n{result.stderr}")
    assert result.returncode == 0, result.stderr[-4000:]
    # A broken loop that runs nothing must not pass: expect a real workload.
    cases = int(result.stdout.split()[-1])
    assert cases >= 1000, result.stdout


def test_fuzz_corpus_is_valid(compiled_codec):
    # The seeds must decode cleanly, or the mutations start from noise.
    assert {frame[4] for frame in CORPUS} == {1, 3, 101, 102, 103}  # every frame type was split out
    for frame_bytes in CORPUS:
        reader = compiled_codec.FrameReader(DEFAULT_MAX_FRAME_SIZE)
        reader.feed(frame_bytes)
        frame = reader.next_frame()
        if frame.type == FrameType.ACK:
            frame.actions()
        elif frame.type == FrameType.NOTIFY:
            frame.messages()
        else:
            frame.kv()
        assert reader.buffered == 0


@st.composite
def fuzz_inputs(draw):
    kind = draw(st.sampled_from(["random", "mutated"]))
    if kind == "random":
        data = draw(st.binary(max_size=100))
    else:
        buffer = bytearray(b"".join(draw(st.lists(st.sampled_from(CORPUS), min_size=1, max_size=3))))
        for _ in range(draw(st.integers(1, 5))):
            if not buffer:
                break
            position = draw(st.integers(0, len(buffer) - 1))
            operation = draw(st.sampled_from(["set", "insert", "delete", "cut", "length"]))
            if operation == "set":
                buffer[position] = draw(st.sampled_from(INTERESTING_BYTES) | st.integers(0, 255))
            elif operation == "insert":
                buffer[position:position] = draw(st.binary(min_size=1, max_size=6))
            elif operation == "delete":
                del buffer[position : position + draw(st.integers(1, 8))]
            elif operation == "cut":
                del buffer[position:]
            else:
                buffer[position : position + 4] = draw(st.sampled_from(INTERESTING_LENGTHS)).to_bytes(4, "big")
        data = bytes(buffer)
    chunk_sizes = draw(st.lists(st.integers(0, 24), max_size=10))
    max_frame_size = draw(st.one_of(st.just(DEFAULT_MAX_FRAME_SIZE), st.sampled_from([0, 7, 8, 64, 256])))
    return data, chunk_sizes, max_frame_size


@settings(max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=fuzz_inputs())
@example(case=(b"\xff\xff\xff\xff" + b"\x00" * 8, [1, 1, 1, 1], DEFAULT_MAX_FRAME_SIZE))
@example(case=(b"\x00\x00\x00\x07\x03\x00\x00\x00\x01\xf0\x80", [], DEFAULT_MAX_FRAME_SIZE))
@example(case=(b"\x00\x00\x00\x0d\x03\x00\x00\x00\x01\x01\x01\x01m\x01\x01a\x09\xff", [5], 64))
def test_fuzz_hypothesis(compiled_codec, case):
    fuzz_case(compiled_codec, *case)


# -- standalone runner (also what test_fuzz_time_boxed starts) -------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=FUZZ_SECONDS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--crash-file", help="keep the case being run here, for post-mortem on a crash")
    parser.add_argument("--python", action="store_true", help="fuzz the pure-Python twin instead")
    options = parser.parse_args()
    seed = random.randrange(2**32) if options.seed is None else options.seed
    if options.python:
        codec = reference
    else:
        import spoa.spop._codec as codec
    count = run_fuzz(codec, options.seconds, seed, options.crash_file)
    print(f"seed={seed} cases {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
