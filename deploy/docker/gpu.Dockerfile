# syntax=docker/dockerfile:1
# GPU image: NVIDIA's Triton + TensorRT-LLM container (TensorRT-LLM 1.2.1, Python 3.12) with this
# project installed on top. Build from the repository root:
#   docker build -f deploy/docker/gpu.Dockerfile -t reward-server-gpu:0.1.0 .
# One pinned tag: engines built by one TensorRT-LLM version only load in the same version, so the
# engine-build Job and the servers must use the same image.
ARG NGC_IMAGE=nvcr.io/nvidia/tritonserver:26.04-trtllm-python-py3

# The platform wheel, its native CPU kernels compiled against this container's own torch (not the
# torch pyproject.toml pins for CPU machines): same base image, a compiler in this stage only.
FROM ${NGC_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
COPY requirements.lock pyproject.toml README.md hatch_build.py /opt/reward-server/
COPY reward_server /opt/reward-server/reward_server
COPY model_repository /opt/reward-server/model_repository
# No build isolation: the build hook must see the container's torch (isolation would fetch the
# pinned CPU one). The build backend and torch's extension builder (setuptools), at the lock's
# versions, are put beside it for this build only.
RUN python3 -m pip install --target /opt/build-backend -c /opt/reward-server/requirements.lock hatchling setuptools \
 && PYTHONPATH=/opt/build-backend python3 -m pip wheel --no-deps --no-build-isolation -w /opt/dist /opt/reward-server

FROM ${NGC_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
COPY deploy/docker/gpu-requirements.txt /opt/reward-server/deploy/docker/gpu-requirements.txt
# torch, transformers, tokenizers, safetensors and numpy come with the base image (TensorRT-LLM
# needs them). Add only what it lacks, constrained to what it already has, so that nothing of
# the base is up- or downgraded: a conflict fails the build instead of breaking TensorRT-LLM.
RUN python3 -m pip list --format=freeze --exclude-editable > /tmp/base-constraints.txt \
 && python3 -m pip install -c /tmp/base-constraints.txt -r /opt/reward-server/deploy/docker/gpu-requirements.txt \
 && rm /tmp/base-constraints.txt
COPY --from=build /opt/dist /opt/dist
# The wheel (package, model repository, kernels), without dependencies: the pinned CPU stack of
# pyproject.toml must not replace the container's CUDA builds. The check loads the installed
# kernels (from /, not a source tree) and fails the build if any is missing or built for another torch.
RUN python3 -m pip install --no-deps /opt/dist/reward_server-0.1.0-*-linux_x86_64.whl \
 && cd / && python3 -m reward_server.pipeline.torch_engine.kernels --check

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
