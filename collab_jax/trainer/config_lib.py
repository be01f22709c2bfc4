"""Checks of a run config before any work: one `ConfigError` line per mistake.

Each value is checked once, where it is used: the model (`get_stages`,
`HeadTree`), the learning-rate schedule and optimizer (`steps`), the loss
(`losses`) and the label noise (`label_noise.LabelNoise`) check their own
arguments. `validate_config` builds them all abstractly, so that their errors
come before any work and name the config key, and checks here only what no
single component sees: values that must go into strict JSON, seeds that
several components use, the trainer's own bookkeeping keys, and keys that
depend on each other (method x splits, batch size x devices, ...).
"""

import math

import jax
import jax.numpy as jnp

from collab_jax import errors
from collab_jax import losses
from collab_jax.data import label_noise
from collab_jax.data import source as data_lib
from collab_jax.trainer import semisup
from collab_jax.trainer import steps

METHODS = ('collaborative', 'label_smoothing', 'distillation', 'alternating',
           'mean_teacher')


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


def validate_config(config):
  """Raises ConfigError (one line) for values that cannot work."""
  # No NaN or infinity anywhere: none has a meaning, and config.json (strict
  # JSON) could not hold it.
  for key in _non_finite_keys(config.to_dict()):
    _bad(key, f'{_get(config, key)} is not a finite number.')
  for key in ('seed', 'noise_seed', 'subset_seed'):
    # numpy's generators need seeds >= 0 and jax.random.key an int64.
    if not 0 <= config[key] < 2**63:
      _bad(key, f'{config[key]} must be an integer in [0, 2**63).')
  if config.method not in METHODS:
    _bad('method', f'{config.method!r} is unknown; choose one of '
         f'{", ".join(METHODS)}.')
  _check_bookkeeping(config)
  model = steps.create_model(config, num_classes=10)
  _check_combinations(config, model.num_heads)
  lr_fn = steps.create_learning_rate_fn(config, steps_per_epoch=10)
  steps.create_optimizer(config, lr_fn)
  # The loss of the method, traced only; label smoothing's epsilon also when
  # the method does not use it (a value set for nothing is a mistake too).
  logits = jax.ShapeDtypeStruct((model.num_heads, 2, 10), jnp.float32)
  labels = jax.ShapeDtypeStruct((2,), jnp.int32)
  with errors.config_keys('beta', beta='beta', temperature='temperature'):
    jax.eval_shape(lambda z, y: steps.loss_terms(z, y, config, z[0]),
                   logits, labels)
  with errors.config_keys('label_smoothing'):
    losses.smooth_labels(jnp.zeros((1, 2)), config.label_smoothing)
  with errors.config_keys('label_noise', level='label_noise'):
    label_noise.LabelNoise(1, 2, config.label_noise, config.noise_seed)


def _check_bookkeeping(config):
  """The trainer's own keys (data choice and sizes, logging, checkpoints)."""
  if config.dataset not in data_lib.DATASETS:  # in memory or streamed
    _bad('dataset', f'{config.dataset!r} is unknown; choose one of '
         f'{", ".join(data_lib.DATASETS)}.')
  if config.label_noise_draws not in ('per_run', 'shared'):
    _bad('label_noise_draws', f'{config.label_noise_draws!r} is not per_run or '
         'shared.')
  if not config.image_size > 0:
    _bad('image_size', f'{config.image_size} must be positive.')
  for key in ('train_subset', 'augment_pad'):
    if not config[key] >= 0:
      _bad(key, f'{config[key]} must be >= 0.')
  if config.num_epochs <= 0 and not config.num_train_steps > 0:
    _bad('num_epochs', 'set num_epochs > 0 or num_train_steps > 0.')
  if not config.eval_every_epochs >= 0:
    _bad('eval_every_epochs', f'{config.eval_every_epochs} must be >= 0.')
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'max_nonfinite_streak', 'distill.num_teachers'):
    if not _get(config, key) >= 1:
      _bad(key, f'{_get(config, key)} must be >= 1.')


def _check_combinations(config, heads):
  """Keys that are only wrong together."""
  splits = tuple(tuple(s) for s in config.model.splits)
  if config.method == 'label_smoothing' and not config.label_smoothing > 0:
    _bad('label_smoothing', "method 'label_smoothing' needs an epsilon > 0, "
         'e.g. --config.label_smoothing=0.05.')
  if config.method == 'alternating' and (len(splits) != 1 or splits[0][0] != 0):
    _bad('model.splits', "method 'alternating' (Deep Mutual Learning) trains "
         f'separate networks: use splits ((0, H),), got {splits}.')
  if config.method == 'distillation':
    if splits:
      _bad('model.splits', "method 'distillation' trains one student: use "
           f'splits (), got {splits}.')
    if config.beta >= 1.0:
      _bad('beta', 'distillation needs beta < 1 (beta = 1 ignores the teacher).')
  try:
    semisup.check_config(config, heads)  # its messages name their keys
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None
  if config.dataset in data_lib.STREAMING_DATASETS:
    for key in ('labeled_per_class', 'label_noise', 'eval_train_clean'):
      if config[key]:
        _bad(key, f'not supported for streamed {config.dataset}; use an '
             'in-memory dataset.')
  n_dev = jax.device_count()
  for key in ('batch_size', 'eval_batch_size'):  # global batches over devices
    if not config[key] > 0:
      _bad(key, f'{config[key]} must be positive.')
    if config[key] % n_dev:
      _bad(key, f'{config[key]} does not divide over {n_dev} devices: use a '
           f'multiple of {n_dev}.')
