# Two images from one file: `api` (no torch: small, fast to start) and `worker` (torch, CPU or CUDA build).
# Dependencies are installed before the source is copied, so a code change rebuilds only the last layer.
# Build arguments (docs/deploy.md):
#   PYTHON_IMAGE    the Python 3.11 base (default python:3.11-slim-bookworm; air-gapped: masktune-standin/python:3.11)
#   TORCH_PACKAGES  the torch build's packages (default: the versions pyproject.toml pins)
#   TORCH_INDEX_URL where they come from: PyTorch's CPU builds (default) or https://pypi.org/simple (CUDA builds)
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# The service runs as an unprivileged user; its volumes' mount points belong to it.
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH MASKTUNE_DATA_DIR=/data PYTHONPATH=/app
RUN python3 -m venv /opt/venv && useradd --uid 10001 --create-home --shell /usr/sbin/nologin masktune \
 && mkdir -p /data /scratch /weights && chown masktune:masktune /data /scratch /weights
WORKDIR /app
COPY pyproject.toml constraints.txt docker/requirements.py /build/

# Each image's source in one layer (a stage of its own, so the final image gets it with one copy).
FROM scratch AS api-source
COPY jobspec /app/jobspec
COPY jobstore /app/jobstore
COPY api /app/api

FROM api-source AS worker-source
COPY masktune_core /app/masktune_core
COPY worker /app/worker

FROM runtime AS api
RUN python /build/requirements.py --pyproject /build/pyproject.toml api s3 > /build/requirements.txt \
 && pip install -c /build/constraints.txt -r /build/requirements.txt
COPY --from=api-source /app /app
USER masktune
ENV MASKTUNE_API_HOST=0.0.0.0 MASKTUNE_API_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
# Migrations (unless MASKTUNE_MIGRATE_ON_START=false), then uvicorn with MASKTUNE_API_WORKERS processes.
CMD ["python", "-m", "api"]

FROM runtime AS worker
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The torch build chosen here stays: the other requirements install under a constraint to exactly it.
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple $TORCH_PACKAGES \
 && pip freeze | grep -E '^(torch|torchvision)==' > /build/torch.txt \
 && python /build/requirements.py --pyproject /build/pyproject.toml ml s3 --without torch torchvision > /build/requirements.txt \
 && pip install -c /build/constraints.txt -c /build/torch.txt -r /build/requirements.txt
COPY --from=worker-source /app /app
USER masktune
# One worker process per GPU (CUDA_VISIBLE_DEVICES), one task at a time, a fresh child per task.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "masktune.jobs,masktune.validation", "--loglevel", "INFO"]
