"""Semi-supervised data: a fixed labelled subset and mixed batches.

Semi-supervised collaborative learning is the paper's future work (Sec. 5):
labelled examples get the full loss, unlabelled ones only the consensus term.
This module decides which examples are labelled and what each batch holds.
"""

import functools

import numpy as np

from collab_jax import errors
from collab_jax.data import order
from collab_jax.data import streams
from collab_jax.data import subset


@functools.lru_cache(maxsize=4)
def _stream_permutation(seed, stream, epoch, num_examples):
  """`_epoch_permutation` of one of several independent example streams."""
  perm = streams.rng(stream, seed, epoch).permutation(num_examples)
  perm.flags.writeable = False
  return perm


class LabeledSplit:
  """Semi-supervised data: a fixed labelled subset, mixed batches.

  The labelled subset is `balanced_subset(labels, labeled_per_class *
  num_classes, seed=seed)`: a function of the seed and the labels alone, the
  same for every run (any training seed, model or method), with exactly
  `labeled_per_class` examples of each class. It is the very subset that
  `load_dataset(train_subset=labeled_per_class * num_classes,
  subset_seed=seed)` trains on, so a supervised run on that subset is the
  matching baseline. The other examples are unlabelled.

  Every global batch holds `labeled_per_batch = round(labeled_fraction *
  global_batch)` labelled examples first, then `global_batch -
  labeled_per_batch` unlabelled ones. Each part walks through its own pool in
  epochs, with its own permutation per epoch (as `train_indices`, from
  their own streams `(run_seed, epoch)`), so the batch of a step is a pure function of
  `(run_seed, step)` and a resumed run sees exactly the same batches.
  """

  _LABELED_STREAM, _UNLABELED_STREAM = 'labeled_order', 'unlabeled_order'

  def __init__(self, labels, labeled_per_class, num_classes, *, seed,
               global_batch, labeled_fraction):
    """Chooses the labelled subset.

    Args:
      labels: int [N] class ids of the training set.
      labeled_per_class: labelled examples kept per class (>= 1).
      num_classes: number of classes.
      seed: chooses the labelled subset (e.g. `config.subset_seed`).
      global_batch: examples per step over all processes.
      labeled_fraction: share of labelled examples in every batch, in (0, 1).
    """
    labels = np.asarray(labels)
    size = int(labeled_per_class) * int(num_classes)
    if not 0 < size < labels.shape[0]:
      raise errors.DatasetError(
          f'labeled_per_class={labeled_per_class} keeps {size} of the '
          f'{labels.shape[0]} training labels: set --config.labeled_per_class '
          'so that some, but not all, examples are labelled (0 = all).')
    if not 0.0 < labeled_fraction < 1.0:
      raise ValueError(
          f'labeled_fraction_per_batch={labeled_fraction} must be in (0, 1).')
    self.labeled = subset.balanced_subset(labels, size, seed=seed)
    self.labeled.flags.writeable = False
    self.unlabeled = np.setdiff1d(np.arange(labels.shape[0]), self.labeled)
    self.unlabeled.flags.writeable = False
    self.global_batch = int(global_batch)
    self.labeled_per_batch = int(round(labeled_fraction * global_batch))
    if not 0 < self.labeled_per_batch < self.global_batch:
      raise ValueError(
          f'labeled_fraction_per_batch={labeled_fraction} of batch '
          f'{global_batch} gives {self.labeled_per_batch} labelled examples; '
          'a batch needs at least one labelled and one unlabelled example.')
    # Both pools must hold at least one batch part (steps_per_epoch checks).
    order.steps_per_epoch(self.labeled.size, self.labeled_per_batch)
    order.steps_per_epoch(self.unlabeled.size, self.global_batch - self.labeled_per_batch)

  def _part(self, pool, stream, per_batch, step, run_seed):
    per_epoch = order.steps_per_epoch(pool.size, per_batch)
    epoch, i = divmod(int(step), per_epoch)
    perm = _stream_permutation(int(run_seed), stream, epoch, pool.size)
    return pool[perm[i * per_batch:(i + 1) * per_batch]]

  def indices(self, step, *, run_seed):
    """Global batch `step`: (int64 [B] example indices, bool [B] labelled)."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    n_lab = self.labeled_per_batch
    lab = self._part(self.labeled, self._LABELED_STREAM, n_lab, step, run_seed)
    unl = self._part(self.unlabeled, self._UNLABELED_STREAM,
                     self.global_batch - n_lab, step, run_seed)
    is_labeled = np.arange(self.global_batch) < n_lab
    return np.concatenate([lab, unl]).astype(np.int64), is_labeled
