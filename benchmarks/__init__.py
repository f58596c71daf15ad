"""Benchmarks: each times the project against a reference in the same run and prints ratios.

Run one as `python -m benchmarks.<name>`; its last line is its headline, `name=value`.
"""
