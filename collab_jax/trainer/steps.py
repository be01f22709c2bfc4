"""Model, optimizer, train state and the jitted steps: config -> state -> step.

Parallelism: one `jax.jit` over a 1-D device `Mesh` with axis `data` spanning
every device of every process (`make_train_step`). The batch is sharded on
`data`, the train state is replicated, the state buffers are donated.
BatchNorm statistics are those of the global batch (XLA inserts the
reductions), i.e. synchronised BatchNorm.

Metrics leave the steps as (sum, count) pairs, summed on the device between
log steps and divided once on the host (`reduce_metrics`).
"""

import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from collab_jax import errors
from collab_jax import heads as heads_lib
from collab_jax import losses
from collab_jax import models
from collab_jax.data import augment
from collab_jax.data import streams
from collab_jax.trainer import semisup

LR_SCHEDULES = ('step', 'cosine', 'constant')


# ----------------------------------------------------------------------------
# Model, learning rate, optimizer, state.


def _bad(key, msg):
  raise errors.ConfigError(f'config.{key}: {msg}')


def create_model(config, num_classes):
  """The head tree of `config.model` for `num_classes` classes."""
  m = config.model
  kwargs = dict(m.get('kwargs', {}))
  with errors.config_keys('model.kwargs', name='model.name', dtype='model.dtype',
                          **{k: f'model.kwargs.{k}' for k in kwargs}):
    stages = models.get_stages(m.name, num_classes, dtype=m.dtype, **kwargs)
  with errors.config_keys('model.splits', splits='model.splits',
                          rescale='model.rescale',
                          branch_impl='model.branch_impl'):
    return heads_lib.HeadTree(
        stages, heads_lib.validate_splits(m.splits, len(stages)),
        rescale=m.rescale, branch_impl=m.branch_impl,
        remat=m.get('remat', False))


def total_steps(config, steps_per_epoch):
  if config.num_train_steps and config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def base_learning_rate(config):
  """The peak learning rate: `learning_rate`, scaled by the batch if asked."""
  if not 0 < config.learning_rate < math.inf:
    _bad('learning_rate', f'{config.learning_rate} must be positive and finite.')
  if not config.lr_scaling_batch >= 0:
    _bad('lr_scaling_batch', f'{config.lr_scaling_batch} must be >= 0 (0 = no '
        'scaling).')
  base = config.learning_rate
  if config.lr_scaling_batch:
    base = base * config.batch_size / config.lr_scaling_batch
    if not 0 < base < math.inf:
      _bad('learning_rate', f'{config.learning_rate} * batch_size / '
          f'lr_scaling_batch = {base} must be positive and finite.')
  return base


def create_learning_rate_fn(config, steps_per_epoch):
  """Learning rate per step: linear warm-up, then step decay or cosine."""
  if config.lr_schedule not in LR_SCHEDULES:
    _bad('lr_schedule', f'{config.lr_schedule!r} is not one of '
        f'{", ".join(LR_SCHEDULES)}.')
  if not config.warmup_epochs >= 0:
    _bad('warmup_epochs', f'{config.warmup_epochs} must be >= 0.')
  if not config.lr_decay_factor > 0:
    _bad('lr_decay_factor', f'{config.lr_decay_factor} must be > 0 (the step '
        'schedule multiplies the learning rate by it).')
  if not all(isinstance(e, (int, float)) and e >= 0
             for e in tuple(config.lr_decay_epochs)):
    _bad('lr_decay_epochs', f'{tuple(config.lr_decay_epochs)} must be epochs >= 0.')
  base = base_learning_rate(config)
  warmup = int(round(config.warmup_epochs * steps_per_epoch))
  total = total_steps(config, steps_per_epoch)
  if config.lr_schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, base, warmup,
                                              max(total, warmup + 1))
  if config.lr_schedule == 'constant':
    ramp, main = optax.linear_schedule(0.0, base, warmup), optax.constant_schedule(base)
  else:  # the decay epochs count from step 0, warm-up included
    ramp = optax.linear_schedule(base / max(warmup, 1), base, warmup)
    main = optax.piecewise_constant_schedule(
        base, {int(round(e * steps_per_epoch)) - warmup: config.lr_decay_factor
               for e in config.lr_decay_epochs})
  return optax.join_schedules([ramp, main], [warmup]) if warmup else main


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
    _bad('optimizer', f"{config.optimizer!r}: only 'sgd' is supported.")
  if not 0 <= config.momentum < 1:
    _bad('momentum', f'{config.momentum} must be in [0, 1); the recipes use 0.9.')
  if not config.weight_decay >= 0:
    _bad('weight_decay', f'{config.weight_decay} must be >= 0.')
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


