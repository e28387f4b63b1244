# syntax=docker/dockerfile:1
# Two images from one file: `api` (no torch: small, fast to start) and `worker` (torch, GPU-ready).
FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 MASKTUNE_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md ./
COPY jobspec jobspec
COPY jobstore jobstore

FROM base AS api
COPY api api
RUN pip install '.[api,s3]'
ENV MASKTUNE_API_HOST=0.0.0.0 MASKTUNE_API_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# Migrations once, then uvicorn with MASKTUNE_API_WORKERS processes.
CMD ["python", "-m", "api"]

FROM base AS worker
COPY masktune_core masktune_core
COPY worker worker
RUN pip install '.[ml,s3]'
# One worker process per GPU (CUDA_VISIBLE_DEVICES), one task at a time, a fresh child per task.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "masktune.jobs,masktune.validation", "--loglevel", "INFO"]
