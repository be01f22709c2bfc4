"""Stopping a run between steps: SIGTERM and SIGINT become a flag.

The loop checks the flag after each step, saves a checkpoint and returns, so
a pre-empted or interrupted run resumes exactly where it stopped.
"""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignal:
  """Turns SIGTERM / SIGINT into a flag checked between steps."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # second Ctrl-C: stop at once
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def stop_requested(stop, is_log):
  """Whether to stop after this step for a signal.

  Several processes must stop at the same step (saving is collective) but a
  signal may reach them at different steps, so they agree on log steps only.
  """
  if jax.process_count() == 1:
    return stop.received is not None
  if not is_log:
    return False
  flags = multihost_utils.process_allgather(
      np.int32(stop.received is not None))
  return bool(np.any(flags))
