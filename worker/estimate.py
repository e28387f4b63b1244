"""When a running job will finish: estimated by the worker at each epoch (jobs.estimated_finish_at).

An epoch's time is measured: the mean over the epochs the current stage (ERM, or a finetune round)
finished in this attempt, counted from the stage's start (building and loading the model included).
What is left is counted in epochs at that mean:

- the current stage's remaining epochs;
- ``finetune.epochs`` for each finetune round to come (the same training images as an ERM epoch);
- one epoch for each saliency pass to come (a forward and a backward pass over the training images)
  and one for evaluate (forward passes of three models over every split); export is negligible.

There is no estimate before the first epoch of an attempt (prepare's decoding says nothing about
training speed); between epochs the last estimate stands.
"""

from __future__ import annotations

from jobspec import JobConfig
from masktune_core import ProgressEvent


class FinishEstimate:
    def __init__(self, config: JobConfig):
        self.config = config
        self._stage_started: float | None = None
        self._first_epoch = 0  # the epoch the current stage started from in this attempt (a resumed ERM: > 0)

    def seconds_left(self, event: ProgressEvent, now: float) -> float | None:
        """Follow one pipeline event (``now``: time.monotonic()); the seconds left after an epoch event, else None."""
        if event.kind == "stage":
            self._stage_started, self._first_epoch = now, 0
        if "resumed_from_epoch" in event.data:
            self._first_epoch = event.data["resumed_from_epoch"]
        if event.kind != "epoch" or self._stage_started is None:
            return None
        epoch, epochs = event.data["epoch"], event.data["epochs"]
        if epoch <= self._first_epoch:
            return None
        mean_epoch_s = (now - self._stage_started) / (epoch - self._first_epoch)
        rounds_after = self.config.masktune_iterations - (event.data.get("iteration") or 0)  # ERM: every round
        epochs_left = (epochs - epoch) + rounds_after * (self.config.finetune.epochs + 1) + 1  # + saliency each, + evaluate
        return mean_epoch_s * epochs_left
