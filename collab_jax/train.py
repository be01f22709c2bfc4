"""Training and evaluation: config -> model -> state -> step -> metrics.

Top-level functions in the manner of the Flax ImageNet example:
`create_model`, `create_learning_rate_fn`, `create_optimizer`,
`create_train_state`, `train_step`, `eval_step`, `train_and_evaluate`.

Parallelism: one `jax.jit` over a 1-D device `Mesh` with axis `data` spanning
every device of every process. The batch is sharded on `data`, the train state
is replicated, the state buffers are donated. BatchNorm statistics are those of
the global batch (XLA inserts the reductions), i.e. synchronised BatchNorm.
"""

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import math
import os
import signal
import socket
import sys
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from collab_jax import heads as heads_lib
from collab_jax import input_pipeline
from collab_jax import logging_utils
from collab_jax import losses
from collab_jax import models
from collab_jax import semisup

METHODS = ('collaborative', 'label_smoothing', 'distillation', 'alternating',
           'mean_teacher')
STREAMING_DATASETS = ('imagenet2012',)
# Keys that may change between a run and its resumption without changing what
# is computed (logging, checkpoint cadence, where data lives, when to stop).
RESUMABLE_KEYS = ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
                  'data_dir', 'halt_after_steps', 'progress', 'allow_config_change',
                  'eval_every_epochs', 'max_nonfinite_streak')


class ConfigError(ValueError):
  """A bad configuration value; the message names the key and the fix."""


class WorkdirError(ValueError):
  """The workdir belongs to another run; the message says what to do."""


class NonFiniteError(RuntimeError):
  """Training produced too many consecutive non-finite losses or gradients."""


# ----------------------------------------------------------------------------
# Model, optimizer, state.


def create_model(config, num_classes):
  """The head tree of `config.model` for `num_classes` classes."""
  m = config.model
  stages = models.get_stages(m.name, num_classes, dtype=m.dtype,
                             **dict(m.get('kwargs', {})))
  return heads_lib.HeadTree(stages, tuple(tuple(s) for s in m.splits),
                            rescale=m.rescale, branch_impl=m.branch_impl,
                            remat=m.get('remat', False))


def create_learning_rate_fn(config, steps_per_epoch):
  """Learning rate per step: linear warm-up, then step decay or cosine."""
  base = base_learning_rate(config)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = total_steps(config, steps_per_epoch)
  if config.lr_schedule == 'step':
    boundaries = {int(round(e * steps_per_epoch)): config.lr_decay_factor
                  for e in config.lr_decay_epochs}
    main = optax.piecewise_constant_schedule(base, boundaries)
  elif config.lr_schedule == 'cosine':
    main = optax.cosine_decay_schedule(base, max(total - warmup, 1))
  elif config.lr_schedule == 'constant':
    main = optax.constant_schedule(base)
  else:
    raise ConfigError(
        f'lr_schedule={config.lr_schedule!r} is not one of step, cosine, '
        'constant.')
  if not warmup:
    return main
  if config.lr_schedule == 'step':  # decay boundaries count from step 0
    ramp = optax.linear_schedule(base / max(warmup, 1), base, warmup)
    return lambda step: jnp.where(step < warmup, ramp(step), main(step))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, base, warmup), main], [warmup])


