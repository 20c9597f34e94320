"""OpenExample bench: latency and detection benchmarks."""
