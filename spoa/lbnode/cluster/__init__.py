"""The LB-node tier on a Valkey/Redis Cluster (issue 13), one job per module.

- slots: connection -> ownership slot (the store's CRC16 of the connection's key), slot ->
  owner among the live LB nodes (rendezvous hashing), and the store keys of each.
- rows: a held connection's whole state (the table's columns and every per-row array of
  its forecaster, lease policy and history) as one fixed-size blob, and back.
- store: the store connection and its counters (writes, loads, errors, latency).
- membership: this node's membership key under its own lease; the live set; fencing.
- writer: per interval, per owned slot, one pipelined hash write of what changed.
- loader: on gaining a slot, its state loaded and adopted before anything expires.

Without lbnode `cluster.store` none of this is imported: the LB node runs alone in memory.
"""
