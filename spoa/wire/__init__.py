"""What the server node and the LB node exchange: the records, the publishing
packet, lease hints and the TCP framing of both. Imported by both processes, so
it imports neither (no spoa.spop, spoa.servernode or spoa.lbnode)."""
