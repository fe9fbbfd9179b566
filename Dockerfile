# syntax=docker/dockerfile:1
# Influence search image: the `influence` CLI (index build, serve).
#
#   docker build -t influence-search .                       # GPU: CUDA runtime, CUDA torch, faiss-gpu
#   docker build -t influence-search:cpu --build-arg VARIANT=cpu .
#
# Stages: base-<variant> (Python 3.11 on the runtime base) -> builder (venv with the
# project and its pinned deps) -> runtime (venv only, non-root). The index and the model are
# mounted read-only at run time (see docker-compose.yml); nothing is baked into the image.

ARG VARIANT=gpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu22.04 AS base-gpu
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3.11=3.11.* python3.11-venv=3.11.* libgomp1=12.* \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python3.11

FROM python:3.11-slim-bookworm AS base-cpu
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libgomp1=12.* \
    && rm -rf /var/lib/apt/lists/*

# base-${VARIANT} names a stage above, not an image, so it carries no tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG VARIANT
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python3.11 -m venv /opt/venv
# A regular (non-editable) install of the project and its pinned dependencies.
COPY pyproject.toml README.md ./
COPY encoder ./encoder
COPY indexer ./indexer
COPY engine ./engine
COPY service ./service
COPY api ./api
COPY evaluation ./evaluation
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# GPU: PyPI's torch wheel is the CUDA build (it bundles its CUDA libraries); faiss-cpu (a
# base dependency) and faiss-gpu ship the same `faiss` module, so the GPU variant swaps them.
# CPU: torch from PyTorch's CPU wheel index, without the CUDA libraries.
RUN if [ "${VARIANT}" = "gpu" ]; then \
        /opt/venv/bin/pip install ".[gpu,milvus]" \
        && /opt/venv/bin/pip uninstall -y faiss-cpu \
        && /opt/venv/bin/pip install --force-reinstall --no-deps "faiss-gpu-cu12==1.14.1.post1"; \
    else \
        /opt/venv/bin/pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[milvus]"; \
    fi \
    && /opt/venv/bin/python -c "import faiss, torch, service, indexer, encoder"

# base-${VARIANT} names a stage above, not an image, so it carries no tag.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" influence \
    && useradd --system --uid "${UID}" --gid influence --create-home --home-dir /home/influence influence \
    && mkdir -p /index /model /data \
    && chown influence:influence /index
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/hf \
    MPLCONFIGDIR=/tmp/matplotlib
USER ${UID}:${UID}
WORKDIR /home/influence
EXPOSE 8000
# Ready means model + index loaded; Docker (and compose's depends_on) wait on it.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
ENTRYPOINT ["influence"]
CMD ["serve", "--index", "/index/current", "--host", "0.0.0.0", "--port", "8000"]
