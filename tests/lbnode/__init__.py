"""Tests of the LB node (spoa.lbnode)."""
