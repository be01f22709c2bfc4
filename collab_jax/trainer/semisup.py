"""Semi-supervised training: the unlabelled weight's ramp-up and Mean Teacher.

Semi-supervised collaborative learning is the paper's future work (Sec. 5):
labelled examples get the full `L_h`, unlabelled ones only the consensus term
(`losses.collaborative_head_losses(..., labeled=, unlabeled_weight=)`); the
data side is `data.labeled_split.LabeledSplit`. This module holds what the trainer
adds around them:

* `unlabeled_weight_fn`: the weight of the unlabelled consensus term per step,
  with the ramp-up that consistency losses use (Laine & Aila 2017): early
  predictions are noise, and pulling unlabelled examples towards them hurts.
* Mean Teacher (Tarvainen & Valpola 2017), the baseline method
  `mean_teacher`: one network (the student) learns from the labels and from
  an exponential moving average of its own weights (the teacher) on every
  example. The teacher lives in the optimizer state (`ema_teacher`, the last
  transformation of the chain), so the train state, its checkpoints and the
  other methods are unchanged.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

RAMPUPS = ('sigmoid', 'linear')
SEMISUP_METHODS = ('collaborative', 'label_smoothing', 'mean_teacher')


def rampup(step, rampup_steps, kind='sigmoid'):
  """Ramp-up factor in [0, 1] at `step` (jit-friendly; 1 when `rampup_steps <= 0`).

  `sigmoid`: `exp(-5 (1 - t)^2)`, `t = min(step / rampup_steps, 1)` (Laine &
  Aila 2017, also Mean Teacher); `linear`: `t`.
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
  steps = float(config.unlabeled_rampup_epochs) * steps_per_epoch
  weight, kind = float(config.unlabeled_weight), config.unlabeled_rampup
  return lambda step: weight * rampup(step, steps, kind)


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


def check_config(config, heads):
  """One-line messages for semi-supervised settings that cannot work."""
  def bad(key, msg):
    raise ValueError(f'config.{key}: {msg}')
  if config.labeled_per_class < 0:
    bad('labeled_per_class', f'{config.labeled_per_class} must be >= 0 (0 = all labelled).')
  if config.labeled_per_class and config.method not in SEMISUP_METHODS:
    bad('method', f'{config.method!r} does not take unlabelled examples; with '
        f'labeled_per_class > 0 use one of {", ".join(SEMISUP_METHODS)}.')
  if not 0.0 < config.labeled_fraction_per_batch < 1.0:
    bad('labeled_fraction_per_batch', f'{config.labeled_fraction_per_batch} '
        'must be in (0, 1).')
  if not config.unlabeled_weight >= 0:
    bad('unlabeled_weight', f'{config.unlabeled_weight} must be >= 0.')
  if config.unlabeled_rampup not in RAMPUPS:
    bad('unlabeled_rampup', f'{config.unlabeled_rampup!r} is not one of '
        f'{", ".join(RAMPUPS)}.')
  if config.unlabeled_rampup_epochs < 0:
    bad('unlabeled_rampup_epochs', f'{config.unlabeled_rampup_epochs} must be >= 0.')
  if config.method == 'mean_teacher':
    if heads != 1:
      bad('model.splits', "method 'mean_teacher' trains one student network: "
          f'use splits (), got {heads} heads.')
    if config.beta >= 1.0 and not config.labeled_per_class:
      bad('beta', 'mean_teacher with beta = 1 and every example labelled '
          'ignores the teacher.')
    if not 0.0 <= config.mean_teacher.decay < 1.0:
      bad('mean_teacher.decay', f'{config.mean_teacher.decay} must be in [0, 1).')
