"""The TensorRT-LLM engine step inside Triton: the fan-out in front of the `tensorrtllm` backend, and
the engine directory's contract (what its logits mean) shared with the builder and the supervisor."""
