"""Benchmark runners: throughput side by side, accuracy via the toolkit."""
