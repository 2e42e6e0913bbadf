"""Throughput benchmarks of the reward server against baselines; see bench/README.md."""
