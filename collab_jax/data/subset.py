"""Fixed, class-balanced subsets of a training set (`train_subset`, the labelled split)."""

import numpy as np

from collab_jax import errors
from collab_jax.data import streams


def balanced_subset(labels, size, *, seed):
  """Sorted indices of a fixed random subset with (near) equal class counts.

  Classes take turns (in a random order) contributing their next random
  example, so counts differ by at most one unless a class runs out.

  Args:
    labels: int [N] class ids.
    size: how many examples to keep, 1 <= size <= N.
    seed: the choice depends on `seed` and `labels` only.

  Returns:
    int64 [size] indices into `labels`, ascending.
  """
  labels = np.asarray(labels)
  if not 0 < size <= labels.shape[0]:
    raise errors.DatasetError(
        f'train_subset={size} but the training set has {labels.shape[0]} '
        'examples: set --config.train_subset between 1 and that (0 = all).')
  rng = streams.rng('subset', seed)
  order = rng.permutation(labels.shape[0])
  shuffled = labels[order]
  # Rank of each example among the examples of its class, in shuffled order.
  by_class = np.argsort(shuffled, kind='stable')
  starts = np.searchsorted(shuffled[by_class], shuffled[by_class])
  rank = np.empty_like(by_class)
  rank[by_class] = np.arange(by_class.size) - starts
  class_turn = rng.permutation(int(labels.max()) + 1)[shuffled]
  chosen = order[np.lexsort((class_turn, rank))[:size]]
  return np.sort(chosen).astype(np.int64)
