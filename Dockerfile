# Two images from one file: `api` (no torch: small, fast to start) and `worker` (torch, CPU or CUDA build).
# Dependencies are installed before the source is copied, so a code change rebuilds only the last layers.
# Build arguments (docs/deploy.md):
#   PYTHON_IMAGE    the Python 3.11 base (default python:3.11-slim-bookworm; air-gapped: masktune-standin/python:3.11)
#   TORCH_PACKAGES  the torch build's packages (default the versions pyproject.toml pins)
#   TORCH_INDEX_URL where they come from: the CPU builds (default) or https://pypi.org/simple (CUDA builds)
# Wheels put in docker/wheels/ (git-ignored) are found first: a CPU torch wheel for a host with no index.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml constraints.txt ./
COPY docker/requirements.py docker/requirements.py

FROM python AS api-deps
RUN python docker/requirements.py api s3 > /tmp/requirements.txt && pip install -c constraints.txt -r /tmp/requirements.txt

FROM python AS worker-deps
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY docker/wheels/ /wheels/
RUN pip install --find-links /wheels --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple $TORCH_PACKAGES \
 && python docker/requirements.py ml s3 --without torch torchvision > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt

# The service runs as an unprivileged user; its volumes' mount points belong to it.
FROM python AS runtime
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin masktune \
 && mkdir -p /data /scratch /weights && chown masktune:masktune /data /scratch /weights
ENV MASKTUNE_DATA_DIR=/data PYTHONPATH=/app

FROM runtime AS api
COPY --from=api-deps /opt/venv /opt/venv
COPY jobspec jobspec
COPY jobstore jobstore
COPY api api
USER masktune
ENV MASKTUNE_API_HOST=0.0.0.0 MASKTUNE_API_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"
# Migrations (unless MASKTUNE_MIGRATE_ON_START=false), then uvicorn with MASKTUNE_API_WORKERS processes.
CMD ["python", "-m", "api"]

FROM runtime AS worker
COPY --from=worker-deps /opt/venv /opt/venv
COPY jobspec jobspec
COPY jobstore jobstore
COPY masktune_core masktune_core
COPY worker worker
USER masktune
# One worker process per GPU (CUDA_VISIBLE_DEVICES), one task at a time, a fresh child per task.
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "masktune.jobs,masktune.validation", "--loglevel", "INFO"]
