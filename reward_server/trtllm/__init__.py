"""TensorRT-LLM engine path: checkpoint adaptation for the engine builder and the launcher."""
