"""The worker's report of what it can run, written to the database for the API (which imports no torch).

When a worker starts, a separate process (``python -m worker.catalog HOSTNAME``) builds every
architecture on the meta device (some seconds of CPU) and writes the host's row: the
architectures, their default input size and saliency target layer, and which ImageNet weights
the library caches hold. A process, not a thread: the prefork parent must hold no threads
(or locks) when it forks the next task's child.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys

from celery.signals import worker_ready

from jobstore.db import session_scope
from jobstore.models import WorkerCatalog, utcnow
from jobstore.settings import get_settings
from masktune_core.models import architecture_catalog

log = logging.getLogger(__name__)
_reporters: list[subprocess.Popen] = []  # kept so that the finished process is reaped


def report_catalog(hostname: str) -> None:
    catalog = architecture_catalog()
    with session_scope(get_settings().database_url) as session:
        session.merge(WorkerCatalog(hostname=hostname, catalog=catalog, reported_at=utcnow()))
    log.info("reported %d architectures for %s", len(catalog["architectures"]), hostname)


@worker_ready.connect
def _report_at_start(sender=None, **_) -> None:
    if get_settings().report_catalog:
        hostname = getattr(sender, "hostname", None) or socket.gethostname()
        _reporters.append(subprocess.Popen([sys.executable, "-m", "worker.catalog", hostname]))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    report_catalog(sys.argv[1])
