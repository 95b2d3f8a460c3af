# The image of the gptflow-docker and gptflow-kubernetes deployments (prefect.yaml): the locked dependencies and
# this clone at /opt/gptflow, which the deployments' pull step changes into. `make image` builds it.
#   CPU (default):  docker build -t gptflow:latest .
#   NVIDIA GPUs:    docker build -t gptflow:cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
# torch's CUDA wheels carry the CUDA runtime libraries, so the GPU image needs no CUDA base, only the host's NVIDIA
# driver (NVIDIA Container Toolkit / device plugin). BASE_IMAGE swaps the base for one with the same Python (3.11,
# as `python3`, with pip and venv), e.g. an organisation's hardened or CUDA image.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# The index torch==2.13.0 comes from: CPU wheels by default (no multi-GB CUDA download), a cuXXX index for GPUs.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GPTFLOW_HOME=/data/outputs \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    TOKENIZERS_PARALLELISM=false \
    PREFECT_LOGGING_EXTRA_LOGGERS=gptflow,data,model,eval

RUN python3 -m venv /opt/venv
WORKDIR /opt/gptflow

# Dependencies before the code, so that a code change does not reinstall them: torch from its index
# (the lock's pin), then the rest of the lock, which the installed torch already satisfies.
COPY requirements.lock ./
RUN pip install --index-url "${TORCH_INDEX_URL}" "$(grep '^torch==' requirements.lock)" \
    && pip install -r requirements.lock

# Editable, so that the package and the flows/ and configs/ files the deployments' entrypoints read are one copy.
COPY . .
# GPTFLOW_HOME: the deployments mount a volume there (a Docker named volume, a Kubernetes PVC).
RUN pip install --no-deps -e . \
    && mkdir -p "${GPTFLOW_HOME}"

# The worker sets the command (`prefect flow-run execute`) of each flow run; run by hand, it is the CLI.
CMD ["gptflow", "--help"]
