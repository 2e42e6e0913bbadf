# syntax=docker/dockerfile:1
# CPU image: the pip-installed server with its native kernels compiled for every x86-64 instruction
# set it supports, the real tritonserver 2.51 from the nvidia-pytriton wheel and the demo checkpoint,
# built at image build time. Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t reward-server-cpu:0.1.0 .
# The base is pinned by its full version tag; pin it by digest too in your registry with
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest you pulled and checked>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C++ compiler for the native kernels, in this stage only: the final stage has none.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*
# The CPU build of torch (the lock pins the version; the local "+cpu" build satisfies it).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
COPY requirements.lock /opt/reward-server/requirements.lock
RUN /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX}" -r /opt/reward-server/requirements.lock
COPY pyproject.toml README.md hatch_build.py /opt/reward-server/
COPY reward_server /opt/reward-server/reward_server
COPY model_repository /opt/reward-server/model_repository
# The platform wheel: its build hook compiles the kernels for every instruction set (AVX2, AVX-512,
# AVX-512 BF16, AMX) against the venv's pinned torch, hence no build isolation (it would fetch a torch of
# its own; the lock has the build backend). The wheel carries the package, its model repository and
# the compiled kernels: the source tree stays in this stage. The check loads the installed kernels
# (from /, not the source tree) and fails the build if any is missing.
RUN /opt/venv/bin/pip wheel --no-deps --no-build-isolation -w /opt/dist /opt/reward-server \
 && /opt/venv/bin/pip install --no-deps /opt/dist/reward_server-0.1.0-*-linux_x86_64.whl \
 && cd / && /opt/venv/bin/python -m reward_server.pipeline.torch_engine.kernels --check \
 && /opt/venv/bin/reward-server demo-checkpoint /models/demo --size small

FROM ${PYTHON_IMAGE}
# No compilers or build tools here: the venv (with the project and its compiled kernels installed)
# and the checkpoint are copied in.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /models/demo /models/demo
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    REWARD_SERVER_CACHE=/var/cache/reward-server \
    HF_HUB_OFFLINE=1
# Non-root; the model and the code belong to root, so the server can only read them.
USER 1000:1000
EXPOSE 8000 8001 8002
ENTRYPOINT ["reward-server", "serve", "--host", "0.0.0.0"]
CMD ["--checkpoint", "/models/demo"]
