"""Label noise (paper Sec. 3.4 and 4.1): a fixed corrupted set, fresh labels every epoch."""

import numpy as np

from collab_jax.data import streams


class LabelNoise:
  """Label noise: a fixed corrupted set, fresh uniform labels every epoch.

  Paper Sec. 3.4/4.1: "The partition for images with corruption or not is
  fixed for all runs; their noisy labels are randomly generated every epoch."
  The corrupted set is exactly `round(level * N)` examples chosen from `seed`
  alone, so every run of a sweep (any training seed, model or head tree) uses
  the same partition. In each epoch a corrupted example gets a label drawn
  uniformly over *all* classes, so it keeps its true label with probability
  `1 / num_classes`. The draws are a pure function of
  `(seed, run_seed, epoch)`: runs with different training seeds see different
  draws, and a resumed run sees the same ones. `run_seed=None` gives the
  draws of `(seed, epoch)` alone, shared by every run (the protocol of the
  first Fashion-MNIST study, kept so that its runs stay reproducible).
  """

  def __init__(self, num_examples, num_classes, level, seed, *,
               run_seed=None):
    """Chooses the corrupted set.

    Args:
      num_examples: size of the training set N.
      num_classes: labels are drawn from `range(num_classes)`.
      level: fraction of corrupted examples, in [0, 1).
      seed: the noise seed; chooses the corrupted set.
      run_seed: the training run's seed, mixed into the per-epoch draws;
        None shares one draw sequence between all runs.
    """
    if not 0.0 <= level < 1.0:
      raise ValueError(f'level={level} must be a fraction in [0, 1), e.g. 0.2.')
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.level = float(level)
    self.seed = int(seed)
    self.run_seed = None if run_seed is None else int(run_seed)
    self.num_corrupted = int(round(level * num_examples))
    rng = streams.rng('noise_set', self.seed)
    chosen = rng.choice(self.num_examples, self.num_corrupted, replace=False)
    self.corrupted = np.zeros(self.num_examples, bool)
    self.corrupted[chosen] = True
    self.corrupted.flags.writeable = False
    self._cached_epoch, self._cached_draw = None, None

  def _draw(self, epoch):
    """Noisy labels of all N examples for `epoch` (the last epoch is cached)."""
    if epoch != self._cached_epoch:
      if self.run_seed is None:
        rng = streams.rng('noise_shared', self.seed, epoch)
      else:
        rng = streams.rng('noise_per_run', self.seed, self.run_seed, epoch)
      self._cached_draw = rng.integers(
          0, self.num_classes, self.num_examples, dtype=np.int32)
      self._cached_epoch = epoch
    return self._cached_draw

  def labels(self, indices, true_labels, epoch):
    """Training labels of examples `indices` in `epoch`.

    Args:
      indices: int [B] example indices (e.g. from `train_indices`).
      true_labels: int [B] clean labels of those examples (aligned with
        `indices`), or the whole clean label array [N].
      epoch: the epoch (`step // steps_per_epoch`).

    Returns:
      int32 [B]: the clean label, or this epoch's random label where the
      example is corrupted.
    """
    indices = np.asarray(indices)
    true_labels = np.asarray(true_labels)
    if true_labels.shape != indices.shape:
      if true_labels.shape != (self.num_examples,):
        raise ValueError(
            f'true_labels has shape {true_labels.shape}: pass the labels of '
            f'the batch {indices.shape} or of the whole training set '
            f'({self.num_examples},).')
      true_labels = true_labels[indices]
    if not self.num_corrupted:
      return true_labels.astype(np.int32)
    return np.where(self.corrupted[indices], self._draw(int(epoch))[indices],
                    true_labels).astype(np.int32)
