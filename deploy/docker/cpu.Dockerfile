# syntax=docker/dockerfile:1
# CPU image: the pip-installed server, the real tritonserver 2.51 from the nvidia-pytriton wheel
# and the demo checkpoint, built at image build time. Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t reward-server-cpu:0.1.0 .
# The base is pinned by its full version tag; pin it by digest too in your registry with
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest you pulled and checked>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch (the lock pins the version; the local "+cpu" build satisfies it).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN python -m venv /opt/venv
COPY requirements.lock /opt/reward-server/requirements.lock
RUN /opt/venv/bin/pip install --extra-index-url "${TORCH_INDEX}" -r /opt/reward-server/requirements.lock
COPY pyproject.toml README.md /opt/reward-server/
COPY reward_server /opt/reward-server/reward_server
COPY model_repository /opt/reward-server/model_repository
# The wheel carries the package and its model repository (package data): the source tree stays in
# this stage.
RUN /opt/venv/bin/pip install --no-deps /opt/reward-server \
 && /opt/venv/bin/reward-server demo-checkpoint /models/demo --size small

FROM ${PYTHON_IMAGE}
# No compilers or build tools here: the venv (with the project installed) and the checkpoint are copied in.
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