def _decay_mask(params):
  """Weight decay on convolution and dense kernels only (not BN, not biases)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(config, lr_fn):
  """SGD with momentum and L2 weight decay added to the gradient.

  Weight decay is coupled (added to the gradient before momentum, like
  `torch.optim.SGD(weight_decay=...)` and the paper's TensorFlow L2 term), so
  every head's own layers see exactly the update of individual training.
  """
  if config.optimizer != 'sgd':
    raise ConfigError(f"optimizer={config.optimizer!r}: only 'sgd' is supported.")
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=_decay_mask),
      optax.sgd(lr_fn, momentum=config.momentum, nesterov=config.nesterov))
  if config.method == 'mean_teacher':  # the teacher rides in the optimizer state
    tx = optax.chain(tx, semisup.ema_teacher(config.mean_teacher.decay))
  return tx


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Consecutive and total updates skipped for a non-finite loss or gradient.
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def create_train_state(rng, config, model, image_shape, tx):
  """Initial parameters, BatchNorm statistics and optimizer state."""
  dummy = jnp.zeros((2,) + tuple(image_shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, train=False))(rng, dummy)
  params = variables['params']
  if config.method == 'alternating':
    opt_state = jax.vmap(tx.init)(params['level_1'])  # one per head
  else:
    opt_state = tx.init(params)
  # Separate buffers: they are donated to the train step one by one.
  zero = lambda: jnp.zeros((), jnp.int32)
  return TrainState(step=zero(), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=opt_state, nonfinite_streak=zero(),
                    nonfinite_total=zero())


# ----------------------------------------------------------------------------
# Steps.


def preprocess(rng, images, config, data_stats, train):
  """uint8 images -> augmented (train) and normalised float images."""
  if images.dtype != jnp.uint8:  # streamed data arrives preprocessed
    return images.astype(jnp.float32)
  if train and config.augment:
    images = input_pipeline.augment(rng, images, pad=config.augment_pad,
                                    flip=config.augment_flip)
  return input_pipeline.normalize(images, data_stats['mean'], data_stats['std'])


def _pair(total, count):
  return jnp.stack([jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)])


def _head_metrics(logits, labels, parts, loss, labeled=None):
  """Train metrics as (sum, count) pairs; head 1 is index 0; errors on labelled examples."""
  metrics = {'loss': _pair(loss, 1)}
  wrong = jnp.argmax(logits, -1) != labels[None]
  if labeled is None:
    errors, batch = jnp.sum(wrong, axis=1), labels.shape[0]
  else:
    errors, batch = jnp.sum(wrong * labeled[None], axis=1), jnp.sum(labeled)
  for h in range(logits.shape[0]):
    metrics[f'head_{h + 1}/hard'] = _pair(parts['hard'][h], 1)
    metrics[f'head_{h + 1}/soft'] = _pair(parts['soft'][h], 1)
    metrics[f'head_{h + 1}/error'] = _pair(100.0 * errors[h], batch)
  return metrics


def _loss_terms(logits, labels, config, teacher_logits=None, labeled=None,
                unlabeled_weight=1.0):
  """The method's per-head loss terms `{'hard', 'soft', 'total'}` ([H] each).

  `labeled` ([B] mask, None = all labelled) and `unlabeled_weight`: the
  semi-supervised loss of `losses.collaborative_head_losses`.
  """
  smoothing = config.label_smoothing if config.method == 'label_smoothing' else 0.0
  semi = dict(labeled=labeled, unlabeled_weight=unlabeled_weight)
  if config.method == 'mean_teacher':
    # The student's collaborative loss with the teacher as the only other
    # head: its consensus target is the teacher's softmax(z_t / T).
    pair = jnp.stack([logits[0], jax.lax.stop_gradient(teacher_logits)])
    parts = losses.collaborative_head_losses(
        pair, labels, beta=config.beta, temperature=config.temperature, **semi)
    return {k: v[:1] for k, v in parts.items()}
  if config.method == 'distillation':
    parts = losses.distillation_loss(logits[0], teacher_logits, labels,
                                     beta=config.beta,
                                     temperature=config.temperature)
    return {k: v[None] for k, v in parts.items()}
  return losses.collaborative_head_losses(
      logits, labels, beta=config.beta, temperature=config.temperature,
      label_smoothing=smoothing, consensus_gradient=config.consensus_gradient,
      **semi)


def _all_finite(*trees):
  """A scalar bool: every element of every leaf of `trees` is finite."""
  return jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def _guarded_update(state, new_state, loss, grads):
  """Applies `new_state` only if the loss, gradients and new state are finite.

  The new parameters and BatchNorm statistics are checked too: a finite
  gradient times a huge learning rate can still overflow them, and such a
  state must never be applied (or checkpointed).
  """
  finite = _all_finite(loss, grads, new_state.params, new_state.batch_stats)
  keep = lambda new, old: jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new, old)
  skipped = jnp.logical_not(finite).astype(jnp.int32)
  return state.replace(
      step=state.step + 1,
      params=keep(new_state.params, state.params),
      batch_stats=keep(new_state.batch_stats, state.batch_stats),
      opt_state=keep(new_state.opt_state, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + skipped), skipped


def train_step(state, batch, teacher_vars=None, *, model, tx, config,
               data_stats, teacher_apply=None, unlabeled_weight_fn=None):
  """One simultaneous optimizer step on all parameters (paper Sec. 3.2).

  Args:
    state: the replicated `TrainState` (donated).
    batch: {'image': [B, ...], 'label': int [B]}, sharded over `data`.
    teacher_vars: variables of the frozen teacher ensemble (distillation).
    model: the `HeadTree`.
    tx: the optax optimizer.
    config: the run config (static).
    data_stats: {'mean', 'std'} of the training images.
    teacher_apply: `teacher_apply(teacher_vars, images) -> [N, B, C]`.
    unlabeled_weight_fn: step -> weight of the unlabelled examples' consensus
      term (semi-supervised batches carry a `labeled` mask); default: constant
      `config.unlabeled_weight`.

  Returns:
    The new state and a dict of (sum, count) metric pairs.
  """
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  images = preprocess(rng, batch['image'], config, data_stats, train=True)
  labels = batch['label']
  heads = model.num_heads
  teacher_logits = None
  if teacher_apply is not None:
    teacher_logits = jnp.mean(teacher_apply(teacher_vars, images), axis=0)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
  labeled = batch.get('labeled')
  weight = (unlabeled_weight_fn(state.step) if unlabeled_weight_fn
            else config.get('unlabeled_weight', 1.0))
  if config.method == 'mean_teacher':  # train mode, its own augmentation
    teacher_images = preprocess(jax.random.fold_in(rng, 1), batch['image'],
                                config, data_stats, train=True)
    teacher_logits = jax.lax.stop_gradient(model.apply(
        {'params': semisup.teacher_params(state.opt_state),
         'batch_stats': state.batch_stats}, teacher_images, train=True,
        mutable=['batch_stats'])[0][0])

  def loss_fn(params):
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    parts = _loss_terms(logits, labels, config, teacher_logits, labeled, weight)
    loss = jnp.sum(parts['total']) * heads_lib.loss_scale(model.rescale, heads)
    return loss, (logits, parts, new_vars['batch_stats'])

  (loss, (logits, parts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state, skipped = _guarded_update(
      state, state.replace(params=params, batch_stats=batch_stats,
                           opt_state=opt_state), loss, grads)
  metrics = _head_metrics(logits, labels, parts, loss, labeled)
  metrics['nonfinite_skipped'] = _pair(skipped, 1)
  if labeled is not None or config.method == 'mean_teacher':
    metrics['unlabeled_weight'] = _pair(weight, 1)
  return new_state, metrics


def alternating_train_step(state, batch, teacher_vars=None, *, model, tx,
                           config, data_stats):
  """Deep Mutual Learning (Zhang et al. 2017): heads updated one after another.

  The tree must be `H` separate instances (`splits = ((0, H),)`). Head `h`'s
  update uses the logits of the other heads computed *after* heads `< h` were
  updated in this step, and its own optimizer state (`opt_state` is stacked
  per head). The loss of head `h` is the paper's `L_h` with its consensus.
  """
  del teacher_vars
  rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
  images = preprocess(rng, batch['image'], config, data_stats, train=True)
  labels = batch['label']
  heads = model.num_heads
  params, batch_stats, opt_state = state.params, state.batch_stats, state.opt_state
  all_finite = jnp.array(True)
  hard, soft, total = [], [], []
  logits = None
  for h in range(heads):
    def loss_fn(head_params, h=h):
      level = jax.tree.map(lambda a, p: a.at[h].set(p), params['level_1'],
                           head_params)
      logits, new_vars = model.apply(
          {'params': {**params, 'level_1': level}, 'batch_stats': batch_stats},
          images, train=True, mutable=['batch_stats'])
      parts = _loss_terms(logits, labels, config)
      return parts['total'][h], (logits, parts, new_vars['batch_stats'])

    head_params = jax.tree.map(lambda a, h=h: a[h], params['level_1'])
    (loss_h, (logits, parts, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(head_params)
    head_opt = jax.tree.map(lambda a, h=h: a[h], opt_state)
    updates, head_opt = tx.update(grads, head_opt, head_params)
    head_params = optax.apply_updates(head_params, updates)
    head_stats = (jax.tree.map(lambda a, h=h: a[h], new_stats['level_1'])
                  if batch_stats else {})
    finite = _all_finite(loss_h, grads, head_params, head_stats)
    all_finite &= finite
    put = lambda stacked, new, h=h: jax.tree.map(
        lambda a, n: a.at[h].set(jnp.where(finite, n, a[h])), stacked, new)
    params = {**params, 'level_1': put(params['level_1'], head_params)}
    opt_state = put(opt_state, head_opt)
    if batch_stats:
      batch_stats = {**batch_stats, 'level_1': put(batch_stats['level_1'],
                                                   head_stats)}
    hard.append(parts['hard'][h])
    soft.append(parts['soft'][h])
    total.append(parts['total'][h])
  parts = {'hard': jnp.stack(hard), 'soft': jnp.stack(soft),
           'total': jnp.stack(total)}
  loss = jnp.sum(parts['total'])
  skipped = jnp.logical_not(all_finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      opt_state=opt_state,
      nonfinite_streak=jnp.where(all_finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + skipped)
  metrics = _head_metrics(logits, labels, parts, loss)
  metrics['nonfinite_skipped'] = _pair(skipped, 1)
  return new_state, metrics


def eval_step(state, batch, teacher_vars=None, *, model, config, data_stats,
              teacher_apply=None):
  """Test metrics as (sum, count) pairs: every head, the ensemble of heads,
  and (distillation) the ensemble of teachers."""
  images = preprocess(None, batch['image'], config, data_stats, train=False)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       images, train=False)
  labels, mask = batch['label'], batch['mask']
  count = jnp.sum(mask)
  wrong = (jnp.argmax(logits, -1) != labels[None]) * mask[None]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, labels[None, :, None], -1)[..., 0] * mask[None]
  metrics = {}
  for h in range(logits.shape[0]):
    metrics[f'head_{h + 1}/error'] = _pair(100.0 * jnp.sum(wrong[h]), count)
    metrics[f'head_{h + 1}/loss'] = _pair(jnp.sum(nll[h]), count)
  ensemble = jnp.mean(logits, axis=0)
  metrics['ensemble/error'] = _pair(
      100.0 * jnp.sum((jnp.argmax(ensemble, -1) != labels) * mask), count)
  if teacher_apply is not None:
    teachers = jnp.mean(teacher_apply(teacher_vars, images), axis=0)
    metrics['teachers/error'] = _pair(
        100.0 * jnp.sum((jnp.argmax(teachers, -1) != labels) * mask), count)
  if logits.shape[-1] > 5:  # top-5 error (paper Table 4), where it means something
    def top5_wrong(z):
      top5 = jax.lax.top_k(z, 5)[1]
      return 100.0 * jnp.sum(~jnp.any(top5 == labels[:, None], -1) * mask)
    for h in range(logits.shape[0]):
      metrics[f'head_{h + 1}/top5_error'] = _pair(top5_wrong(logits[h]), count)
    metrics['ensemble/top5_error'] = _pair(top5_wrong(ensemble), count)
  return metrics


def reduce_metrics(pairs):
  """{name: [sum, count]} -> {name: sum / count} on the host."""
  pairs = jax.device_get(pairs)
  return {k: float(v[0] / max(v[1], 1e-12)) for k, v in pairs.items()}


def _accumulate(acc, metrics):
  return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


# ----------------------------------------------------------------------------
# Configuration checks and the workdir.


def total_steps(config, steps_per_epoch):
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def _versions():
  """Versions of Python and the libraries that computed a run."""
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {'python': sys.version.split()[0]}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy',
               'tensorflow', 'tensorflow-cpu', 'tensorflow-datasets'):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def base_learning_rate(config):
  """The peak learning rate: `learning_rate`, scaled by the batch if asked."""
  base = config.learning_rate
  if config.get('lr_scaling_batch', 0):
    base = base * config.batch_size / config.lr_scaling_batch
  return base


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
  """Raises ConfigError (one line) for values that cannot work.

  Runs before any work. A range that a component checks itself (the loss's
  beta and temperature, label smoothing's epsilon, the split topology) is
  checked by calling that component, and its ValueError becomes the
  ConfigError here, so each range is written once.
  """
  def bad(key, msg):
    raise ConfigError(f'config.{key}: {msg}')

  def component(key, check, *args):
    try:
      check(*args)
    except ValueError as e:
      raise ConfigError(f'config.{key}: {e}') from None

  # No NaN or infinity anywhere: none has a meaning, and config.json (strict
  # JSON) could not hold it.
  for key in _non_finite_keys(config.to_dict()):
    value = config
    for part in key.split('.'):
      value = value[part]
    bad(key, f'{value} is not a finite number.')
  for key in ('seed', 'noise_seed', 'subset_seed'):
    # numpy's generators need seeds >= 0 and jax.random.key an int64.
    if not 0 <= config[key] < 2**63:
      bad(key, f'{config[key]} must be an integer in [0, 2**63).')
  if config.method not in METHODS:
    bad('method', f'{config.method!r} is unknown; choose one of {", ".join(METHODS)}.')
  component('beta', losses._check_hyper, config.beta, 2.0)  # pylint: disable=protected-access
  component('temperature', losses._check_hyper, 0.5, config.temperature)  # pylint: disable=protected-access
  component('label_smoothing', losses.smooth_labels, jnp.zeros((1, 2)),
            config.label_smoothing)
  if config.method == 'label_smoothing' and not config.label_smoothing > 0:
    bad('label_smoothing', "method 'label_smoothing' needs an epsilon > 0, "
        'e.g. --config.label_smoothing=0.05.')
  if not 0.0 <= config.label_noise < 1.0:
    bad('label_noise', f'{config.label_noise} must be a fraction in [0, 1).')
  if config.label_noise_draws not in ('per_run', 'shared'):
    bad('label_noise_draws', f'{config.label_noise_draws!r} is not per_run or shared.')
  for key in ('batch_size', 'eval_batch_size', 'image_size'):
    if not config[key] > 0:
      bad(key, f'{config[key]} must be positive.')
  for key in ('train_subset', 'augment_pad'):
    if not config[key] >= 0:
      bad(key, f'{config[key]} must be >= 0.')
  if config.num_epochs <= 0 and not config.num_train_steps > 0:
    bad('num_epochs', 'set num_epochs > 0 or num_train_steps > 0.')
  if not config.lr_scaling_batch >= 0:
    bad('lr_scaling_batch', f'{config.lr_scaling_batch} must be >= 0 (0 = no '
        'scaling).')
  if not 0 < config.learning_rate < math.inf:
    bad('learning_rate', f'{config.learning_rate} must be positive and finite.')
  if not 0 < base_learning_rate(config) < math.inf:
    bad('learning_rate', f'{config.learning_rate} * batch_size / '
        f'lr_scaling_batch = {base_learning_rate(config)} must be positive and '
        'finite.')
  if not config.weight_decay >= 0:
    bad('weight_decay', f'{config.weight_decay} must be >= 0.')
  if not 0 <= config.momentum < 1:
    bad('momentum', f'{config.momentum} must be in [0, 1); the recipes use 0.9.')
  if not config.lr_decay_factor > 0:
    bad('lr_decay_factor', f'{config.lr_decay_factor} must be > 0 (the step '
        'schedule multiplies the learning rate by it).')
  if not all(isinstance(e, (int, float)) and e >= 0
             for e in tuple(config.lr_decay_epochs)):
    bad('lr_decay_epochs', f'{tuple(config.lr_decay_epochs)} must be epochs >= 0.')
  for key in ('warmup_epochs', 'eval_every_epochs'):
    if not config[key] >= 0:
      bad(key, f'{config[key]} must be >= 0.')
  if config.optimizer != 'sgd':
    bad('optimizer', f"{config.optimizer!r}: only 'sgd' is supported.")
  if config.lr_schedule not in ('step', 'cosine', 'constant'):
    bad('lr_schedule', f'{config.lr_schedule!r} is not one of step, cosine, '
        'constant.')
  datasets = input_pipeline.KNOWN_DATASETS + STREAMING_DATASETS
  if config.dataset not in datasets:
    bad('dataset', f'{config.dataset!r} is unknown; choose one of '
        f'{", ".join(datasets)}.')
  for key in ('log_every_steps', 'checkpoint_every_steps', 'keep_checkpoints',
              'max_nonfinite_streak', 'distill.num_teachers'):
    value = config
    for part in key.split('.'):
      value = value[part]
    if not value >= 1:
      bad(key, f'{value} must be >= 1.')
  try:
    dtype = jnp.dtype(config.model.dtype)
  except TypeError:
    bad('model.dtype', f'{config.model.dtype!r} is not a dtype; use float32 '
        'or bfloat16.')
  if not jnp.issubdtype(dtype, jnp.floating):
    bad('model.dtype', f'{config.model.dtype!r} is not a floating-point dtype; '
        'use float32 or bfloat16.')
  if config.model.rescale not in heads_lib.RESCALE_MODES:
    bad('model.rescale', f'{config.model.rescale!r} is not one of '
        f'{", ".join(heads_lib.RESCALE_MODES)}.')
  if config.model.branch_impl not in heads_lib.BRANCH_IMPLS:
    bad('model.branch_impl', f'{config.model.branch_impl!r} is not one of '
        f'{", ".join(heads_lib.BRANCH_IMPLS)}.')
  if config.model.name not in models.NETWORKS:
    bad('model.name', f'{config.model.name!r} is unknown; choose one of '
        f'{", ".join(sorted(models.NETWORKS))}.')
  kwargs = dict(config.model.get('kwargs', {}))
  for key, value in kwargs.items():  # width, growth_rate, ...: sizes
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
      bad(f'model.kwargs.{key}', f'{value} must be >= 1.')
  try:
    num_stages = len(models.get_stages(config.model.name, 2, **kwargs))
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.model.kwargs: {config.model.name}: {e}') from None
  try:
    splits = heads_lib.validate_splits(config.model.splits, num_stages)
  except ValueError as e:
    raise ConfigError(f'config.model.splits: {e}') from None
  heads = heads_lib.num_heads(splits)
  if config.method == 'alternating' and (len(splits) != 1 or splits[0][0] != 0):
    bad('model.splits', "method 'alternating' (Deep Mutual Learning) trains "
        f'separate networks: use splits ((0, H),), got {splits}.')
  if config.method == 'distillation':
    if splits:
      bad('model.splits', "method 'distillation' trains one student: use "
          f'splits (), got {splits}.')
    if config.beta >= 1.0:
      bad('beta', 'distillation needs beta < 1 (beta = 1 ignores the teacher).')
  if config.method in ('collaborative',) and heads == 1 and config.label_smoothing:
    pass  # plain smoothed single model is allowed
  try:
    semisup.check_config(config, heads)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.labeled_per_class and config.dataset in STREAMING_DATASETS:
    bad('labeled_per_class', f'not supported for streamed {config.dataset}; '
        'use an in-memory dataset.')
  n_dev = jax.device_count()
  if config.batch_size % n_dev:
    bad('batch_size', f'{config.batch_size} does not divide over {n_dev} '
        f'devices: use a multiple of {n_dev}.')
  if config.eval_batch_size % n_dev:
    bad('eval_batch_size', f'{config.eval_batch_size} does not divide over '
        f'{n_dev} devices: use a multiple of {n_dev}.')


LOCK_FILE = 'trainer.lock'


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds `<workdir>/trainer.lock` for the life of a run: one trainer per workdir.

  `fcntl.flock` is released by the kernel when the process ends, however it
  ends (kill -9 included), so a lock left by a dead process is never stale:
  the next run simply takes it. The holder's pid and host are written into the
  file for the refusal message only. Several processes (multi-host): each
  process takes its own file (`trainer.lock` for process 0, `trainer.lock.<i>`
  for process i), so a second multi-process run on the same workdir is refused
  by every one of its processes. flock works on local file systems and on NFS
  (Linux emulates it there with byte-range locks).

  Raises:
    WorkdirError: another live process holds the lock.
  """
  name = LOCK_FILE if jax.process_index() == 0 else (
      f'{LOCK_FILE}.{jax.process_index()}')
  path = os.path.join(workdir, name)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f'cannot open the lock file {path}: {e.strerror}.') from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = ''
      for _ in range(20):  # the holder writes its pid just after locking
        holder = os.pread(fd, 200, 0).decode('utf-8', 'replace').strip()
        if holder:
          break
        time.sleep(0.05)
      raise WorkdirError(
          f'workdir {workdir} is in use by another trainer '
          f'({holder or "pid unknown"}; lock {path}); wait for it to end or '
          'use another --workdir.') from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}'.encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _config_record(config):
  return json.loads(config.to_json_best_effort())


