"""Which examples, with which labels, at each step: batch order and label noise.

Everything here is a pure function of seeds and the step, so a resumed run
sees exactly the batches and labels of an uninterrupted one.
"""

import functools

import numpy as np

from collab_jax import input_pipeline
from collab_jax import streams


# ----------------------------------------------------------------------------
# Batch order: a pure function of (seed, step), so resuming needs no state.


def steps_per_epoch(num_examples, global_batch):
  """Number of full batches in one pass over the data (remainder dropped)."""
  if global_batch <= 0:
    raise ValueError(f'global_batch must be positive, got {global_batch}.')
  if global_batch > num_examples:
    raise ValueError(
        f'global_batch={global_batch} is larger than the {num_examples} '
        'training examples: lower --config.batch_size or train_subset=0.')
  return num_examples // global_batch


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed, epoch, num_examples):
  """The example order of one epoch (cached: consecutive steps share it)."""
  perm = streams.rng('order', seed, epoch).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def train_indices(step, *, num_examples, global_batch, seed):
  """Indices of the training examples of global batch `step`.

  Epoch `e = step // steps_per_epoch` visits the examples in the order of
  `streams.rng('order', seed, e).permutation(num_examples)`, dropping the
  last incomplete batch. Being a function of `step` alone, a resumed run sees
  exactly the batches an uninterrupted run would.

  Args:
    step: the global optimizer step (0-based).
    num_examples: size of the training set.
    global_batch: examples per step over all processes.
    seed: data-order seed.

  Returns:
    int64 [global_batch] indices.
  """
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}.')
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, i = divmod(int(step), per_epoch)
  perm = _epoch_permutation(int(seed), epoch, int(num_examples))
  return perm[i * global_batch:(i + 1) * global_batch].astype(np.int64)


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
      raise input_pipeline.DatasetError(
          f'labeled_per_class={labeled_per_class} keeps {size} of the '
          f'{labels.shape[0]} training labels: set --config.labeled_per_class '
          'so that some, but not all, examples are labelled (0 = all).')
    if not 0.0 < labeled_fraction < 1.0:
      raise ValueError(
          f'labeled_fraction_per_batch={labeled_fraction} must be in (0, 1).')
    self.labeled = input_pipeline.balanced_subset(labels, size, seed=seed)
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
    steps_per_epoch(self.labeled.size, self.labeled_per_batch)
    steps_per_epoch(self.unlabeled.size, self.global_batch - self.labeled_per_batch)

  def _part(self, pool, stream, per_batch, step, run_seed):
    per_epoch = steps_per_epoch(pool.size, per_batch)
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


def process_slice(indices, process_index, process_count):
  """This process's contiguous share of a global batch.

  Process `p` gets rows `[p * b, (p + 1) * b)` with `b = len / process_count`,
  matching a batch axis sharded over `jax.devices()` (ordered by process).

  Args:
    indices: any array whose leading axis is the global batch.
    process_index: `jax.process_index()`.
    process_count: `jax.process_count()`.

  Returns:
    `indices[p * b:(p + 1) * b]`.
  """
  n = len(indices)
  if n % process_count:
    raise ValueError(
        f'global batch {n} does not divide among {process_count} processes: '
        f'set --config.batch_size to a multiple of {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} outside [0, {process_count}).')
  b = n // process_count
  return indices[process_index * b:(process_index + 1) * b]


# ----------------------------------------------------------------------------
# Label noise (paper Sec. 3.4).


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
