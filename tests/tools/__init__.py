"""Tests of the tools (spoa.tools) and the shipped HAProxy and Docker files."""
