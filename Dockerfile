# syntax=docker/dockerfile:1
# The DAS service's images, from one file; build from the repository root:
#
#   docker build --target api        -t das-api .          # the REST API and /ui (CPU torch)
#   docker build --target worker     -t das-worker .       # a CPU training worker
#   docker build --target worker-gpu -t das-worker-gpu .   # a CUDA training worker
#
# All three install the repository in editable mode under /srv/das: the Alembic migrations
# (migrations/, not a Python package) are found beside app/ there. Runtime configuration is
# the environment of docs/service.md (DATABASE_URL, CELERY_BROKER_URL, DAS_DATA_DIR, ...);
# DAS_DATA_DIR (/data) must be one volume shared by the API and every worker.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# Any CUDA 12 runtime image whose driver requirement the hosts meet; the torch wheel brings
# its own CUDA libraries, so TORCH_CUDA_INDEX is what fixes the CUDA version in use.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0

# -- CPU base: Python, torch (CPU build), the project -------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
ARG TORCH_VERSION
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DAS_DATA_DIR=/data \
    DAS_ENGINE_CACHE=/data/engine-cache \
    DAS_HOST=0.0.0.0 \
    PORT=8000
RUN python -m venv /opt/venv \
 && useradd --create-home --uid 1000 das \
 && mkdir -p /data && chown das /data
# torch first, in its own layer, from the CPU wheel index (no CUDA libraries)
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /srv/das
COPY . .
# the pinned versions of everything else; torch==X in constraints.txt is met by X+cpu
RUN pip install -c constraints.txt -e . \
 && python -c "import app.main, app.cli, service_core.models, worker.runner, das_engine.lineage"
USER das
VOLUME ["/data"]

# -- the API ------------------------------------------------------------------------------
FROM cpu AS api
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=4)"
# One API process per database (the write rate limiter lives in the process); keep-alive
# longer than a load balancer's idle timeout. Run `das-service migrate` once before the
# first start when several containers start together (each start migrates too; idempotent).
CMD ["sh", "-c", "das-service migrate && exec uvicorn app.main:app --host \"$DAS_HOST\" --port \"$PORT\" --workers 1 --timeout-keep-alive 75"]

# -- a CPU worker -------------------------------------------------------------------------
FROM cpu AS worker
# migrate, then one Celery worker (--pool=solo: one job at a time)
CMD ["das-service", "worker"]

# -- a GPU worker: the CUDA build of torch on an NVIDIA CUDA runtime image ------------------
FROM ${CUDA_IMAGE} AS worker-gpu
ARG TORCH_VERSION
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DAS_DATA_DIR=/data \
    DAS_ENGINE_CACHE=/data/engine-cache \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && (id -u das >/dev/null 2>&1 || useradd --create-home --uid 1000 das \
     || useradd --create-home das) \
 && mkdir -p /data && chown das /data
RUN pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /srv/das
COPY . .
RUN pip install -c constraints.txt -e . \
 && python -c "import app.main, app.cli, service_core.models, worker.runner, das_engine.lineage"
USER das
VOLUME ["/data"]
# one worker per GPU: docker run --gpus '"device=0"' ... (the engine trains on cuda:0)
CMD ["das-service", "worker"]
