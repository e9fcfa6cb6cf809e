"""Tests of the SPOP codec, protocol and server (spoa.spop)."""
