"""The MaskTune HTTP API (FastAPI). Never imports torch, masktune_core or worker:
it meets the worker only in the database, the Celery queue and blob storage."""

__version__ = "0.1.0"