def read_json(path, what, fix):
  """JSON from a workdir file, or WorkdirError naming the file and `fix`."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except IsADirectoryError:
    raise WorkdirError(f'{path} is a directory, not a file ({what}): '
                       f'{fix}.') from None
  except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
    raise WorkdirError(f'{path} is not valid JSON ({what}): {fix}.') from None
  except OSError as e:
    raise WorkdirError(f'cannot read {path} ({what}): {e.strerror}.') from None


def check_workdir(config, workdir):
  """Refuses a workdir made by a different config (unless allowed).

  Returns:
    {flattened key: (old, new)} of the allowed changes (empty if none).
  """
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return {}
  old = read_json(path, 'the config of the run in this workdir',
                  'repair it, or remove it if the run never started')
  if not isinstance(old, dict):
    raise WorkdirError(f'{path} is not a config record (a JSON object): '
                       'repair it, or use a new --workdir.')
  old = _flatten(old)
  new = _flatten(_config_record(config))
  diff = sorted(k for k in set(old) | set(new)
                if k not in RESUMABLE_KEYS and old.get(k) != new.get(k))
  if diff and not config.allow_config_change:
    shown = ', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in diff[:4])
    raise WorkdirError(
        f'workdir {workdir} was made by a different config ({shown}'
        f'{" ..." if len(diff) > 4 else ""}); use a new --workdir, or pass '
        '--config.allow_config_change=True to continue it anyway.')
  return {k: (old.get(k), new.get(k)) for k in diff}


# ----------------------------------------------------------------------------
# Data sources.


@dataclasses.dataclass
class DataSource:
  """What the loop needs from the data: shapes, statistics and batches."""
  num_train: int
  num_classes: int
  image_shape: tuple
  stats: dict
  train_batch: Callable[[int], dict]      # step -> process-local batch
  eval_batches: Callable[[], Any]         # -> iterator of process-local batches


def create_data_source(config, start_step):
  """Loads the dataset of `config.dataset` for this process."""
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  data_dir = config.data_dir or None
  if config.dataset in STREAMING_DATASETS:
    num_train = input_pipeline.num_examples(config.dataset, 'train', data_dir)
    it = input_pipeline.imagenet_iterator(
        'train', global_batch=config.batch_size, process_index=p_idx,
        process_count=p_cnt, seed=config.seed, image_size=config.image_size,
        data_dir=data_dir, start_step=start_step)
    if config.label_noise:
      raise ConfigError('config.label_noise: not supported for streamed '
                        f'{config.dataset}; use an in-memory dataset.')
    def train_batch(step):
      del step  # the stream is positioned at start_step already
      return next(it)
    def eval_batches():
      return input_pipeline.imagenet_iterator(
          'validation', global_batch=config.eval_batch_size,
          process_index=p_idx, process_count=p_cnt, seed=config.seed,
          image_size=config.image_size, data_dir=data_dir)
    return DataSource(num_train, 1000,  # imagenet2012 classes
                      (config.image_size, config.image_size, 3),
                      {'mean': input_pipeline.IMAGENET_MEAN,
                       'std': input_pipeline.IMAGENET_STD},
                      train_batch, eval_batches)

  ds = input_pipeline.load_dataset(
      config.dataset, data_dir=data_dir, train_subset=config.train_subset,
      subset_seed=config.subset_seed)
  if ds.test_images.shape[1:] != ds.image_shape:
    raise input_pipeline.DatasetError(
        f'{config.dataset}: test images are {ds.test_images.shape[1:]} but '
        f'training images are {ds.image_shape}; both splits must have one shape.')
  if config.batch_size > ds.num_train:
    raise ConfigError(
        f'config.batch_size: {config.batch_size} is larger than the '
        f'{ds.num_train} training examples; lower it (or raise train_subset).')
  noise = input_pipeline.LabelNoise(
      ds.num_train, ds.num_classes, config.label_noise, config.noise_seed,
      run_seed=config.seed if config.label_noise_draws == 'per_run' else None)
  per_epoch = input_pipeline.steps_per_epoch(ds.num_train, config.batch_size)
  split = None
  if config.get('labeled_per_class', 0):  # semi-supervised: see LabeledSplit
    split = input_pipeline.LabeledSplit(
        ds.train_labels, config.labeled_per_class, ds.num_classes,
        seed=config.subset_seed, global_batch=config.batch_size,
        labeled_fraction=config.labeled_fraction_per_batch)

  def train_batch(step):
    if split is None:
      idx = input_pipeline.train_indices(step, num_examples=ds.num_train,
                                         global_batch=config.batch_size,
                                         seed=config.seed)
    else:
      idx, labeled = split.indices(step, run_seed=config.seed)
      labeled = input_pipeline.process_slice(labeled, p_idx, p_cnt)
    idx = input_pipeline.process_slice(idx, p_idx, p_cnt)
    labels = noise.labels(idx, ds.train_labels[idx], step // per_epoch)
    if split is None:
      return {'image': ds.train_images[idx], 'label': labels}
    return {'image': ds.train_images[idx],  # unlabelled examples: label -1
            'label': np.where(labeled, labels, -1).astype(np.int32),
            'labeled': labeled}

  def eval_batches():
    for b in input_pipeline.eval_batches(ds.test_images, ds.test_labels,
                                         config.eval_batch_size):
      yield {k: input_pipeline.process_slice(v, p_idx, p_cnt) for k, v in b.items()}

  return DataSource(ds.num_train, ds.num_classes, ds.image_shape,
                    {'mean': ds.mean, 'std': ds.std}, train_batch, eval_batches)


# ----------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_manager(workdir, config, cleanup=False):
  """The run's CheckpointManager; `cleanup` is for the training run only.

  `cleanup` removes the `<step>.orbax-checkpoint-tmp-*` folders of saves that
  a killed run left half-written (orbax never lists them as steps).
  """
  directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
  if os.path.exists(directory) and not os.path.isdir(directory):
    raise WorkdirError(f'{directory} is a file, not the checkpoint folder: '
                       'move it away and rerun (the run then starts over).')
  manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.keep_checkpoints, create=True,
          cleanup_tmp_directories=cleanup))
  if cleanup:
    # Orbax removes the folders in a background thread, and waits for it only
    # at the first save. Wait now: anything that patches file access in the
    # meantime (tfds.testing.mock_data does, process-wide) would redirect the
    # thread's paths, and a slow cleanup would race the restore.
    wait = getattr(manager, '_maybe_await_cleanup_tmp_directory', None)
    if wait is not None:
      wait()
  return manager


def restore_latest(manager, abstract_state, corrupt_dir=None):
  """Restores the newest readable checkpoint; falls back past corrupt ones.

  Args:
    manager: the run's `CheckpointManager`.
    abstract_state: shapes and dtypes of the state (`jax.eval_shape`).
    corrupt_dir: where the training run moves unreadable checkpoints newer
      than the one restored (`<corrupt_dir>/<step>_<time>`; never deleted).
      Left among the steps, a corrupt step would stop the manager from saving
      that step again and would count towards `max_to_keep`, so that garbage
      collection could delete the good ones. None (readers): leave them.

  Returns:
    (state or None, step restored or None).

  Raises:
    WorkdirError: with `corrupt_dir`, when there are checkpoints but none is
      readable (nothing is moved then: a person should look).
  """
  unreadable = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # pylint: disable=broad-except
      reason = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:160]}'
      logging.warning('checkpoint at step %d is unreadable (%s)', step, reason)
      if jax.process_index() == 0:
        print(f'warning: checkpoint at step {step} is unreadable ({reason}); '
              'trying the previous one.', flush=True)
      unreadable.append((step, reason))
      continue
    if corrupt_dir is not None and unreadable:
      _move_aside(manager, [s for s, _ in unreadable], corrupt_dir)
    return state, step
  if corrupt_dir is not None and unreadable:
    shown = '; '.join(f'step {s}: {r}' for s, r in unreadable[:2])
    raise WorkdirError(
        f'no checkpoint in {manager.directory} is readable ({shown}). If the '
        'config changed, use a new --workdir; if they are corrupt, move the '
        'checkpoints folder away and rerun to start over.')
  return None, None


def _move_aside(manager, steps, corrupt_dir):
  """Moves step folders out of the manager's sight (process 0 renames)."""
  stamp = time.strftime('%Y%m%dT%H%M%S')
  for step in steps:
    src = os.path.join(str(manager.directory), str(step))
    dest = os.path.join(corrupt_dir, f'{step}_{stamp}')
    if jax.process_index() == 0:
      os.makedirs(corrupt_dir, exist_ok=True)
      os.rename(src, dest)
      print(f'warning: moved the unreadable checkpoint {src} to {dest}.',
            flush=True)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('collab_jax:move_aside')
  manager.reload()


