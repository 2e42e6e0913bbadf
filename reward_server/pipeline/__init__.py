"""The in-stub pipeline: what runs inside Triton's Python-backend stubs, what the model.py files import.

Preprocessing (chat, stages), the engine step (torch_engine, or trtllm's fan-out in front of the
TensorRT-LLM backend), postprocessing (scoring), and the adapters between them and Triton
(triton_io, settings, metrics, drain). The reward model's own rules (heads, chat templates, step
tags, score arithmetic) live here too, so the supervisor and the builder check options with the very
code that serves them. Nothing here imports the supervisor, the builder, the gateway or the CLI.
"""
