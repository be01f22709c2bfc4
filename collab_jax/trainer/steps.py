"""Model, optimizer, train state and the jitted steps: config -> state -> step.

The config is read here, outside jitted code, to build the model, the
learning-rate schedule and the optimizer; the steps receive what they compute
with (the model, the optimizer, the method, the preprocessing), never the
config. Parallelism (`parallel.DataParallel`): one `jax.jit` over a 1-D
device mesh; the batch is sharded, the train state replicated and donated,
so BatchNorm statistics are those of the global batch (synchronised
BatchNorm). Metrics leave the steps as (sum, count) pairs (`metrics`).
"""

import functools
import inspect
import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from collab_jax import errors
from collab_jax import heads as heads_lib
from collab_jax import models
from collab_jax.data import streams
from collab_jax.trainer import checkpointing
from collab_jax.trainer import metrics
from collab_jax.trainer import parallel

LR_SCHEDULES = ('step', 'cosine', 'constant')
# A step diverges when head 1's cross-entropy with its labels is above this
# many times log(C) nats, that of a uniform guess over C classes.
DIVERGENCE_FACTOR = 10.0


# ----------------------------------------------------------------------------
# Model, learning rate, optimizer, state.


def _bad(key, msg):
  raise errors.ConfigError(f'config.{key}: {msg}')


def _network_kwargs(name, kwargs):
  """Checks `model.kwargs` against network `name`; returns the preset clashes.

  Keys that are no hyper-parameter of the network are refused at once. A
  preset fixes some (`tiny_resnet` is `cifar_resnet8` with `width=4`):
  another value there would build another network under the preset's name;
  those clashes are returned as ConfigErrors, to raise once the values
  themselves have been checked.
  """
  net = models.NETWORKS.get(name)
  if not isinstance(net, functools.partial):
    return []  # unknown names are get_stages' to refuse
  fixed = net.keywords
  free = [p.name for p in inspect.signature(net.func).parameters.values()
          if p.kind == p.KEYWORD_ONLY and p.name != 'dtype'
          and p.name not in fixed]
  clashes = []
  for key, value in kwargs.items():
    if key not in fixed and key not in free:
      _bad(f'model.kwargs.{key}', f'network {name} has no hyper-parameter '
           f'{key!r}; its own are: {", ".join(free) or "none"}.')
    if key in fixed and fixed[key] != value:
      same = [n for n, f in models.NETWORKS.items()
              if isinstance(f, functools.partial) and f.func is net.func
              and f.args == net.args and key not in f.keywords]
      other = f' ({same[0]} is the same network with {key} free)' if same else ''
      clashes.append(errors.ConfigError(
          f'config.model.kwargs.{key}: {value!r}, but network {name} is '
          f'defined with {key}={fixed[key]!r}{other}: pass --config.model.'
          f'kwargs.{key}={fixed[key]!r} or choose another network.'))
  return clashes


# What `model.dtype='auto'` and `model.branch_impl='auto'` mean per platform.
# CPU: float32 (bfloat16 measured 1.05x the time there) and branches in a loop
# (vmapped convolutions become grouped convolutions, 10.3x slower on XLA:CPU);
# experiments/results/bench.md. GPU/TPU: bfloat16 computation with float32
# parameters, as ImageNet ResNet-50 is trained on them; branches in a loop
# until `make bench-device` measures vmap against it on the device.
PLATFORM_DEFAULTS = {
    'cpu': {'dtype': 'float32', 'branch_impl': 'loop'},
    'gpu': {'dtype': 'bfloat16', 'branch_impl': 'loop'},
    'tpu': {'dtype': 'bfloat16', 'branch_impl': 'loop'},
}


def backend_choices(platform):
  """Every per-platform performance choice of the trainer, in one dict.

  `compiler_options` and `barriers` (the residual blocks' optimisation
  barriers) are CPU-only tricks; `dtype` and `branch_impl` are what 'auto'
  means for `model.dtype` and `model.branch_impl`.
  """
  return {'compiler_options': models.compiler_options(platform),
          'barriers': platform == 'cpu',
          **PLATFORM_DEFAULTS.get(platform, PLATFORM_DEFAULTS['cpu'])}


def resolve_auto(key, value, platform=None):
  """`value` of `model.<key>`, with 'auto' replaced by the platform's default."""
  if value != 'auto':
    return value
  return backend_choices(platform or jax.default_backend())[key]


