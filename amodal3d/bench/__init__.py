"""Benchmarks: results table and speed figures."""
