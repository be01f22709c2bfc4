"""Checks of a run config that no single component sees: one `ConfigError` line each.

Every other value is checked once, where it is used, when the trainer builds
that component (`train.build`): the data source, the model (`get_stages`,
`HeadTree`), the learning-rate schedule and optimizer (`steps`), the method
and its loss (`methods`), the label noise. Here: values that must go into
strict JSON, seeds that several components use, the trainer's own
bookkeeping keys, and the batch sizes against the devices.
"""

import math

import jax
import jax.numpy as jnp

from collab_jax import errors
from collab_jax import losses


def _bad(key, msg):
  raise errors.ConfigError(f'config.{key}: {msg}')


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def _non_finite_keys(record, prefix=''):
  """Flattened keys of `record` holding a NaN or an infinity (also in tuples)."""
  out = []
  for k, v in record.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out += _non_finite_keys(v, f'{key}.')
    elif isinstance(v, (list, tuple)):
      if any(isinstance(x, float) and not math.isfinite(x)
             for x in jax.tree.leaves(list(v))):
        out.append(key)
    elif isinstance(v, float) and not math.isfinite(v):
      out.append(key)
  return out


def check(config):
  """Raises ConfigError (one line) for values that cannot work."""
  # No NaN or infinity anywhere: none has a meaning, and config.json (strict
  # JSON) could not hold it.
  for key in _non_finite_keys(config.to_dict()):
    _bad(key, f'{_get(config, key)} is not a finite number.')
  for key in ('seed', 'noise_seed', 'subset_seed'):
    # numpy's generators need seeds >= 0 and jax.random.key an int64.
    if not 0 <= config[key] < 2**63:
      _bad(key, f'{config[key]} must be an integer in [0, 2**63).')
  if config.label_noise_draws not in ('per_run', 'shared'):
    _bad('label_noise_draws', f'{config.label_noise_draws!r} is not per_run or '
         'shared.')
  if not config.image_size > 0:
    _bad('image_size', f'{config.image_size} must be positive.')
  for key in ('train_subset', 'augment_pad', 'labeled_per_class'):
    if not config[key] >= 0:
      _bad(key, f'{config[key]} must be >= 0.')
  if not 0.0 < config.labeled_fraction_per_batch < 1.0:
    _bad('labeled_fraction_per_batch', f'{config.labeled_fraction_per_batch} '
         'must be in (0, 1).')
  if config.num_epochs <= 0 and not config.num_train_steps > 0:
    _bad('num_epochs', 'set num_epochs > 0 or num_train_steps > 0.')
  if not config.eval_every_epochs >= 0:
    _bad('eval_every_epochs', f'{config.eval_every_epochs} must be >= 0.')
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'max_nonfinite_streak'):
    if not _get(config, key) >= 1:
      _bad(key, f'{_get(config, key)} must be >= 1.')
  if not config.max_divergent_steps >= 0:
    _bad('max_divergent_steps', f'{config.max_divergent_steps} must be >= 0 (0 '
         '= never stop for divergence).')
  # The smoothing epsilon also when the method does not use it (a value set
  # for nothing is a mistake too).
  with errors.config_keys('label_smoothing'):
    losses.smooth_labels(jnp.zeros((1, 2)), config.label_smoothing)
  n_dev = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):  # global batches over devices
    if not config[key] > 0:
      _bad(key, f'{config[key]} must be positive.')
    if config[key] % n_dev:
      _bad(key, f'{config[key]} does not divide over {n_dev} devices: use a '
           f'multiple of {n_dev}.')
