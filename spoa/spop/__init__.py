"""SPOP, the protocol HAProxy's SPOE speaks to an agent: codec, frames, the
per-connection protocol, the listening server, the handler API and its stats.
Knows nothing of leases; the server node (spoa.servernode) plugs in as a handler."""
