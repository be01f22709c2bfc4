"""Which examples each step trains on, and which share each process reads.

The batch of a step is a pure function of `(seed, step)`, so a resumed run
sees exactly the batches of an uninterrupted one and needs no iterator state.
"""

import functools

import numpy as np

from collab_jax.data import streams


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