def _pair(total, count):
  return jnp.stack([jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)])


def _head_metrics(logits, labels, parts, loss, labeled=None):
  """Train metrics as (sum, count) pairs; head 1 is index 0; errors on labelled examples."""
  metrics = {'loss': _pair(loss, 1)}
  wrong = jnp.argmax(logits, -1) != labels[None]
  if labeled is None:
    num_wrong, batch = jnp.sum(wrong, axis=1), labels.shape[0]
  else:
    num_wrong, batch = jnp.sum(wrong * labeled[None], axis=1), jnp.sum(labeled)
  for h in range(logits.shape[0]):
    metrics[f'head_{h + 1}/hard'] = _pair(parts['hard'][h], 1)
    metrics[f'head_{h + 1}/soft'] = _pair(parts['soft'][h], 1)
    metrics[f'head_{h + 1}/error'] = _pair(100.0 * num_wrong[h], batch)
  return metrics


def loss_terms(logits, labels, config, teacher_logits=None, labeled=None,
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


def all_finite(*trees):
  """A scalar bool: every element of every leaf of `trees` is finite."""
  return jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def _guarded_update(state, new_state, loss, grads):
  """Applies `new_state` only if the loss, gradients and new state are finite.

  The new parameters and BatchNorm statistics are checked too: a finite
  gradient times a huge learning rate can still overflow them, and such a
  state must never be applied (or checkpointed). One decision covers the whole
  state, optimizer included (optax.apply_if_finite sees only the gradient).
  """
  finite = all_finite(loss, grads, new_state.params, new_state.batch_stats)
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
    config: the run config (static); `config.model.rescale == 'loss'` divides
      the summed loss by the number of heads (the ablation of Table 3).
    data_stats: {'mean', 'std'} of the training images.
    teacher_apply: `teacher_apply(teacher_vars, images) -> [N, B, C]`.
    unlabeled_weight_fn: step -> weight of the unlabelled examples' consensus
      term (semi-supervised batches carry a `labeled` mask); default: constant
      `config.unlabeled_weight`.

  Returns:
    The new state and a dict of (sum, count) metric pairs.
  """
  rng = streams.augment_key(config.seed, state.step)
  images = augment.preprocess(rng, batch['image'], config, data_stats, train=True)
  labels = batch['label']
  scale = heads_lib.loss_scale(config.model.rescale, model.num_heads)
  teacher_logits = None
  if teacher_apply is not None:
    teacher_logits = jnp.mean(teacher_apply(teacher_vars, images), axis=0)
    teacher_logits = jax.lax.stop_gradient(teacher_logits)
  labeled = batch.get('labeled')
  weight = (unlabeled_weight_fn(state.step) if unlabeled_weight_fn
            else config.get('unlabeled_weight', 1.0))
  if config.method == 'mean_teacher':  # train mode, its own augmentation
    teacher_images = augment.preprocess(jax.random.fold_in(rng, 1), batch['image'],
                                config, data_stats, train=True)
    teacher_logits = jax.lax.stop_gradient(model.apply(
        {'params': semisup.teacher_params(state.opt_state),
         'batch_stats': state.batch_stats}, teacher_images, train=True,
        mutable=['batch_stats'])[0][0])

  def loss_fn(params):
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    parts = loss_terms(logits, labels, config, teacher_logits, labeled, weight)
    return jnp.sum(parts['total']) * scale, (logits, parts,
                                             new_vars['batch_stats'])

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
  rng = streams.augment_key(config.seed, state.step)
  images = augment.preprocess(rng, batch['image'], config, data_stats, train=True)
  labels = batch['label']
  params, batch_stats, opt_state = state.params, state.batch_stats, state.opt_state
  every_head_finite = jnp.array(True)
  terms = {'hard': [], 'soft': [], 'total': []}  # of head h, from its own update
  logits = None
  for h in range(model.num_heads):
    def loss_fn(head_params, h=h):
      level = jax.tree.map(lambda a, p: a.at[h].set(p), params['level_1'],
                           head_params)
      logits, new_vars = model.apply(
          {'params': {**params, 'level_1': level}, 'batch_stats': batch_stats},
          images, train=True, mutable=['batch_stats'])
      parts = loss_terms(logits, labels, config)
      return parts['total'][h], (logits, parts, new_vars['batch_stats'])

    head_params = jax.tree.map(lambda a, h=h: a[h], params['level_1'])
    (loss_h, (logits, parts, new_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(head_params)
    head_opt = jax.tree.map(lambda a, h=h: a[h], opt_state)
    updates, head_opt = tx.update(grads, head_opt, head_params)
    head_params = optax.apply_updates(head_params, updates)
    head_stats = (jax.tree.map(lambda a, h=h: a[h], new_stats['level_1'])
                  if batch_stats else {})
    finite = all_finite(loss_h, grads, head_params, head_stats)
    every_head_finite &= finite
    put = lambda stacked, new, h=h: jax.tree.map(
        lambda a, n: a.at[h].set(jnp.where(finite, n, a[h])), stacked, new)
    params = {**params, 'level_1': put(params['level_1'], head_params)}
    opt_state = put(opt_state, head_opt)
    if batch_stats:
      batch_stats = {**batch_stats, 'level_1': put(batch_stats['level_1'],
                                                   head_stats)}
    for k, v in terms.items():
      v.append(parts[k][h])
  parts = {k: jnp.stack(v) for k, v in terms.items()}
  loss = jnp.sum(parts['total'])
  skipped = jnp.logical_not(every_head_finite).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats,
      opt_state=opt_state,
      nonfinite_streak=jnp.where(every_head_finite, 0, state.nonfinite_streak + 1),
      nonfinite_total=state.nonfinite_total + skipped)
  metrics = _head_metrics(logits, labels, parts, loss)
  metrics['nonfinite_skipped'] = _pair(skipped, 1)
  return new_state, metrics


def eval_step(state, batch, teacher_vars=None, *, model, config, data_stats,
              teacher_apply=None):
  """Test metrics as (sum, count) pairs: every head, the ensemble of heads,
  and (distillation) the ensemble of teachers."""
  images = augment.preprocess(None, batch['image'], config, data_stats, train=False)
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


def accumulate(acc, metrics):
  """Sums (sum, count) metric pairs on the device; `acc` None starts anew."""
  return metrics if acc is None else jax.tree.map(jnp.add, acc, metrics)


# ----------------------------------------------------------------------------
# The steps compiled over a device mesh.


def make_train_step(config, mesh, *, model, tx, data_stats, steps_per_epoch,
                    teacher_apply=None, compiler_options=None):
  """The train step of `config.method`, jitted over `mesh`.

  The batch is sharded on the mesh's `data` axis, the state and the teacher
  variables are replicated, and the state is donated.

  Args:
    compiler_options: XLA options; None for `models.compiler_options` of the
      mesh's platform (what this repository recommends).

  Returns:
    `step(state, batch, teacher_vars) -> (state, metrics)`.
  """
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  stats = {k: tuple(float(x) for x in v) for k, v in data_stats.items()}
  if config.method == 'alternating':
    step = functools.partial(alternating_train_step, model=model, tx=tx,
                             config=config, data_stats=stats)
  else:
    step = functools.partial(
        train_step, model=model, tx=tx, config=config, data_stats=stats,
        teacher_apply=teacher_apply,
        unlabeled_weight_fn=semisup.unlabeled_weight_fn(config, steps_per_epoch))
  if compiler_options is None:
    compiler_options = models.compiler_options(mesh.devices.flat[0].platform)
  return jax.jit(step, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler_options or None)


def make_eval_step(config, mesh, *, model, data_stats, teacher_apply=None):
  """`eval_step` jitted over `mesh`: `step(state, batch, teacher_vars) -> metrics`."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  stats = {k: tuple(float(x) for x in v) for k, v in data_stats.items()}
  return jax.jit(functools.partial(eval_step, model=model, config=config,
                                   data_stats=stats, teacher_apply=teacher_apply),
                 in_shardings=(replicated, sharded, replicated),
                 out_shardings=replicated)