def export_variables(state, splits, head=0):
  """Head `head` of the trained tree as plain target-network variables."""
  variables = {'params': state.params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return heads_lib.export_head(jax.device_get(variables), splits, head)


def load_run_variables(workdir, config, num_classes, image_shape):
  """Variables of the latest checkpoint of a finished run in `workdir`."""
  model = create_model(config, num_classes)
  tx = create_optimizer(config, lambda s: 0.0)
  abstract = jax.eval_shape(
      lambda: create_train_state(jax.random.key(0), config, model, image_shape, tx))
  with _checkpoint_manager(workdir, config) as manager:
    state, step = restore_latest(manager, abstract)
  if state is None:
    raise ConfigError(f'no readable checkpoint in {workdir}/checkpoints.')
  return model, {'params': state.params, 'batch_stats': state.batch_stats}


# ----------------------------------------------------------------------------
# The loop.


class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag checked between steps."""

  def __init__(self):
    self.received = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
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

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _stop_requested(stop, is_log):
  """Whether to stop after this step for a signal.

  Several processes must stop at the same step (saving is collective) but a
  signal may reach them at different steps, so they agree on log steps only.
  """
  if jax.process_count() == 1:
    return stop.received is not None
  if not is_log:
    return False
  flags = multihost_utils.process_allgather(
      np.int32(stop.received is not None))
  return bool(np.any(flags))


def _forget_logs_after(workdir, step):
  """Drops `metrics.jsonl` records past `step`: a resumed run redoes them."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  def step_of(line):
    try:
      return json.loads(line)['step']
    except (ValueError, KeyError, TypeError):  # e.g. cut short by a kill
      return math.inf
  if not os.path.isfile(path):
    raise WorkdirError(f'{path} (the run\'s metric log) is not a file: move '
                       'it away and rerun.')
  # Undecodable bytes (a damaged line) become U+FFFD: that line is dropped.
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.readlines()
  keep = [l for l in lines if step_of(l) <= step]
  if len(keep) < len(lines):
    with open(path + '.tmp', 'w') as f:
      f.writelines(keep)
    os.replace(path + '.tmp', path)


def _check_trained(state, num_steps):
  """NonFiniteError unless the run trained: some update kept, finite state.

  With fewer steps than `max_nonfinite_streak` every update can be skipped
  without the streak check firing; such a run is the initialisation, and its
  results must not be reported as trained.
  """
  skipped = int(state.nonfinite_total)
  if skipped >= num_steps:
    raise NonFiniteError(
        f'all {num_steps} updates were skipped for a non-finite loss or '
        'gradient, so nothing was trained and no results.json was written. '
        'Lower --config.learning_rate or check the data, in a new --workdir.')
  if not bool(_all_finite(state.params, state.batch_stats)):
    raise NonFiniteError(
        'the final parameters or BatchNorm statistics are not finite; no '
        'results.json was written. Lower --config.learning_rate or check the '
        'data, in a new --workdir.')


def _compiled_stats(compiled):
  """FLOPs and memory of a compiled step, where the backend reports them."""
  out = {}
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and 'flops' in cost:
      out['flops_per_step'] = float(cost['flops'])
    if cost and 'bytes accessed' in cost:
      out['bytes_accessed_per_step'] = float(cost['bytes accessed'])
  except Exception:  # pylint: disable=broad-except
    pass
  try:
    mem = compiled.memory_analysis()
    if mem is not None:
      for k in ('temp_size_in_bytes', 'argument_size_in_bytes',
                'output_size_in_bytes', 'generated_code_size_in_bytes'):
        out[k] = int(getattr(mem, k, 0))
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _peak_memory_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def teacher_runs(config, workdir):
  """Phase 1 of distillation: `(config, workdir)` of every teacher run.

  The teachers are ordinary runs of the single network, trained on the labels
  alone and independently of each other (own seed, hence own initialisation,
  data order and augmentation), as an ensemble of separately trained networks
  is what the paper distils from. `distill.teacher_workdirs` names finished
  runs to use instead; otherwise teacher k (1-based) of a run with seed s
  trains in `<workdir>/teachers/teacher_<k>` with seed `1000 * (s + 1) + k`.
  """
  if config.distill.teacher_workdirs:
    out = []
    for teacher_dir in config.distill.teacher_workdirs:
      path = os.path.join(teacher_dir, 'config.json')
      try:
        with open(path) as f:
          out.append((ml_collections.ConfigDict(json.load(f)), teacher_dir))
      except (OSError, ValueError) as e:
        raise ConfigError(
            f'config.distill.teacher_workdirs: cannot read {path} ({e}); name '
            'the workdirs of finished collab_jax runs.') from None
    return out
  out = []
  for k in range(1, config.distill.num_teachers + 1):
    teacher = ml_collections.ConfigDict(config.to_dict())
    teacher.method = 'collaborative'
    teacher.beta = 1.0
    teacher.model.splits = ()
    teacher.seed = 1000 * (config.seed + 1) + k
    teacher.distill.teacher_workdirs = ()
    out.append((teacher, os.path.join(workdir, 'teachers', f'teacher_{k}')))
  return out


def train_teachers(config, workdir):
  """Trains (or resumes, or finds finished) every teacher run of `config`.

  Returns:
    True when every teacher has finished, False when one stopped early (a
    signal or `halt_after_steps`; rerunning resumes it).
  """
  runs = teacher_runs(config, workdir)
  for k, (teacher, teacher_dir) in enumerate(runs, 1):
    print(f'distillation phase 1/2: teacher {k}/{len(runs)} (seed '
          f'{teacher.seed}) in {teacher_dir}', flush=True)
    if train_and_evaluate(teacher, teacher_dir) is None:
      return False
  return True


def _load_teachers(config, workdir, data):
  """The finished teacher runs' variables and an apply giving [N, B, C] logits."""
  nets, variables, results = [], [], []
  for teacher, teacher_dir in teacher_runs(config, workdir):
    if not os.path.exists(os.path.join(teacher_dir, 'results.json')):
      raise ConfigError(
          f'distillation: teacher run {teacher_dir} has not finished; '
          'python -m collab_jax.main trains the teachers first '
          '(or call train.train_teachers).')
    model, v = load_run_variables(teacher_dir, teacher, data.num_classes,
                                  data.image_shape)
    results.append(read_json(os.path.join(teacher_dir, 'results.json'),
                             'results of the teacher run',
                             'remove it to train that teacher again'))
    nets.append(model)
    variables.append(v)

  def apply(teacher_vars, images):
    return jnp.stack([net.apply(v, images, train=False)[0]
                      for net, v in zip(nets, teacher_vars)])

  print('distillation phase 2/2: training the student against the mean logits '
        f'of {len(nets)} independently trained teachers', flush=True)
  return apply, variables, [r['head_1_test_error'] for r in results]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains the head tree of `config` in `workdir`, resuming if possible.

  Args:
    config: the run config (see configs/default.py).
    workdir: directory for checkpoints, logs, results and the exported head.

  Returns:
    The results dict also written to `workdir/results.json` (head 1's test
    error is the headline), or None when the run stopped early (signal or
    `halt_after_steps`) with a checkpoint to resume from.
  """
  validate_config(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f'workdir {workdir} exists and is not a directory.')
  # Read-only checks first, so that a refused or finished workdir is not
  # touched (not even its lock file) ...
  check_workdir(config, workdir)
  results = _finished_results(workdir)
  if results is not None:
    return results
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'cannot create workdir {workdir}: {e.strerror}.') from None
  with workdir_lock(workdir):
    # ... and again under the lock: a trainer that held it until now may
    # have written config.json or finished the run meanwhile.
    config_changes = check_workdir(config, workdir)
    results = _finished_results(workdir)
    if results is not None:
      return results
    try:
      return _train_and_evaluate_locked(config, workdir, config_changes)
    except Exception as e:  # pylint: disable=broad-except
      full = _disk_full(e)
      if full is None:
        raise
      where = f' writing {full.filename}' if full.filename else ''
      raise WorkdirError(
          f'no space left on the device of {workdir}{where} '
          f'({os.strerror(full.errno)}): free some space and rerun the same '
          'command; it resumes from the last complete checkpoint.') from None


def _disk_full(error):
  """The ENOSPC/EDQUOT OSError behind `error` (orbax wraps them), or None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC,
                                                      errno.EDQUOT):
      return error
    error = error.__cause__ or error.__context__
  return None


