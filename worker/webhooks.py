"""Webhook delivery: one attempt per task run, signed per Standard Webhooks, retried with backoff.

The message (jobstore.webhooks) is already a committed row; this task only sends it. Before
each attempt the URL's host is resolved again and every address checked against the rules
(jobstore.webhook_urls); the request goes to a checked address (the URL's host kept as the
Host header and the TLS server name), so a name that resolves differently by now (DNS
rebinding) cannot steer it elsewhere. Redirects are not followed, and proxies from the
environment are not used (they would choose the address themselves).
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone

import httpx
from standardwebhooks import Webhook

from jobstore import webhook_urls, webhooks
from jobstore.db import session_scope
from jobstore.settings import TASK_DELIVER_WEBHOOK, get_settings

from .celery_app import app

log = logging.getLogger(__name__)

LEASE_MARGIN_S = 30.0  # an attempt holds its message this long past its timeout before it counts as lost
USER_AGENT = "MaskTune-Webhooks/1"


@app.task(name=TASK_DELIVER_WEBHOOK)
def deliver_webhook(delivery_id: str) -> None:
    settings = get_settings()
    with session_scope(settings.database_url) as session:
        attempt = webhooks.start_attempt(session, delivery_id, settings.webhook_timeout_s + LEASE_MARGIN_S)
    if attempt is None:
        log.info("webhook message %s: not due, taken by another delivery, or finished; dropping", delivery_id)
        return
    outcome = post(attempt, settings.webhook_timeout_s, settings.webhook_allowed_networks)
    with session_scope(settings.database_url) as session:
        retry_in = webhooks.record_attempt(session, attempt, outcome, max_attempts=settings.webhook_max_attempts,
                                           retry_base_s=settings.webhook_retry_base_s)
    log.info("webhook message %s attempt %d to %s: %s%s", delivery_id, attempt.number, attempt.url,
             outcome.http_status or outcome.error, f"; next in {retry_in:.1f} s" if retry_in is not None else "")
    if retry_in is not None:
        deliver_webhook.apply_async((delivery_id,), countdown=retry_in)


def signed_headers(attempt: webhooks.Attempt) -> dict[str, str]:
    """Standard Webhooks headers: the message id (the same on every attempt), this attempt's time, the signature."""
    now = datetime.now(timezone.utc)
    signature = Webhook(attempt.secret).sign(attempt.delivery_id, now, attempt.body)
    return {"webhook-id": attempt.delivery_id, "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": signature, "content-type": "application/json", "user-agent": USER_AGENT}


def post(attempt: webhooks.Attempt, timeout_s: float, allowed_networks: list[str]) -> webhooks.Outcome:
    """One attempt: check the URL's addresses, then POST the signed body to the first that connects."""
    started = time.monotonic()

    def outcome(http_status: int | None = None, error: str | None = None, final: bool = False) -> webhooks.Outcome:
        return webhooks.Outcome(http_status, error, (time.monotonic() - started) * 1000, final)

    if attempt.secret is None:
        return outcome(error="the tenant has no webhook secret (POST /v1/webhook-secret)", final=True)
    try:
        target = webhook_urls.parse(attempt.url)
        addresses = webhook_urls.allowed_addresses(target, allowed_networks)
    except webhook_urls.HostDoesNotResolve as exc:  # it may again later
        return outcome(error=f"not sent: {exc}")
    except webhook_urls.WebhookUrlError as exc:  # it resolves only to refused addresses
        return outcome(error=f"not sent: {exc}", final=True)
    headers = {**signed_headers(attempt), "host": target.host_header}
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    error = None
    with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
        for address in addresses:
            try:
                request = client.build_request("POST", target.url_for(address), content=attempt.body.encode(),
                                               headers=headers, extensions=extensions)
                response = client.send(request, stream=True)  # the status is all we need: never read a large body
                response.close()
                return outcome(http_status=response.status_code)
            except httpx.ConnectError as exc:  # try the host's next checked address
                error = f"{address}: cannot connect ({exc})"
            except httpx.HTTPError as exc:
                return outcome(error=f"{address}: {type(exc).__name__} {exc}".strip())
    return outcome(error=error)


def _queue(ids: list[str]) -> None:
    for delivery_id in ids:
        deliver_webhook.delay(delivery_id)


# Every worker process queues the messages its commits add (terminal statuses, stage changes).
webhooks.send_after_commit(_queue)