def create_model(config, num_classes, platform=None):
  """The head tree of `config.model` for `num_classes` classes on `platform`.

  `platform` (default: JAX's default backend) resolves the 'auto' values of
  `model.dtype` and `model.branch_impl` (`PLATFORM_DEFAULTS`).
  """
  m = config.model
  kwargs = dict(m.get('kwargs', {}))
  clashes = _network_kwargs(m.name, kwargs)
  dtype = resolve_auto('dtype', m.dtype, platform)
  branch_impl = resolve_auto('branch_impl', m.branch_impl, platform)
  with errors.config_keys('model.kwargs', name='model.name', dtype='model.dtype',
                          **{k: f'model.kwargs.{k}' for k in kwargs}):
    stages = models.get_stages(m.name, num_classes, dtype=dtype, **kwargs)
  if clashes:
    raise clashes[0]
  with errors.config_keys('model.splits', splits='model.splits',
                          rescale='model.rescale',
                          branch_impl='model.branch_impl'):
    return heads_lib.HeadTree(
        stages, heads_lib.validate_splits(m.splits, len(stages)),
        rescale=m.rescale, branch_impl=branch_impl,
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


def create_optimizer(config, lr_fn, method=None):
  """SGD with momentum and L2 weight decay added to the gradient, then `method`'s wrapping.

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
  return tx if method is None else method.optimizer(tx)


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Consecutive and total updates skipped for a non-finite loss or gradient.
  nonfinite_streak: jax.Array
  nonfinite_total: jax.Array


def create_train_state(rng, model, image_shape, tx, init_opt_state=None,
                       sharding=None):
  """Initial parameters, BatchNorm statistics and optimizer state, as one program.

  `init_opt_state(tx, params)`: the method's (e.g. one state per head);
  default `tx.init(params)`. `sharding`: where the state is created (e.g.
  replicated over the mesh), so that no host copy of it is ever made.
  """
  dummy = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)

  def init(rng):
    variables = model.init(rng, jnp.zeros(dummy.shape, dummy.dtype), train=False)
    params = variables['params']
    opt_state = (init_opt_state(tx, params) if init_opt_state
                 else tx.init(params))
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params,
                      batch_stats=variables.get('batch_stats', {}),
                      opt_state=opt_state, nonfinite_streak=zero,
                      nonfinite_total=zero)

  # Every output is a buffer of its own (the step donates them one by one).
  return jax.jit(init, out_shardings=sharding)(rng)


def load_run_variables(workdir, config, num_classes, image_shape, *, method,
                       sharding=None):
  """The model and variables of the latest readable checkpoint of the run in `workdir`.

  Args:
    method: the run's `methods.Method` (its optimizer state is part of the
      checkpoint's structure).
    sharding: where the arrays go (default: replicated over every device).

  Raises:
    WorkdirError when the run has no readable checkpoint.
  """
  model = create_model(config, num_classes)
  tx = create_optimizer(config, lambda s: 0.0, method)
  abstract = jax.eval_shape(lambda: create_train_state(
      jax.random.key(0), model, image_shape, tx, method.init_opt_state))
  if sharding is None:
    sharding = parallel.data_parallel().replicated
  with checkpointing.checkpoint_manager(workdir, config) as manager:
    state, _ = checkpointing.restore_latest(manager, abstract, sharding=sharding)
  if state is None:
    raise errors.WorkdirError(f'no readable checkpoint in {workdir}/checkpoints.')
  return model, {'params': state.params, 'batch_stats': state.batch_stats}


# ----------------------------------------------------------------------------
# Steps.


def augment_key(seed, step):
  """The key of the on-device augmentation of step `step`."""
  return streams.augment_key(seed, step)


def head_metrics(logits, labels, parts, loss, labeled=None):
  """Train metrics as (sum, count) pairs; errors on labelled examples."""
  out = {'loss': metrics.pair(loss, 1)}
  # The divergence rule (train.py): head 1's cross-entropy with the labels
  # above ten times that of a uniform guess, log(C) nats.
  threshold = DIVERGENCE_FACTOR * math.log(logits.shape[-1])
  out[metrics.DIVERGING] = metrics.pair(parts['hard'][0] > threshold, 1)
  wrong = jnp.argmax(logits, -1) != labels[None]
  if labeled is None:
    num_wrong, batch = jnp.sum(wrong, axis=1), labels.shape[0]
  else:
    num_wrong, batch = jnp.sum(wrong * labeled[None], axis=1), jnp.sum(labeled)
  for h in range(logits.shape[0]):
    out[metrics.head(h, 'hard')] = metrics.pair(parts['hard'][h], 1)
    out[metrics.head(h, 'soft')] = metrics.pair(parts['soft'][h], 1)
    out[metrics.head(h, 'error')] = metrics.pair(100.0 * num_wrong[h], batch)
  return out


def all_finite(*trees):
  """A scalar bool: every element of every leaf of `trees` is finite."""
  return jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def guarded_update(state, new_state, loss, grads):
  """Applies `new_state` only if the loss, gradients and new state are finite.

  The new parameters and BatchNorm statistics are checked too: a finite
  gradient times a huge learning rate can still overflow them, and such a
  state must never be applied (or checkpointed). One decision covers the whole
  state, optimizer included (optax.apply_if_finite sees only the gradient).
  Every method's step ends here.

  Returns:
    The next state (step + 1) and 1 if the update was skipped, else 0.
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


def train_step(state, batch, teacher_vars=None, *, model, tx, method,
               preprocess, seed, unlabeled_weight_fn=None):
  """One simultaneous optimizer step on all parameters (paper Sec. 3.2).

  Args:
    state: the replicated `TrainState` (donated).
    batch: {'image': uint8 [B, ...], 'label': int32 [B]} sharded over the
      batch axis; semi-supervised batches also carry 'labeled' (bool [B]).
    teacher_vars: variables of the method's frozen teachers (distillation).
    model: the `HeadTree`; its `rescale='loss'` (the ablation of Table 3)
      divides the summed loss by the number of heads.
    tx: the optax optimizer (the method's).
    method: the `methods.Method`: loss terms and teacher logits.
    preprocess: `augment.Preprocess`, augmentation and normalisation.
    seed: the run's seed (the augmentation stream).
    unlabeled_weight_fn: step -> weight of the unlabelled examples'
      consensus term; default 1.

  Returns:
    The new state and a dict of (sum, count) metric pairs.
  """
  rng = augment_key(seed, state.step)
  images = preprocess(rng, batch['image'], train=True)
  labels, labeled = batch['label'], batch.get('labeled')
  scale = heads_lib.loss_scale(model.rescale, model.num_heads)
  weight = unlabeled_weight_fn(state.step) if unlabeled_weight_fn else 1.0
  teacher_logits = method.teacher_logits(
      model=model, state=state, images=images, teacher_vars=teacher_vars,
      teacher_view=lambda: preprocess(jax.random.fold_in(rng, 1),
                                      batch['image'], train=True))

  def loss_fn(params):
    logits, new_vars = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images,
        train=True, mutable=['batch_stats'])
    parts = method.loss_terms(logits, labels, labeled=labeled,
                              unlabeled_weight=weight,
                              teacher_logits=teacher_logits)
    return jnp.sum(parts['total']) * scale, (logits, parts,
                                             new_vars['batch_stats'])

  (loss, (logits, parts, batch_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state, skipped = guarded_update(
      state, state.replace(params=params, batch_stats=batch_stats,
                           opt_state=opt_state), loss, grads)
  out = head_metrics(logits, labels, parts, loss, labeled)
  out['nonfinite_skipped'] = metrics.pair(skipped, 1)
  if labeled is not None:
    out['unlabeled_weight'] = metrics.pair(weight, 1)
  return new_state, out


def _wrong(logits, labels, mask):
  return 100.0 * jnp.sum((jnp.argmax(logits, -1) != labels) * mask)


def _top5_wrong(logits, labels, mask):
  top5 = jax.lax.top_k(logits, 5)[1]
  return 100.0 * jnp.sum(~jnp.any(top5 == labels[:, None], -1) * mask)


def eval_step(state, batch, teacher_vars=None, *, model, method, preprocess):
  """Test metrics as (sum, count) pairs: every head, the ensemble of heads,
  and the method's teachers (distillation)."""
  images = preprocess(None, batch['image'], train=False)
  logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                       images, train=False)
  labels, mask = batch['label'], batch['mask']
  count = jnp.sum(mask)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  nll = -jnp.take_along_axis(logp, labels[None, :, None], -1)[..., 0] * mask[None]
  ensemble = jnp.mean(logits, axis=0)
  out = {f'{metrics.ENSEMBLE}/error': metrics.pair(_wrong(ensemble, labels, mask), count)}
  top5 = logits.shape[-1] > 5  # top-5 error (paper Table 4), where it means something
  for h in range(logits.shape[0]):
    out[metrics.head(h, 'error')] = metrics.pair(_wrong(logits[h], labels, mask), count)
    out[metrics.head(h, 'loss')] = metrics.pair(jnp.sum(nll[h]), count)
    if top5:
      out[metrics.head(h, 'top5_error')] = metrics.pair(
          _top5_wrong(logits[h], labels, mask), count)
  if top5:
    out[f'{metrics.ENSEMBLE}/top5_error'] = metrics.pair(
        _top5_wrong(ensemble, labels, mask), count)
  teachers = method.eval_teacher_logits(teacher_vars, images)
  if teachers is not None:
    out[f'{metrics.TEACHERS}/error'] = metrics.pair(_wrong(teachers, labels, mask), count)
  return out


# ----------------------------------------------------------------------------
# The steps compiled over a device mesh.


def make_train_step(placement, *, model, tx, method, preprocess, seed,
                    unlabeled_weight_fn=None, compiler_options=None,
                    barriers=None):
  """The method's train step jitted over `placement` (`parallel.DataParallel`).

  The batch is sharded on the mesh's batch axis, the state and the teacher
  variables are replicated, and the state is donated.

  Args:
    compiler_options: XLA options; None for `models.compiler_options` of the
      mesh's platform (what this repository recommends: options on CPU only).
    barriers: trace the residual blocks' optimisation barriers
      (`models.layers.materialize`); None: on CPU only, where they pay.

  Returns:
    `step(state, batch, teacher_vars) -> (state, metrics)`.
  """
  fn = method.train_step or train_step
  step = functools.partial(
      fn, model=model, tx=tx, preprocess=preprocess, seed=seed,
      unlabeled_weight_fn=unlabeled_weight_fn,
      **({} if method.train_step else {'method': method}))
  choices = backend_choices(placement.platform)
  if compiler_options is None:
    compiler_options = choices['compiler_options']
  if barriers is None:
    barriers = choices['barriers']

  @functools.wraps(fn)
  def traced(*args):  # runs when jit traces: the barriers' switch is read then
    with models.optimization_barriers(barriers):
      return step(*args)

  replicated = placement.replicated
  return jax.jit(traced, in_shardings=(replicated, placement.batch, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=(0,),
                 compiler_options=compiler_options or None)


def make_eval_step(placement, *, model, method, preprocess):
  """`eval_step` jitted over `placement`: `step(state, batch, teacher_vars) -> metrics`."""
  replicated = placement.replicated
  return jax.jit(functools.partial(eval_step, model=model, method=method,
                                   preprocess=preprocess),
                 in_shardings=(replicated, placement.batch, replicated),
                 out_shardings=replicated)


def eval_batch_spec(train_batch, eval_batch_size, placement):
  """Shapes of an evaluation batch of `eval_batch_size` (a global batch), to
  compile the eval step before the first evaluation."""
  image = train_batch['image']
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype,
                                                   sharding=placement.batch)
  return {'image': spec((eval_batch_size,) + image.shape[1:], image.dtype),
          'label': spec((eval_batch_size,), jnp.int32),
          'mask': spec((eval_batch_size,), jnp.float32)}


def _device_memory():
  """Bytes a device can hold: the accelerator's limit, or on CPU the host's
  memory shared by its devices; None where unknown."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() or {}
  if stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      total = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    except (ValueError, OSError):
      return None
    return total // jax.local_device_count()
  return None


def check_memory(compiled, key, value, what):
  """ConfigError when a compiled step needs more memory than a device has.

  XLA's own count (`memory_analysis`: arguments, outputs and temporaries;
  the CPU backend reports no temporaries) against `_device_memory`.
  """
  try:
    mem = compiled.memory_analysis()
    need = (mem.argument_size_in_bytes + mem.output_size_in_bytes
            + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  except Exception:  # pylint: disable=broad-except
    return  # a backend that does not say
  have = _device_memory()
  if have and need > have:
    _bad(key, f'{value} needs {need / 2**30:.1f} GiB per device for '
         f'{what} but a device has {have / 2**30:.1f} GiB; lower it.')
