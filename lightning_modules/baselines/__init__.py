"""Classic baselines trained and benchmarked with the same data and metrics."""
