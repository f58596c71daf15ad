"""Benchmarks: each times the project against a reference in the same run and prints ratios.

Run one as `python -m benchmarks.<name>`; it prints readable lines and ends with its headline,
`name=value`. Timings are never asserted in tests.

On a shared machine (a VM whose host is busy) single runs can be several times slower than the rest;
the scripts print each candidate's fastest and slowest repeat beside the median so a noisy run shows.
"""
