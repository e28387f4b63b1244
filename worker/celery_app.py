"""The Celery app (``celery -A worker.celery_app worker``), configured like the API's producer.

One task at a time per process and a fresh process per task: a long GPU job
never shares a CUDA context, and the parent that forks never touches CUDA.

Periodic housekeeping (the reconciler) is sent by exactly one ``celery beat``
(``celery worker -B`` in the embedded start, the ``beat`` service in compose) to
the validation queue, which CPU-only processes consume while GPU workers are busy.
"""

from celery import Celery

from jobstore.settings import get_settings

TASK_RECONCILE = "masktune.reconcile"

settings = get_settings()
app = Celery("masktune", include=["worker.logs", "worker.metrics", "worker.device", "worker.validation", "worker.job_run",
                                  "worker.reconciler", "worker.catalog", "worker.webhooks"])
app.conf.update(settings.celery_config())
app.conf.update(
    worker_max_tasks_per_child=1,
    worker_concurrency=1,
    # A lost broker connection (a Redis restart) does not stop running jobs: they finish, their
    # rows say so, and a message redelivered later finds them finished (see run_job's claim).
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # A schedule of one interval needs no state file: beat keeps it in memory.
    beat_scheduler="celery.beat:Scheduler",
    beat_schedule={
        "reconcile": {
            "task": TASK_RECONCILE,
            "schedule": settings.reconcile_interval_s,
            # A reconcile that waited past the next one is dropped, not piled up behind busy workers.
            "options": {"queue": settings.validation_queue, "expires": settings.reconcile_interval_s},
        },
    },
)