def _finished_results(workdir):
  """The results of a finished run in `workdir` (printed), or None."""
  path = os.path.join(workdir, 'results.json')
  if not os.path.exists(path):
    return None
  results = read_json(path, 'results.json of a finished run',
                      'remove it (and export/) to evaluate the last checkpoint '
                      'again')
  try:
    error = float(results['head_1_test_error'])
  except (KeyError, TypeError, ValueError):
    raise WorkdirError(
        f'{path} has no head_1_test_error: it is not the results of a run; '
        'remove it (and export/) to evaluate the last checkpoint again.'
    ) from None
  print(f'{workdir} already finished: head 1 test error {error:.2f}% '
        '(nothing to do).', flush=True)
  return results


def _train_and_evaluate_locked(config, workdir, config_changes):
  """train_and_evaluate past its checks, with the workdir lock held."""
  is_main = jax.process_index() == 0
  results_path = os.path.join(workdir, 'results.json')
  mesh = Mesh(np.array(jax.devices()), ('data',))
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P('data'))

  # The data source needs the start step (streams skip to it); read it from
  # the checkpoint directory before restoring.
  manager = _checkpoint_manager(workdir, config, cleanup=True)
  latest = manager.latest_step()
  data = create_data_source(config, latest or 0)
  steps_per_epoch = input_pipeline.steps_per_epoch(data.num_train, config.batch_size)
  num_steps = total_steps(config, steps_per_epoch)

  teacher_apply, teacher_vars, teacher_errors = None, {}, None
  if config.method == 'distillation':
    teacher_apply, teacher_vars, teacher_errors = _load_teachers(config, workdir, data)
    teacher_vars = jax.device_put(teacher_vars, replicated)

  model = create_model(config, data.num_classes)
  lr_fn = create_learning_rate_fn(config, steps_per_epoch)
  tx = create_optimizer(config, lr_fn)
  init = functools.partial(create_train_state, jax.random.key(config.seed),
                           config, model, data.image_shape, tx)
  abstract_state = jax.eval_shape(init)
  try:
    state, restored_step = restore_latest(
        manager, abstract_state,
        corrupt_dir=os.path.join(workdir, 'corrupt_checkpoints'))
  except WorkdirError:
    manager.close()
    raise
  if restored_step != latest:  # fell back: the stream must start there
    data = create_data_source(config, restored_step or 0)
  if state is None:
    state = init()
    if is_main:
      logging_utils.write_json_atomic(os.path.join(workdir, 'config.json'),
                                      _config_record(config))
  else:
    print(f'resuming from the checkpoint at step {restored_step}', flush=True)
    if config_changes and is_main:  # allowed: record what changed, and when
      with open(os.path.join(workdir, 'config_changes.jsonl'), 'a') as f:
        f.write(json.dumps({'step': restored_step, 'changes': {
            k: list(v) for k, v in config_changes.items()}}) + '\n')
      logging_utils.write_json_atomic(os.path.join(workdir, 'config.json'),
                                      _config_record(config))
  state = jax.device_put(state, replicated)
  start_step = int(state.step)
  if is_main:
    _forget_logs_after(workdir, start_step)

  stats = {k: tuple(float(x) for x in v) for k, v in data.stats.items()}
  step_impl = alternating_train_step if config.method == 'alternating' else train_step
  step_kwargs = dict(model=model, tx=tx, config=config, data_stats=stats)
  eval_kwargs = dict(model=model, config=config, data_stats=stats)
  if teacher_apply is not None:
    step_kwargs['teacher_apply'] = teacher_apply
    eval_kwargs['teacher_apply'] = teacher_apply
  if step_impl is train_step:
    step_kwargs['unlabeled_weight_fn'] = semisup.unlabeled_weight_fn(
        config, steps_per_epoch)
  # On XLA:CPU keep the residual outputs' optimisation barriers through
  # fusion (models.layers.materialize; measured in experiments/results/bench.md).
  options = models.compiler_options(jax.devices()[0].platform) or None
  jit_train = jax.jit(functools.partial(step_impl, **step_kwargs),
                      in_shardings=(replicated, data_sharding, replicated),
                      out_shardings=(replicated, replicated),
                      donate_argnums=(0,), compiler_options=options)
  jit_eval = jax.jit(functools.partial(eval_step, **eval_kwargs),
                     in_shardings=(replicated, data_sharding, replicated),
                     out_shardings=replicated)

  def to_global(local):
    return {k: jax.make_array_from_process_local_data(data_sharding, np.asarray(v))
            for k, v in local.items()}

  def evaluate(state):
    acc = None
    for local in data.eval_batches():
      acc = _accumulate(acc, jit_eval(state, to_global(local), teacher_vars))
    return reduce_metrics(acc)

  writer = logging_utils.MetricWriter(workdir, enabled=is_main)
  first = to_global(data.train_batch(start_step))
  t_compile = time.time()
  compiled = jit_train.lower(state, first, teacher_vars).compile()
  compile_s = time.time() - t_compile
  program = _compiled_stats(compiled)
  run_info = {'devices': jax.device_count(), 'processes': jax.process_count(),
              'platform': jax.devices()[0].platform,
              'device_kind': jax.devices()[0].device_kind,
              'global_batch': config.batch_size, 'heads': model.num_heads,
              'steps_per_epoch': steps_per_epoch, 'num_train_steps': num_steps,
              'train_examples': data.num_train, 'compile_s': compile_s, **program,
              'versions': _versions()}
  if is_main:
    logging_utils.write_json_atomic(os.path.join(workdir, 'run_info.json'), run_info)
    print(f'collab_jax: {config.model.name} splits={tuple(config.model.splits)} '
          f'({model.num_heads} heads), method={config.method}, '
          f'{jax.device_count()} {run_info["platform"]} device(s) in '
          f'{jax.process_count()} process(es), global batch {config.batch_size}, '
          f'{num_steps} steps ({steps_per_epoch}/epoch), start at step '
          f'{start_step}', flush=True)

  progress = logging_utils.Progress(num_steps, config.batch_size, start_step,
                                    enabled=is_main and config.progress)
  acc, batch = None, first
  stop_reason = None
  step_times = []
  t_last, s_last = time.time(), start_step
  t_train = time.time()
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch))) \
      if config.eval_every_epochs > 0 else None
  with _StopSignal() as stop, manager:
    step = start_step
    while step < num_steps:
      state, metrics = compiled(state, batch, teacher_vars)
      acc = _accumulate(acc, metrics)
      step += 1
      if step < num_steps:
        batch = to_global(data.train_batch(step))  # overlaps the running step
      is_log = step % config.log_every_steps == 0 or step == num_steps
      if is_log:
        summary = reduce_metrics(acc)
        acc = None
        now = time.time()
        step_time = (now - t_last) / max(step - s_last, 1)
        step_times.append(step_time)
        t_last, s_last = now, step
        summary['lr'] = float(lr_fn(step - 1))
        summary['step_time_s'] = step_time
        summary['images_per_s'] = config.batch_size / step_time
        summary['epoch'] = step / steps_per_epoch
        writer.write(step, summary, 'train')
        progress.update(step, loss=summary['loss'],
                        err1=summary['head_1/error'])
        streak = int(state.nonfinite_streak)
        if streak >= config.max_nonfinite_streak:
          manager.wait_until_finished()
          progress.close()
          writer.close()
          raise NonFiniteError(
              f'{streak} consecutive steps had a non-finite loss or gradient '
              f'(up to step {step}); their updates were skipped and the last '
              'good checkpoint is intact. Lower --config.learning_rate (with '
              '--config.allow_config_change=True to resume) or check the data.')
      if eval_every and step % eval_every == 0 and step < num_steps:
        ev = evaluate(state)
        writer.write(step, ev, 'eval')
      if step % config.checkpoint_every_steps == 0 or step == num_steps:
        manager.save(step, args=ocp.args.StandardSave(state))
      signalled = _stop_requested(stop, is_log)
      # Only at that very step: rerunning the same command resumes past it.
      halt = (config.halt_after_steps > 0 and step == config.halt_after_steps
              and step < num_steps)
      if signalled or halt:
        stop_reason = ((stop.received or 'a signal to another process')
                       if signalled else
                       f'halt_after_steps={config.halt_after_steps}')
        if manager.latest_step() != step:
          manager.save(step, args=ocp.args.StandardSave(state), force=True)
        break
    manager.wait_until_finished()
  progress.close()
  train_s = time.time() - t_train

  if stop_reason is not None:
    print(f'stopped at step {step} ({stop_reason}); checkpoint saved. Rerun '
          'the same command to resume.', flush=True)
    writer.close()
    return None

  _check_trained(state, num_steps)
  final = evaluate(state)
  bad = sorted(k for k, v in final.items() if not math.isfinite(v))
  if bad:
    writer.close()
    raise NonFiniteError(
        f'the final evaluation is not finite ({", ".join(bad[:3])}); no '
        'results.json was written. Lower --config.learning_rate or check the '
        'data.')
  writer.write(num_steps, final, 'eval')
  heads = model.num_heads
  results = {
      'head_1_test_error': final['head_1/error'],
      'head_test_errors': [final[f'head_{h + 1}/error'] for h in range(heads)],
      'ensemble_test_error': final['ensemble/error'],
      **({'head_1_test_top5_error': final['head_1/top5_error'],
          'head_test_top5_errors': [final[f'head_{h + 1}/top5_error']
                                    for h in range(heads)],
          'ensemble_test_top5_error': final['ensemble/top5_error']}
         if 'head_1/top5_error' in final else {}),
      'head_1_test_loss': final['head_1/loss'],
      'steps': num_steps,
      'epochs': num_steps / steps_per_epoch,
      'nonfinite_skipped': int(state.nonfinite_total),
      'train_time_s_this_session': train_s,
      'median_step_time_s': float(np.median(step_times)) if step_times else None,
      'peak_memory_bytes': _peak_memory_bytes(),
      **run_info,
  }
  if teacher_errors is not None:
    results['teacher_test_errors'] = teacher_errors
    results['teacher_ensemble_test_error'] = final['teachers/error']
  # Every process takes part in the save (orbax synchronises them); process 0
  # writes the files. An existing export (e.g. written just before a crash)
  # is kept; orbax writes to a temporary folder and renames it when complete.
  export_dir = os.path.abspath(os.path.join(workdir, 'export', 'head_1'))
  if not os.path.exists(export_dir):
    exported = export_variables(state, tuple(tuple(s) for s in config.model.splits),
                                0)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(export_dir, exported)
  if is_main:
    logging_utils.write_json_atomic(results_path, results)
  writer.write(num_steps, {'head_1_test_error': results['head_1_test_error']}, 'final')
  writer.close()
  print(f'done: head 1 test error {results["head_1_test_error"]:.2f}% '
        f'(heads: {", ".join(f"{e:.2f}" for e in results["head_test_errors"])}; '
        f'ensemble of heads, for reference only: '
        f'{results["ensemble_test_error"]:.2f}%) after {num_steps} steps', flush=True)
  return results
