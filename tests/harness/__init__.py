"""The server and scenario harness that the tests and the benchmarks share: real `python -m app` processes on
loopback ports, and the drivers that load them."""
