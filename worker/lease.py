"""A worker attempt's lease on a job row: the claim token every write names, kept fresh by a heartbeat."""

from __future__ import annotations

import logging

from jobstore.db import session_scope
from jobstore.jobs import update_job
from jobstore.models import utcnow
from jobstore.settings import Settings

from .heartbeat import Heartbeat

log = logging.getLogger(__name__)


class Claim:
    """This attempt's hold on a job row (see jobstore.jobs.claim_job).

    Every write of the attempt goes through ``write``, which names the claim token; once
    a write finds the row claimed by another attempt (the reconciler presumed this one
    dead), finished or deleted, ``lost`` turns true and the attempt stops writing. A
    Heartbeat thread keeps the claim fresh however long a batch, a download or an upload takes.
    """

    def __init__(self, settings: Settings, job_id: str, token: str):
        self.settings = settings
        self.job_id = job_id
        self.token = token
        self.lost = False
        self._heartbeat = Heartbeat(f"job {job_id}", settings.heartbeat_interval_s, self.beat)

    def write(self, session, **fields) -> bool:
        """Update the job row (and the heartbeat) if this attempt still owns it; False once it does not."""
        if not self.lost and not update_job(session, self.job_id, self.token, heartbeat_at=utcnow(), **fields):
            log.warning("job %s: claim %s lost (requeued, finished or deleted elsewhere); stopping", self.job_id, self.token)
            self.lost = True
        return not self.lost

    def beat(self) -> bool:
        with session_scope(self.settings.database_url) as session:
            return self.write(session)

    def __enter__(self) -> Claim:
        self._heartbeat.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._heartbeat.__exit__(*exc)
