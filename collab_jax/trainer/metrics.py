"""Metric names and their (sum, count) arithmetic: producers and readers share them.

Metrics leave the jitted steps as (sum, count) pairs, are summed on the
device between log steps and divided once on the host (`reduce`). Heads are
numbered from 1 in names ("head 1" is the deployed network, index 0).
"""

import jax
import jax.numpy as jnp

ENSEMBLE = 'ensemble'   # the heads' mean logits, for reference only
TEACHERS = 'teachers'   # distillation: the teachers' mean logits
# Train metric: the share of steps whose head-1 cross-entropy was above the
# divergence threshold (steps.DIVERGENCE_FACTOR).
DIVERGING = 'diverging'


def head(index: int, name: str) -> str:
  """The name of metric `name` of the head with 0-based `index`: `head_1/error`."""
  return f'head_{index + 1}/{name}'


def pair(total, count):
  """A (sum, count) metric as one float32 [2] array."""
  return jnp.stack([jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)])


def accumulate(acc, metrics):
  """Sums (sum, count) metric pairs on the device; `acc` None starts anew."""
  return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


def reduce(pairs):
  """{name: [sum, count]} -> {name: sum / count} on the host."""
  pairs = jax.device_get(pairs)
  return {k: float(v[0] / max(v[1], 1e-12)) for k, v in pairs.items()}


def per_head(values, heads: int, name: str):
  """`[values[head(h, name)] for h < heads]`: one metric of every head."""
  return [values[head(h, name)] for h in range(heads)]


def results(values, heads: int, split: str):
  """The results.json fields of an evaluation on `split` ('test', 'train_clean')."""
  suffix = '' if split == 'test' else '_clean'
  split = 'train' if split == 'train_clean' else split
  out = {f'head_1_{split}_error{suffix}': values[head(0, 'error')],
         f'head_{split}_errors{suffix}': per_head(values, heads, 'error'),
         f'{ENSEMBLE}_{split}_error{suffix}': values[f'{ENSEMBLE}/error']}
  if head(0, 'top5_error') in values:
    out.update({f'head_1_{split}_top5_error{suffix}': values[head(0, 'top5_error')],
                f'head_{split}_top5_errors{suffix}': per_head(values, heads, 'top5_error'),
                f'{ENSEMBLE}_{split}_top5_error{suffix}': values[f'{ENSEMBLE}/top5_error']})
  return out
