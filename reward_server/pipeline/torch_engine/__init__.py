"""The PyTorch engine: packed rows, shared prompts computed once, fused decoder layers, and the
native attention kernel built for the CPU at hand."""
