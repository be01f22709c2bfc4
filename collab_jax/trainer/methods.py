"""Training methods, each in one place: a registry looked up by `config.method`.

A method is what a run optimises on top of the network and its head tree:
the loss terms of every head, the optimizer around the shared SGD (and the
state that rides in it), its config checks, whether other runs (teachers)
must finish first, and, for a method that needs it, a step of its own. The
trainer looks the method up once (`create`) and hands the object to the
steps; no other module branches on `config.method`.

  collaborative     the paper (Sec. 3): every head's `L_h`, one optimizer step
  label_smoothing   a baseline of Tables 1 and 4: smoothed hard labels
  distillation      Table 4: a single network learns from the mean logits of
                    independently trained teacher runs
  alternating       Table 2: Deep Mutual Learning, heads updated in turn
  mean_teacher      the semi-supervised baseline (Tarvainen & Valpola 2017)

A new method is a subclass of `Method` with `@register('name')` (README,
"Adding a method"); `--config.method=name` then trains it.
"""

import json
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from collab_jax import errors
from collab_jax import losses
from collab_jax.trainer import checkpointing
from collab_jax.trainer import fs
from collab_jax.trainer import logging_utils
from collab_jax.trainer import metrics
from collab_jax.trainer import steps

REGISTRY: Dict[str, type] = {}
TEMPERATURE_RANGE = (0.01, 100.0)
# The unlabelled examples' consensus term against labelled losses of weight
# <= 1: beyond a thousand times, the labels have no say left (published
# ramp-ups end at 1 to 100).
MAX_UNLABELED_WEIGHT = 1e3


def register(name):
  """Class decorator: makes a `Method` subclass the method `name`.

  A config file may define and register its own method (README, "Adding a
  method"); loading that file again (a sweep reads configs in-process)
  registers the same definition again, which replaces the first. Another
  class under a name already taken is refused.
  """
  def add(cls):
    old = REGISTRY.get(name)
    if old is not None and old.__qualname__ != cls.__qualname__:
      raise ValueError(f'method {name!r} is registered already (by '
                       f'{old.__module__}.{old.__qualname__}).')
    cls.name = name
    REGISTRY[name] = cls
    return cls
  return add


def create(config, num_heads):
  """The method of `config.method` for a tree of `num_heads` heads."""
  cls = REGISTRY.get(config.method)
  if cls is None:
    raise errors.ConfigError(
        f'config.method: {config.method!r} is unknown; choose one of '
        f'{", ".join(REGISTRY)}.')
  return cls(config, num_heads)


def _bad(key, msg):
  raise errors.ConfigError(f'config.{key}: {msg}')


