"""Celery worker: turns job and upload records into masktune_core runs and results."""
