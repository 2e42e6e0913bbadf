# syntax=docker/dockerfile:1
# GPU image: NVIDIA's Triton + TensorRT-LLM container (TensorRT-LLM 1.2.1, Python 3.12) with this
# project installed on top. Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile -t reward-server-gpu:0.1.0 .
# One pinned tag: engines built by one TensorRT-LLM version only load in the same version, so the
# engine-build Job and the servers must use the same image.
FROM nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
COPY deploy/docker/gpu-requirements.txt /opt/reward-server/deploy/docker/gpu-requirements.txt
# torch, transformers, tokenizers, safetensors and numpy come with the base image (TensorRT-LLM
# needs them). Add only what it lacks, constrained to what it already has, so that nothing of
# the base is up- or downgraded: a conflict fails the build instead of breaking TensorRT-LLM.
RUN python3 -m pip list --format=freeze --exclude-editable > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt -r /opt/reward-server/deploy/docker/gpu-requirements.txt \
 && rm /tmp/base-constraints.txt
COPY pyproject.toml README.md /opt/reward-server/
COPY reward_server /opt/reward-server/reward_server
COPY model_repository /opt/reward-server/model_repository
# The wheel (package and model repository), without dependencies: the pinned CPU stack of
# pyproject.toml must not replace the container's CUDA builds.
RUN python3 -m pip install --no-deps /opt/reward-server

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    REWARD_SERVER_CACHE=/var/cache/reward-server \
    HF_HUB_OFFLINE=1
# Non-root (uid 1000, the container's own unprivileged user); checkpoints and engines are
# mounted read-only at /models and /engines.
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["reward-server", "serve", "--host", "0.0.0.0"]
