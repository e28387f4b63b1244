"""The worker's report of what it can run, written to the database for the API (which imports no torch).

At start, in a background thread (the catalog builds every architecture on the meta device, some
seconds of CPU), each worker host writes its row: the architectures, their default input size and
saliency target layer, and which ImageNet weights its library caches hold.
"""

from __future__ import annotations

import logging
import socket
import threading

from celery.signals import worker_ready

from jobstore.db import session_scope
from jobstore.models import WorkerCatalog, utcnow
from jobstore.settings import get_settings
from masktune_core.models import architecture_catalog

log = logging.getLogger(__name__)


def report_catalog(hostname: str) -> None:
    catalog = architecture_catalog()
    with session_scope(get_settings().database_url) as session:
        session.merge(WorkerCatalog(hostname=hostname, catalog=catalog, reported_at=utcnow()))
    log.info("reported %d architectures for %s", len(catalog["architectures"]), hostname)


@worker_ready.connect
def _report_at_start(sender=None, **_) -> None:
    if not get_settings().report_catalog:
        return
    hostname = getattr(sender, "hostname", None) or socket.gethostname()

    def run() -> None:
        try:
            report_catalog(hostname)
        except Exception:  # the report is informative; a failure must not stop the worker
            log.exception("architecture report failed")

    threading.Thread(target=run, name="catalog-report", daemon=True).start()