class Method:
  """The collaborative loss (paper eq. 4); the base of every method.

  Subclasses override what differs. A method object is built once per run,
  outside jitted code, from the config; its methods are traced into the
  step.

  Attributes:
    name: the `config.method` value (set by `register`).
    semi_supervised: whether it takes unlabelled examples
      (`labeled_per_class > 0`): their labels are -1 and a `labeled` mask
      reaches `loss_terms`.
    train_step: a step function of its own (see `Alternating`), else None
      (`steps.train_step`).
  """
  name = None
  semi_supervised = True
  train_step = None

  def __init__(self, config, num_heads):
    self.num_heads = num_heads
    self.beta = config.beta
    self.temperature = config.temperature
    self.consensus_gradient = config.consensus_gradient
    self.check(config)
    self._check_temperature()
    # The library checks its own arguments (beta, T, ...); trace the loss once
    # so that a bad value fails now, named by its config key.
    logits = jax.ShapeDtypeStruct((num_heads, 2, 10), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    with errors.config_keys('method', beta='beta', temperature='temperature'):
      jax.eval_shape(lambda z, y: self.loss_terms(z, y, teacher_logits=z[0]),
                     logits, labels)

  def check(self, config):
    """ConfigError for settings this method cannot train."""

  def _check_temperature(self):
    # Beyond these bounds the soft targets of logits of ordinary size are
    # hard labels (small T) or flat (large T), and T^2, the soft loss's
    # scale, is below 1e-4 or above 1e4.
    low, high = TEMPERATURE_RANGE
    if (isinstance(self.temperature, (int, float)) and self.temperature > 0
        and not low <= self.temperature <= high):  # T <= 0: the loss's to refuse
      _bad('temperature', f'{self.temperature} is outside [{low:g}, {high:g}]: '
           'the soft targets would be hard labels (small T) or flat (large T); '
           'the paper uses T = 2.')

  def loss_terms(self, logits, labels, *, labeled=None, unlabeled_weight=1.0,
                 teacher_logits=None, label_smoothing=0.0):
    """Per-head terms {'hard', 'soft', 'total'} ([H] each) of `logits` [H, B, C]."""
    del teacher_logits
    return losses.collaborative_head_losses(
        logits, labels, beta=self.beta, temperature=self.temperature,
        label_smoothing=label_smoothing,
        consensus_gradient=self.consensus_gradient, labeled=labeled,
        unlabeled_weight=unlabeled_weight)

  def optimizer(self, tx):
    """The optimizer of the run around the shared one (`steps.create_optimizer`)."""
    return tx

  def init_opt_state(self, tx, params):
    return tx.init(params)

  def teacher_logits(self, *, model, state, images, teacher_view, teacher_vars):
    """[B, C] logits of the method's teacher for this batch, or None.

    `teacher_view()` gives the batch under an augmentation of its own.
    """
    del model, state, images, teacher_view, teacher_vars
    return None

  def eval_teacher_logits(self, teacher_vars, images):
    """[B, C] logits the evaluation reports as `teachers/error`, or None."""
    del teacher_vars, images
    return None

  def teacher_runs(self, config, workdir):
    """`(config, workdir)` of the runs that must finish before this one."""
    del config, workdir
    return []

  def load_teachers(self, config, workdir, data, sharding):
    """Loads the finished teacher runs: (their variables, their test errors)."""
    del config, workdir, data, sharding
    return {}, None


register('collaborative')(Method)


@register('label_smoothing')
class LabelSmoothing(Method):
  """Cross-entropy to smoothed labels (Szegedy et al. 2016), per head."""

  def __init__(self, config, num_heads):
    self.epsilon = config.label_smoothing
    super().__init__(config, num_heads)

  def check(self, config):
    if not config.label_smoothing > 0:
      _bad('label_smoothing', "method 'label_smoothing' needs an epsilon > 0, "
           'e.g. --config.label_smoothing=0.05.')

  def loss_terms(self, logits, labels, **kwargs):
    return super().loss_terms(logits, labels, label_smoothing=self.epsilon,
                              **kwargs)


class Teacher(NamedTuple):
  model: Any              # a HeadTree of one head (splits ())
  test_error: float


@register('distillation')
class Distillation(Method):
  """A single network distilled from an ensemble of teachers (paper Table 4).

  The teachers are runs of the single network, trained on the labels alone
  and independently of each other (own seed, hence own initialisation, data
  order and augmentation): an ensemble of separately trained networks is
  what the paper distils from. They are ordinary runs in their own workdirs
  (`teacher_runs`), which the trainer finishes before the student starts;
  the student reads their checkpoints and learns from their mean logits.
  """
  semi_supervised = False

  def __init__(self, config, num_heads):
    self.teachers = []
    super().__init__(config, num_heads)

  def check(self, config):
    splits = tuple(tuple(s) for s in config.model.splits)
    if splits:
      _bad('model.splits', "method 'distillation' trains one student: use "
           f'splits (), got {splits}.')
    if config.beta >= 1.0:
      _bad('beta', 'distillation needs beta < 1 (beta = 1 ignores the teacher).')
    if not config.distill.num_teachers >= 1:
      _bad('distill.num_teachers', f'{config.distill.num_teachers} must be >= 1.')

  def loss_terms(self, logits, labels, *, teacher_logits=None, **kwargs):
    del kwargs
    parts = losses.distillation_loss(logits[0], teacher_logits, labels,
                                     beta=self.beta,
                                     temperature=self.temperature)
    return {k: v[None] for k, v in parts.items()}

  def teacher_logits(self, *, images, teacher_vars, **kwargs):
    return self.eval_teacher_logits(teacher_vars, images)

  def eval_teacher_logits(self, teacher_vars, images):
    logits = [t.model.apply(v, images, train=False)[0]
              for t, v in zip(self.teachers, teacher_vars)]
    return jax.lax.stop_gradient(jnp.mean(jnp.stack(logits), axis=0))

  def teacher_runs(self, config, workdir):
    """`distill.teacher_workdirs`, or `<workdir>/teachers/teacher_<k>`.

    Teacher k (1-based) of a student with seed s trains with seed
    `1000 * (s + 1) + k`.
    """
    if config.distill.teacher_workdirs:
      out = []
      for teacher_dir in config.distill.teacher_workdirs:
        path = fs.path(teacher_dir) / 'config.json'
        try:
          out.append((ml_collections.ConfigDict(json.loads(path.read_text())),
                      teacher_dir))
        except Exception as e:  # pylint: disable=broad-except
          raise errors.ConfigError(
              f'config.distill.teacher_workdirs: cannot read {path} ('
              f'{type(e).__name__}); name the workdirs of finished collab_jax '
              'runs.') from None
      return out
    out = []
    for k in range(1, config.distill.num_teachers + 1):
      teacher = ml_collections.ConfigDict(config.to_dict())
      teacher.method = 'collaborative'
      teacher.beta = 1.0
      teacher.model.splits = ()
      teacher.seed = 1000 * (config.seed + 1) + k
      teacher.distill.teacher_workdirs = ()
      out.append((teacher, fs.path(workdir) / 'teachers' / f'teacher_{k}'))
    return out

  def load_teachers(self, config, workdir, data, sharding):
    variables, self.teachers = [], []
    for teacher, teacher_dir in self.teacher_runs(config, workdir):
      results = fs.path(teacher_dir) / 'results.json'
      if not results.exists():
        raise errors.ConfigError(
            f'distillation: teacher run {teacher_dir} has not finished; '
            'python -m collab_jax.main trains the teachers first.')
      model, v = steps.load_run_variables(
          teacher_dir, teacher, data.num_classes, data.image_shape,
          method=create(teacher, 1), sharding=sharding)
      error = checkpointing.read_json(results, 'results of the teacher run',
                                      'remove it to train that teacher again')
      self.teachers.append(Teacher(model, error['head_1_test_error']))
      variables.append(v)
    logging_utils.console(
        'distillation phase 2/2: training the student against the mean logits '
        f'of {len(self.teachers)} independently trained teachers')
    return variables, [t.test_error for t in self.teachers]


@register('alternating')
class Alternating(Method):
  """Deep Mutual Learning (Zhang et al. 2017): heads updated one after another.

  The tree must be `H` separate instances (`splits = ((0, H),)`). Head `h`'s
  update uses the logits of the other heads computed *after* heads `< h`
  were updated in this step, and its own optimizer state (`opt_state` is
  stacked per head). The loss of head `h` is the paper's `L_h`.
  """
  semi_supervised = False

  def check(self, config):
    splits = tuple(tuple(s) for s in config.model.splits)
    if len(splits) != 1 or splits[0][0] != 0:
      _bad('model.splits', "method 'alternating' (Deep Mutual Learning) trains "
           f'separate networks: use splits ((0, H),), got {splits}.')

  def init_opt_state(self, tx, params):
    return jax.vmap(tx.init)(params['level_1'])  # one per head

  def train_step(self, state, batch, teacher_vars=None, *, model, tx,
                 preprocess, seed, unlabeled_weight_fn=None):
    """One step: every head's update in turn (see the class docstring)."""
    del teacher_vars, unlabeled_weight_fn
    rng = steps.augment_key(seed, state.step)
    images = preprocess(rng, batch['image'], train=True)
    labels = batch['label']
    params, batch_stats, opt_state = state.params, state.batch_stats, state.opt_state
    at = lambda tree, h: jax.tree.map(lambda a: a[h], tree)
    put = lambda tree, h, new: jax.tree.map(lambda a, n: a.at[h].set(n), tree, new)
    terms = {'hard': [], 'soft': [], 'total': []}  # of head h, from its own update
    all_grads, logits = [], None
    for h in range(model.num_heads):
      def loss_fn(head_params, h=h):
        level = put(params['level_1'], h, head_params)
        logits, new_vars = model.apply(
            {'params': {**params, 'level_1': level}, 'batch_stats': batch_stats},
            images, train=True, mutable=['batch_stats'])
        parts = self.loss_terms(logits, labels)
        return parts['total'][h], (logits, parts, new_vars['batch_stats'])

      head_params = at(params['level_1'], h)
      (_, (logits, parts, new_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(head_params)
      updates, head_opt = tx.update(grads, at(opt_state, h), head_params)
      params = {**params, 'level_1': put(params['level_1'], h,
                                         optax.apply_updates(head_params, updates))}
      opt_state = put(opt_state, h, head_opt)
      if batch_stats:
        batch_stats = {**batch_stats, 'level_1': put(
            batch_stats['level_1'], h, at(new_stats['level_1'], h))}
      all_grads.append(grads)
      for k, v in terms.items():
        v.append(parts[k][h])
    parts = {k: jnp.stack(v) for k, v in terms.items()}
    loss = jnp.sum(parts['total'])
    new_state, skipped = steps.guarded_update(
        state, state.replace(params=params, batch_stats=batch_stats,
                             opt_state=opt_state), loss, all_grads)
    out = steps.head_metrics(logits, labels, parts, loss)
    out['nonfinite_skipped'] = metrics.pair(skipped, 1)
    return new_state, out


class EmaTeacherState(NamedTuple):
  count: jax.Array
  teacher: Any  # the teacher's parameters, a tree like the student's


def ema_teacher(decay):
  """An optax transformation keeping the Mean Teacher: an EMA of the parameters.

  It leaves the updates unchanged; put it last in the chain so that it sees
  the final updates. After update `t` (from 0) the teacher is
  `a * teacher + (1 - a) * new_params` with `a = min(decay, 1 - 1 / (t + 2))`
  (Mean Teacher's warm-up: early on the teacher is the plain average of the
  parameters so far, not a mix with the random initialisation).
  """
  def init_fn(params):
    # Copies: the train step donates the state buffer by buffer.
    return EmaTeacherState(count=jnp.zeros((), jnp.int32),
                           teacher=jax.tree.map(lambda p: jnp.array(p, copy=True),
                                                params))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('ema_teacher needs the parameters: tx.update(g, s, params).')
    a = jnp.minimum(decay, 1.0 - 1.0 / (state.count.astype(jnp.float32) + 2.0))
    new_params = optax.apply_updates(params, updates)
    teacher = jax.tree.map(lambda t, p: a * t + (1.0 - a) * p, state.teacher,
                           new_params)
    return updates, EmaTeacherState(count=state.count + 1, teacher=teacher)

  return optax.GradientTransformation(init_fn, update_fn)


def teacher_params(opt_state):
  """The teacher's parameters in the optimizer state of a `mean_teacher` run."""
  state = opt_state[-1]
  if not isinstance(state, EmaTeacherState):
    raise ValueError('this optimizer state holds no Mean Teacher (method '
                     "'mean_teacher' adds it).")
  return state.teacher


@register('mean_teacher')
class MeanTeacher(Method):
  """Mean Teacher (Tarvainen & Valpola 2017), the semi-supervised baseline.

  One network (the student) learns from the labels and from an exponential
  moving average of its own weights (the teacher) on every example: the
  student's collaborative loss with the teacher as the only other head, so
  its consensus target is the teacher's `softmax(z_t / T)`. The teacher runs
  in train mode on its own augmentation of the batch and lives in the
  optimizer state (`ema_teacher`, the last transformation of the chain), so
  the train state and its checkpoints are those of every other method.
  """

  def __init__(self, config, num_heads):
    self.decay = config.mean_teacher.decay
    super().__init__(config, num_heads)

  def check(self, config):
    if self.num_heads != 1:
      _bad('model.splits', "method 'mean_teacher' trains one student network: "
           f'use splits (), got {self.num_heads} heads.')
    if config.beta >= 1.0 and not config.labeled_per_class:
      _bad('beta', 'mean_teacher with beta = 1 and every example labelled '
           'ignores the teacher.')
    if not 0.0 <= self.decay < 1.0:
      _bad('mean_teacher.decay', f'{self.decay} must be in [0, 1).')

  def optimizer(self, tx):
    return optax.chain(tx, ema_teacher(self.decay))

  def teacher_logits(self, *, model, state, teacher_view, **kwargs):
    logits, _ = model.apply(
        {'params': teacher_params(state.opt_state),
         'batch_stats': state.batch_stats}, teacher_view(), train=True,
        mutable=['batch_stats'])
    return jax.lax.stop_gradient(logits[0])

  def loss_terms(self, logits, labels, *, teacher_logits=None, **kwargs):
    pair = jnp.stack([logits[0], jax.lax.stop_gradient(teacher_logits)])
    parts = super().loss_terms(pair, labels, **kwargs)
    return {k: v[:1] for k, v in parts.items()}


# ----------------------------------------------------------------------------
# The weight of the unlabelled examples' consensus term.

RAMPUPS = ('sigmoid', 'linear')


def rampup(step, rampup_steps, kind='sigmoid'):
  """Ramp-up factor in [0, 1] at `step` (jit-friendly; 1 when `rampup_steps <= 0`).

  `sigmoid`: `exp(-5 (1 - t)^2)`, `t = min(step / rampup_steps, 1)` (Laine &
  Aila 2017, also Mean Teacher); `linear`: `t`. Early predictions are noise,
  and pulling unlabelled examples towards them hurts.
  """
  if kind not in RAMPUPS:
    raise ValueError(f'ramp-up {kind!r} is not one of {", ".join(RAMPUPS)}.')
  if rampup_steps <= 0:
    return jnp.ones((), jnp.float32)
  t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
  if kind == 'linear':
    return t
  return jnp.exp(-5.0 * (1.0 - t) ** 2)


def unlabeled_weight_fn(config, steps_per_epoch):
  """step -> weight of the unlabelled consensus term (`config.unlabeled_weight` ramped)."""
  if not 0 <= config.unlabeled_weight <= MAX_UNLABELED_WEIGHT:
    _bad('unlabeled_weight', f'{config.unlabeled_weight} must be in [0, '
         f'{MAX_UNLABELED_WEIGHT:g}]: it weighs the consensus term of '
         'unlabelled examples against labelled losses of weight <= 1.')
  if config.unlabeled_rampup not in RAMPUPS:
    _bad('unlabeled_rampup', f'{config.unlabeled_rampup!r} is not one of '
         f'{", ".join(RAMPUPS)}.')
  if config.unlabeled_rampup_epochs < 0:
    _bad('unlabeled_rampup_epochs', f'{config.unlabeled_rampup_epochs} must be >= 0.')
  ramp_steps = float(config.unlabeled_rampup_epochs) * steps_per_epoch
  weight, kind = float(config.unlabeled_weight), config.unlabeled_rampup
  return lambda step: weight * rampup(step, ramp_steps, kind)
