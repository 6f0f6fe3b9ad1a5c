"""The load benchmark harness: ``python -m benchmarks.run [--quick]``."""
