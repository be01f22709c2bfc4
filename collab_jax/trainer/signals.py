"""Stopping a run between steps: pre-emption notices, SIGTERM and Ctrl-C.

The loop asks `StopSignal.stop_after(step)` after every step; when it says
yes, the loop saves a checkpoint at that step and returns, so the rerun
resumes exactly there. Every process must stop at the same step (saving is
collective) although a notice reaches them at different steps:

* One process: SIGTERM and SIGINT set a flag, read after each step.
* Several processes: JAX's pre-emption sync manager (started by
  `jax.distributed.initialize()`). Its notifier catches SIGTERM (on Cloud
  TPU also the maintenance notices) and the coordination service tells
  every process; in the background they agree on the step after the
  furthest one any of them has reached, and
  `multihost_utils.reached_preemption_sync_point` becomes true at that step
  on all of them. Asking it is a lock and a comparison in C++: no
  collective, no wait for the device, so it is asked after every step.
  Python must not take SIGTERM from the notifier; Ctrl-C is handed to it as
  a SIGTERM to this process.
* Several processes without the sync manager (`jax_enable_preemption_service`
  off): the flags are gathered from every process on log steps only, as a
  gather waits for the device.
"""

import os
import signal

import jax
from jax.experimental import multihost_utils
import numpy as np


def _sync_manager_running():
  # jax.distributed.initialize() starts it unless this option is off.
  return jax.process_count() > 1 and jax.config.jax_enable_preemption_service


class StopSignal:
  """Turns pre-emption notices, SIGTERM and SIGINT into a stop between steps."""

  def __init__(self, start_step=0):
    self.received = None
    self._old = {}
    self._start = start_step
    self._synced = _sync_manager_running()

  def __enter__(self):
    signals = (signal.SIGINT,) if self._synced else (signal.SIGTERM,
                                                     signal.SIGINT)
    for sig in signals:
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
    if self._synced:  # a notice for every process, through the notifier
      os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def stop_after(self, step, is_log):
    """Whether every process stops after `step` (the count of steps done)."""
    if jax.process_count() == 1:
      return self.received is not None
    if self._synced:
      # Counted from this session's first step, which all processes share: a
      # notice that came before the first step then stops it at step 1 of
      # the session, not at a step the count has passed.
      return multihost_utils.reached_preemption_sync_point(step - self._start)
    if not is_log:
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.received is not None))
    return bool(np.any(flags))

  def reason(self):
    """What stopped the run, for the console."""
    if self.received is not None:
      return self.received
    return 'a pre-emption notice to one of the processes'
