"""Tests of the wire formats (spoa.wire)."""
