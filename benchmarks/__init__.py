"""Benchmarks: our exporter beside upstream Jumpstarter 0.9 (benchmarks/README.md)."""
