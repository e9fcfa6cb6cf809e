"""Tests of what runs next to HAProxy (spoa.servernode)."""
