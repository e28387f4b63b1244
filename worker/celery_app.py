"""The Celery app (``celery -A worker.celery_app worker``), configured like the API's producer.

One task at a time per process and a fresh process per task: a long GPU job
never shares a CUDA context, and the parent that forks never touches CUDA.
"""

from celery import Celery

from jobstore.settings import get_settings

app = Celery("masktune", include=["worker.tasks"])
app.conf.update(get_settings().celery_config())
app.conf.update(worker_max_tasks_per_child=1, worker_concurrency=1)
