"""Every random stream of a run, each under its own tag.

numpy's `default_rng(list)` pads seed lists with zeros, so untagged lists
of different streams can coincide (`[seed, epoch]` of the batch order and
`[noise_seed, 0]` of the corrupted set were the same stream for seed 0 and
epoch 0). Every stream here starts with a tag of its own, and each tag is
always followed by the same number of values, each as two 32-bit words (a
seed up to 2**63 would otherwise take one word or two, and shift the
others), so no two streams, and no two arguments of one stream, share a seed
sequence. `tests/test_streams.py`
checks this over a grid of seeds.

The JAX streams (parameter initialisation, on-device augmentation) are
`fold_in`s of `jax.random.key(seed)` by tags of their own.
"""

import jax
import numpy as np

# numpy streams: (tag, number of values after it).
ORDER = 0x0da7a0
LABELED_ORDER = 0x1abe1ed
UNLABELED_ORDER = 0x0b1abe1
NOISE_SET = 0x5e7c0
NOISE_SHARED = 0x5ba3ed
NOISE_PER_RUN = 0x9e3d4a
SUBSET = 0x5eb5e7  # also the labelled split: it *is* the subset (see LabeledSplit)
IMAGENET = 0x1a6e7
NUMPY_STREAMS = {
    'order': (ORDER, 2), 'labeled_order': (LABELED_ORDER, 2),
    'unlabeled_order': (UNLABELED_ORDER, 2), 'noise_set': (NOISE_SET, 1),
    'noise_shared': (NOISE_SHARED, 2), 'noise_per_run': (NOISE_PER_RUN, 3),
    'subset': (SUBSET, 1), 'imagenet': (IMAGENET, 2),
}

# JAX streams: fold_in tags of jax.random.key(seed).
INIT = 1
AUGMENT = 2


def rng(stream, *values):
  """`np.random.default_rng` of `stream` (a key of NUMPY_STREAMS) at `values`."""
  tag, count = NUMPY_STREAMS[stream]
  if len(values) != count:
    raise ValueError(f'stream {stream!r} takes {count} values, got {len(values)}.')
  words = [tag]
  for v in values:
    v = int(v)
    if not 0 <= v < 2**64:
      raise ValueError(f'stream {stream!r}: {v} is outside [0, 2**64).')
    words += [v & 0xFFFFFFFF, v >> 32]
  return np.random.default_rng(words)


def init_key(seed):
  """The key that initialises the parameters of a run with `seed`."""
  return jax.random.fold_in(jax.random.key(seed), INIT)


def augment_key(seed, step):
  """The key of step `step`'s on-device augmentation (traced `step` is fine)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), AUGMENT), step)
