"""Speed, memory and accuracy harnesses (run as ``python -m benchmarks.<name>``)."""
