"""Helpers of the GPU verification script `bench/gpu_check.py` (see docs/gpu.md)."""
