"""The connection to the tier's Valkey/Redis Cluster, and what it did (the metrics read it).

Every round trip goes through `Store.call`, bounded by `cluster.timeout_ms`: a store that is
down, slow or between failovers makes the call return None (counted, logged once per outage,
retried by the caller's next round), never raise into the LB node; the node goes on serving
from memory. redis-py's cluster client follows the store's topology (MOVED, ASK, a replica
promoted) by itself; after a failure the client is rebuilt from the seeds at the next call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("spoa.lbnode.cluster")


def slot_key(namespace: str, slot: int) -> str:
    """The store key of a slot's state, `NS:{NS.SLOT}:rows` (one hash; the braces are the hash
    tag: the whole slot is one key on one shard, one command writes it)."""
    return f"{namespace}:{{{namespace}.{slot}}}:rows"


@dataclass
class StoreStats:
    calls: int = 0
    errors: int = 0  # calls that failed or timed out
    unreachable: bool = False  # the last call failed
    write_batches: int = 0  # pipelined writes of an interval's changes
    write_commands: int = 0  # store commands in them
    write_bytes: int = 0  # payload bytes of them (field names and values)
    write_errors: int = 0  # batches not acknowledged (kept, sent with the next)
    stale_writes: int = 0  # slot writes the store refused: another node owns the slot now
    write_seconds: float = 0.0  # summed latency of the acknowledged batches
    last_write_seconds: float = 0.0
    load_batches: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0  # summed time of the loads of gained slots
    rows_written: int = 0
    rows_loaded: int = 0
    rows_refused: int = 0  # stored rows not adopted: their layout differs from this node's
    rings_inexact: int = 0  # loaded records whose ring could not be continued exactly (2 chunks lost)


def bulk(arg: bytes) -> bytes:
    """A short argument as one RESP bulk string (its length, it, the line end)."""
    return b"$%d\r\n%s\r\n" % (len(arg), arg)


def resp(args: list) -> list:
    """A command in the store's wire format (RESP arrays of bulk strings), for Store.packed: its
    pieces, the arguments (bytes-like: the caller encodes them) among them as given (a chunk's
    records are not copied here; the socket write joins a whole shard's pieces once)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return parts


class ReplyError(Exception):
    """The store answered a packed command with an error (MOVED, NOSCRIPT, ...)."""


async def read_integers(reader: asyncio.StreamReader, count: int) -> list[int]:
    """`count` integer replies (`:N\\r\\n`) read off a connection in as many reads as the socket
    gives them, not one parse per reply; an error reply (`-...`) or anything else raises."""
    lines: list[bytes] = []
    rest = b""
    while len(lines) < count:
        data = await reader.read(1 << 16)
        if not data:
            raise ConnectionError("store closed the connection")
        *complete, rest = (rest + data).split(b"\r\n")
        lines += complete
    if rest or len(lines) > count:
        raise ReplyError("more replies than commands: the connection is out of step")
    if lines.count(b":1") == count:  # the usual answer: every write applied
        return [1] * count
    replies = []
    for line in lines:
        if line[:1] != b":":  # an error (or a reply the caller did not expect): the call fails
            raise ReplyError(line.decode(errors="replace"))
        replies.append(int(line[1:]))
    return replies


def parse_seed(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Store:
    """The cluster client, made at first use and rebuilt after a failure."""

    def __init__(self, seeds: list[str], timeout_ms: int) -> None:
        if not seeds:
            raise ValueError("cluster.store: no seed node given")
        self.seeds = [parse_seed(seed) for seed in seeds]
        self.timeout = timeout_ms / 1000
        self.stats = StoreStats()
        self._client: Any = None
        self._scripts: dict[str, str] = {}  # script -> its SHA1, loaded on the current client's primaries
        # key -> its primary, as the current client found it: a topology change (a failover,
        # resharding) answers MOVED, which fails the call and drops the client, and this with it
        self._nodes: dict[str, Any] = {}

    def _make_client(self) -> Any:
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        from redis.backoff import NoBackoff
        from redis.asyncio.retry import Retry

        # No retries inside redis-py: a round is bounded by our timeout, and the next
        # round is the retry (with what changed meanwhile).
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in self.seeds],
                            socket_timeout=self.timeout, socket_connect_timeout=self.timeout,
                            retry=Retry(NoBackoff(), 0), require_full_coverage=False)

    async def call(self, what: str, operation: Callable[[Any], Awaitable[Any]]) -> Any:
        """operation(client)'s result, or None when the store did not answer in time (counted)."""
        stats = self.stats
        stats.calls += 1
        try:
            if self._client is None:
                self._client = self._make_client()
            result = await asyncio.wait_for(operation(self._client), self.timeout)
        except Exception as exc:  # any failure of the store is one: served from memory, retried
            stats.errors += 1
            if not stats.unreachable:
                log.warning("store unreachable (%s: %s: %s); serving from memory, retrying", what,
                            type(exc).__name__, exc)
            stats.unreachable = True
            await self._drop_client()
            return None
        if stats.unreachable:
            log.warning("store reachable again (%s)", what)
            stats.unreachable = False
        return result

    async def pipeline(self, what: str, build: Callable[[Any], None]) -> list | None:
        """One pipeline (no transaction: its commands go to their shards in parallel) that
        `build(pipe)` fills; its replies, or None (see call). A command that failed fails it."""

        async def run(client: Any) -> list:
            pipe = client.pipeline(transaction=False)
            build(pipe)
            return await pipe.execute(raise_on_error=True)

        return await self.call(what, run)

    async def packed(self, what: str, commands: list[tuple[str, list]]) -> list | None:
        """Commands already in the wire format (`resp`), each with its key and an integer reply
        (the state write's script): each primary's share written at once on one of its
        connections and its replies read back in bulk (`read_integers`), the primaries in
        parallel; the replies in the order of `commands`, or None (see call).

        redis-py's cluster pipeline costs about 30 µs of Python per command (arguments encoded,
        the slot found twice, the reply routed back), and its `read_response` several µs more
        per reply (a timeout scope each); here the replies of a primary are a few reads of its
        socket. An error reply (MOVED after a failover or resharding, NOSCRIPT) fails the whole call like
        any store failure: the client is rebuilt on the new topology and the caller's next round
        sends again (its writes are idempotent under their epoch)."""

        async def run(client: Any) -> list:
            await client.initialize()  # a no-op once the topology is known
            # each primary's commands (their indexes) and their pieces, in order
            shards: dict[str, tuple[Any, list[int], list]] = {}
            nodes = self._nodes
            for i, (key, command) in enumerate(commands):
                node = nodes.get(key)
                if node is None:
                    node = nodes[key] = client.get_node_from_key(key)
                shard_of = shards.get(node.name)
                if shard_of is None:
                    shard_of = shards[node.name] = (node, [], [])
                shard_of[1].append(i)
                shard_of[2].extend(command)
            replies: list = [None] * len(commands)

            async def shard(node: Any, indexes: list[int], pieces: list) -> None:
                connection = node.acquire_connection()
                try:
                    if not connection.is_connected:
                        await connection.connect()
                    # written as one view: asyncio's writelines would join the pieces into
                    # bytes, and its write copy what the socket did not take once more as bytes
                    # before buffering it (≈ 30 MB an interval at 100,000 connections)
                    connection._writer.write(memoryview(b"".join(pieces)))
                    await connection._writer.drain()
                    # redis-py's parser has nothing buffered here: every earlier use of this
                    # connection read its replies whole, and a failed one dropped the client
                    for i, reply in zip(indexes, await read_integers(connection._reader, len(indexes))):
                        replies[i] = reply
                finally:
                    node.release(connection)

            tasks = [asyncio.ensure_future(shard(*shard_of)) for shard_of in shards.values()]
            try:
                await asyncio.gather(*tasks)
            except BaseException:  # one shard failed: the others stop too (the client is dropped next)
                for task in tasks:
                    task.cancel()
                raise
            return replies

        return await self.call(what, run)

    async def script(self, script: str) -> str | None:
        """The SHA1 to EVALSHA `script` by: SCRIPT LOAD on every primary once per client, so each
        write sends 40 bytes instead of the script and the store does not hash it each time. A
        primary without it (promoted replica, restarted node) answers NOSCRIPT: that write fails
        like any store failure, the client is rebuilt and the script loaded again before the next.
        None when the store did not answer."""
        sha = self._scripts.get(script)
        if sha is None:
            sha = await self.call("script load", lambda client: client.script_load(script))
            if sha is not None:
                self._scripts[script] = sha
        return sha

    async def _drop_client(self) -> None:
        self._scripts.clear()
        self._nodes.clear()
        client, self._client = self._client, None
        if client is not None:
            try:
                await asyncio.wait_for(client.aclose(), self.timeout)
            except Exception:  # closing a broken client may fail too; it is dropped either way
                pass

    async def close(self) -> None:
        await self._drop_client()
