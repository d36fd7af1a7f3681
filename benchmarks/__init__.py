"""Benchmarks and the citeulike-a reproduction; each script runs as `python benchmarks/<name>.py` or
`python -m benchmarks.<name>` from the repository root."""
