"""The collaborative loss (paper Sec. 3.2, eq. 2-4) and the baselines' losses.

Notation as in the paper: `H` heads, logits `z_h`, `sigma(z; T) = softmax(z / T)`.

* hard loss   `J_hard(y, z_h) = CE(y, sigma(z_h; 1))`
* soft label  `q_h = sigma(mean_{j != h} z_j; T)`: the consensus of the *other*
  heads, a target under stop-gradient (as in distillation)
* soft loss   `J_soft(q_h, z_h) = CE(q_h, sigma(z_h; T))`, times `T^2` (Hinton et
  al. 2015) so the hard/soft balance does not move with `T`
* head loss   `L_h = beta * J_hard + (1 - beta) * T^2 * J_soft`
* total       `L = sum_h mean_batch L_h` (weight decay is the optimizer's job)

All reductions run in float32 whatever the logits' dtype, and every
cross-entropy is written with `log_softmax` (never `log(softmax)`), so bfloat16
logits and saturated heads stay finite.
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = Any


def _check_hyper(beta, temperature):
  # Checked only for concrete values; traced hyper-parameters pass through.
  # (The trainer's config checks call this too: one place for each range.)
  if isinstance(beta, (int, float)) and not 0.0 < beta <= 1.0:
    raise ValueError(f'beta={beta} is outside (0, 1]; the paper uses 0.5.')
  if isinstance(temperature, (int, float)) and not 0 < temperature < math.inf:
    raise ValueError(f'temperature={temperature} must be > 0 and finite; the '
                     'paper uses 2.')


def _is_concrete(x):
  """Whether `x` holds values now (not a tracer under jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def _check_labels(labels, num_classes):
  """Concrete labels only: ids in [0, C), soft labels that are distributions.

  Under `jit` (traced labels) nothing is checked: an id outside [0, C) becomes
  an all-zero one-hot row (`jax.nn.one_hot`), so that example adds nothing to
  the hard loss, and soft labels are used as given.
  """
  if not _is_concrete(labels):
    return
  values = np.asarray(labels)
  if values.size == 0:
    return
  if values.ndim == 1:
    low, high = values.min(), values.max()
    if low < 0 or high >= num_classes:
      bad = low if low < 0 else high
      raise ValueError(f'label id {bad} is outside [0, {num_classes}): labels '
                       f'must be class ids of the {num_classes} logits.')
    return
  values = values.astype(np.float32)
  # A few float32 (or bfloat16) roundings per row are fine.
  tol = max(1e-3, 8 * float(jnp.finfo(labels.dtype).eps)
            if jnp.issubdtype(labels.dtype, jnp.floating) else 1e-3)
  if not np.all(np.isfinite(values)) or values.min() < 0:
    raise ValueError('soft labels must be finite and non-negative (a '
                     'probability distribution per row).')
  sums = values.sum(-1)
  worst = int(np.argmax(np.abs(sums - 1.0)))
  if abs(sums[worst] - 1.0) > tol:
    raise ValueError(f'soft labels must sum to 1 per row; row {worst} sums to '
                     f'{sums[worst]:.6g}.')


def _check_logits(logits, name='logits'):
  if logits.ndim != 3:
    raise ValueError(
        f'{name} must be [heads, batch, classes], got shape {logits.shape}; '
        'for a single network use logits[None].')


def _soft_cross_entropy(targets, logits):
  """Per-example `CE(targets, softmax(logits))` in float32, `[..., C] -> [...]`."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def _batch_weights(mask, batch):
  """Per-example weights of a batch mean: uniform, or over the masked examples."""
  if mask is None:
    return jnp.full((batch,), 1.0 / batch, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask), 1.0)


def label_targets(labels, num_classes):
  """Integer ids `[B]` -> one-hot float32 `[B, C]`; `[B, C]` passes through.

  Concrete labels are checked (`_check_labels`): ids outside [0, C) and soft
  labels that are not distributions raise ValueError. Traced labels (inside
  `jit`) cannot be checked: an out-of-range id then counts as no label.
  """
  labels = jnp.asarray(labels)
  if labels.ndim == 1:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          f'labels of shape {labels.shape} must be integer class ids, got '
          f'dtype {labels.dtype}; pass soft labels as [batch, classes].')
    _check_labels(labels, num_classes)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if labels.ndim == 2:
    if labels.shape[-1] != num_classes:
      raise ValueError(
          f'labels have {labels.shape[-1]} classes but logits have '
          f'{num_classes}; they must agree.')
    _check_labels(labels, num_classes)
    return labels.astype(jnp.float32)
  raise ValueError(
      f'labels must be [batch] integer ids or [batch, classes], got shape '
      f'{labels.shape}.')


def smooth_labels(targets, epsilon):
  """Label smoothing (Szegedy et al. 2016): `(1 - eps) * y + eps / C`."""
  if isinstance(epsilon, (int, float)) and not 0.0 <= epsilon < 1.0:
    raise ValueError(f'label smoothing epsilon={epsilon} must be in [0, 1).')
  num_classes = targets.shape[-1]
  return (1.0 - epsilon) * targets + epsilon / num_classes


def consensus_targets(logits, temperature, *, stop_gradient=True):
  """Soft labels `q_h = softmax(mean_{j != h} z_j / T)` for every head.

  Args:
    logits: `[H, B, C]` with `H >= 2`.
    temperature: the softmax temperature `T > 0`.
    stop_gradient: the paper treats `q_h` as a fixed target (default). `False`
      lets gradients flow into the other heads through their consensus.

  Returns:
    `[H, B, C]` float32 probabilities; row `h` excludes head `h` itself.
  """
  _check_logits(logits)
  _check_hyper(1.0, temperature)
  num_heads = logits.shape[0]
  if num_heads < 2:
    raise ValueError(
        'consensus_targets needs at least 2 heads: with H = 1 there is no '
        'consensus (collaborative_loss then reduces to cross-entropy).')
  z = logits.astype(jnp.float32)
  others = (jnp.sum(z, axis=0, keepdims=True) - z) / (num_heads - 1)
  q = jax.nn.softmax(others / temperature, axis=-1)
  return jax.lax.stop_gradient(q) if stop_gradient else q


def collaborative_head_losses(logits, labels, *, beta=0.5, temperature=2.0,
                              label_smoothing=0.0, mask=None,
                              consensus_gradient=False):
  """Per-head terms of the collaborative loss, each averaged over the batch.

  Args:
    logits: `[H, B, C]`, heads first.
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
    beta: weight of the hard loss, in (0, 1].
    temperature: softmax temperature `T` of the soft loss.
    label_smoothing: epsilon applied to the hard targets (0 = off).
    mask: optional `[B]` weights (1 = real example, 0 = padding); batch means
      are taken over the weighted examples.
    consensus_gradient: let gradients flow through the soft labels.

  Returns:
    dict of `[H]` float32 arrays: `hard` (J_hard), `soft` (T^2 * J_soft, zero
    when H = 1) and `total` (L_h).
  """
  _check_logits(logits)
  _check_hyper(beta, temperature)
  num_heads, batch, num_classes = logits.shape
  targets = label_targets(labels, num_classes)
  if targets.shape[0] != batch:
    raise ValueError(
        f'labels have batch size {targets.shape[0]} but logits have {batch}.')
  if label_smoothing:
    targets = smooth_labels(targets, label_smoothing)
  weights = _batch_weights(mask, batch)

  hard = _soft_cross_entropy(targets[None], logits) @ weights   # [H]
  if num_heads == 1:
    soft = jnp.zeros_like(hard)
    total = hard  # no consensus: plain cross-entropy, whatever beta is
  else:
    q = consensus_targets(logits, temperature,
                          stop_gradient=not consensus_gradient)
    soft_ce = _soft_cross_entropy(q, logits.astype(jnp.float32) / temperature)
    soft = temperature**2 * (soft_ce @ weights)
    total = beta * hard + (1.0 - beta) * soft
  return {'hard': hard, 'soft': soft, 'total': total}


def collaborative_loss(logits, labels, *, beta=0.5, temperature=2.0, **kwargs):
  """The collaborative loss `L = sum_h mean_batch L_h` (paper eq. 4).

  Args:
    logits: `[H, B, C]` logits of the `H` heads (heads first).
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
      Concrete labels are checked (ids in [0, C), soft rows non-negative and
      summing to 1: ValueError otherwise); traced ones (inside `jit`) cannot
      be, and an id outside [0, C) then adds nothing to the hard loss.
    beta: weight of the hard (label) loss, in (0, 1]; paper: 0.5.
    temperature: temperature `T > 0` of the soft (consensus) loss; paper: 2.
    **kwargs: `label_smoothing`, `mask`, `consensus_gradient`, as in
      `collaborative_head_losses`.

  Returns:
    A float32 scalar. With `H = 1` it is the plain cross-entropy.
  """
  return jnp.sum(collaborative_head_losses(
      logits, labels, beta=beta, temperature=temperature, **kwargs)['total'])


def distillation_loss(student_logits, teacher_logits, labels, *, beta=0.5,
                      temperature=2.0, mask=None):
  """Distillation from fixed teacher logits (Hinton et al. 2015).

  `beta * CE(y, sigma(z_s)) + (1 - beta) * T^2 * CE(sigma(z_t; T), sigma(z_s; T))`
  averaged over the batch; the teacher is under stop-gradient.

  Args:
    student_logits: `[B, C]`.
    teacher_logits: `[B, C]`, e.g. the mean logits of a teacher ensemble.
    labels: `[B]` ids or `[B, C]` targets.
    beta, temperature: as in `collaborative_loss`.
    mask: optional `[B]` example weights.

  Returns:
    A float32 scalar.
  """
  if student_logits.ndim != 2 or student_logits.shape != teacher_logits.shape:
    raise ValueError(
        f'student logits {student_logits.shape} and teacher logits '
        f'{teacher_logits.shape} must both be [batch, classes].')
  _check_hyper(beta, temperature)
  batch, num_classes = student_logits.shape
  targets = label_targets(labels, num_classes)
  weights = _batch_weights(mask, batch)
  teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  q = jax.nn.softmax(teacher / temperature, axis=-1)
  hard = _soft_cross_entropy(targets, student_logits) @ weights
  soft = _soft_cross_entropy(
      q, student_logits.astype(jnp.float32) / temperature) @ weights
  return beta * hard + (1.0 - beta) * temperature**2 * soft


def cross_entropy(logits, labels, *, label_smoothing=0.0,
                  mask: Optional[Array] = None):
  """Batch-mean cross-entropy of `[B, C]` logits (optionally smoothed)."""
  return collaborative_loss(logits[None], labels, beta=1.0,
                            label_smoothing=label_smoothing, mask=mask)
