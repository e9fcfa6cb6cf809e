"""The LB node: receives publishing packets, keeps per-connection and per-segment
history, forecasts, grants leases and sends hints back. Loads no SPOP module."""
