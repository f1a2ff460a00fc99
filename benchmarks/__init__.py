"""Scripts that print figures (run with python -m benchmarks.<name>); not tests."""
