"""`reward-server build-engine`: adapt a reward checkpoint for TensorRT-LLM, check the inputs, and run
its converter and trtllm-build into an engine directory the supervisor serves."""
