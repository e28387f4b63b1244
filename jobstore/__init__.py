"""The shared store where the API and the worker meet: settings, database, blob storage.

Nothing here imports torch, FastAPI or Celery.
"""
