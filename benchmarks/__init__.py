"""Benchmarks and the citeulike-a reproduction; each runs as `python -m benchmarks.<name>` from the repository root
(the harness they share with the tests, tests/harness/, is imported from there)."""
