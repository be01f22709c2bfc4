"""The collaborative loss (paper Sec. 3.2, eq. 2-4) and the baselines' losses.

Notation as in the paper: `H` heads, logits `z_h`, `sigma(z; T) = softmax(z / T)`.

* hard loss   `J_hard(y, z_h) = CE(y, sigma(z_h; 1))`
* soft label  `q_h = sigma(mean_{j != h} z_j; T)`: the consensus of the *other*
  heads, a target under stop-gradient (as in distillation)
* soft loss   `J_soft(q_h, z_h) = CE(q_h, sigma(z_h; T))`, times `T^2` (Hinton et
  al. 2015) so the hard/soft balance does not move with `T`
* head loss   `L_h = beta * J_hard + (1 - beta) * T^2 * J_soft`
* total       `L = sum_h mean_batch L_h` (weight decay is the optimizer's job)

Semi-supervised (the paper's future work; `labeled` argument): an unlabelled
example has no hard loss and keeps only its consensus term, weighted by
`unlabeled_weight` instead of `1 - beta`; see `collaborative_head_losses`.

All reductions run in float32 whatever the logits' dtype, and every
cross-entropy is `optax.softmax_cross_entropy` (a `log_softmax`, never
`log(softmax)`), so bfloat16 logits and saturated heads stay finite.
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = Any


def _check_hyper(beta, temperature):
  # Checked only for concrete values; traced hyper-parameters pass through.
  if isinstance(beta, (int, float)) and not 0.0 < beta <= 1.0:
    raise ValueError(f'beta={beta} is outside (0, 1]; the paper uses 0.5.')
  if isinstance(temperature, (int, float)) and not 0 < temperature < math.inf:
    raise ValueError(f'temperature={temperature} must be > 0 and finite; the '
                     'paper uses 2.')


def _is_concrete(x):
  """Whether `x` holds values now (not a tracer under jit/grad/vmap)."""
  return not isinstance(x, jax.core.Tracer)


def _check_labels(labels, num_classes, labeled=None):
  """Concrete labels only: ids in [0, C), soft labels that are distributions.

  Under `jit` (traced labels) nothing is checked: an id outside [0, C) becomes
  an all-zero one-hot row (`jax.nn.one_hot`), so that example adds nothing to
  the hard loss, and soft labels are used as given. With a `labeled` mask only
  the labelled rows are checked (unlabelled ones may hold any placeholder,
  e.g. -1), and nothing when the mask is traced.
  """
  if not _is_concrete(labels):
    return
  values = np.asarray(labels)
  if labeled is not None:
    keep = np.asarray(labeled).astype(bool) if _is_concrete(labeled) else None
    if keep is None or keep.shape != values.shape[:1]:
      return  # traced, or the wrong shape (reported by the caller)
    values = values[keep]
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
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     targets.astype(jnp.float32))


def _batch_weights(mask, batch):
  """Per-example weights of a batch mean: uniform, or over the masked examples."""
  if mask is None:
    return jnp.full((batch,), 1.0 / batch, jnp.float32)
  mask = jnp.asarray(mask, jnp.float32)
  return mask / jnp.maximum(jnp.sum(mask), 1.0)


def label_targets(labels, num_classes, labeled=None):
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
    _check_labels(labels, num_classes, labeled)
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if labels.ndim == 2:
    if labels.shape[-1] != num_classes:
      raise ValueError(
          f'labels have {labels.shape[-1]} classes but logits have '
          f'{num_classes}; they must agree.')
    _check_labels(labels, num_classes, labeled)
    return labels.astype(jnp.float32)
  raise ValueError(
      f'labels must be [batch] integer ids or [batch, classes], got shape '
      f'{labels.shape}.')


def smooth_labels(targets, epsilon):
  """Label smoothing (Szegedy et al. 2016): `(1 - eps) * y + eps / C`."""
  if isinstance(epsilon, (int, float)) and not 0.0 <= epsilon < 1.0:
    raise ValueError(f'label smoothing epsilon={epsilon} must be in [0, 1).')
  return optax.smooth_labels(targets, epsilon)


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
                              consensus_gradient=False, labeled=None,
                              unlabeled_weight=1.0):
  """Per-head terms of the collaborative loss, each averaged over the batch.

  Semi-supervised batches (`labeled` given): labelled examples get the full
  `L_h`, unlabelled ones only the consensus term, weighted by
  `unlabeled_weight` (`w`). Normalisation (as in Mean Teacher, Tarvainen &
  Valpola 2017): the hard loss is averaged over the labelled examples, the
  consensus term over all examples of the batch:

      L_h = beta * mean_{i labelled} J_hard(y_i, z_hi)
            + mean_{i in batch} c_i * T^2 * J_soft(q_hi, z_hi),
      c_i = 1 - beta (labelled) or w (unlabelled),

  so the hard loss keeps the scale of supervised training whatever the
  labelled share of the batch. With every example labelled this is the
  paper's `L_h`, and the result equals that of `labeled=None` bit for bit.
  Everything is mask arithmetic (no boolean indexing), so it runs under `jit`
  with a traced `labeled` and `unlabeled_weight` (e.g. a ramp-up). A batch
  without labelled examples has a zero hard loss. With `H = 1` there is no
  consensus, so unlabelled examples contribute nothing.

  Args:
    logits: `[H, B, C]`, heads first.
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
    beta: weight of the hard loss, in (0, 1].
    temperature: softmax temperature `T` of the soft loss.
    label_smoothing: epsilon applied to the hard targets (0 = off).
    mask: optional `[B]` weights (1 = real example, 0 = padding); batch means
      are taken over the weighted examples.
    consensus_gradient: let gradients flow through the soft labels.
    labeled: optional `[B]` bool or 0/1 float, 1 = labelled; None = all
      labelled. The labels of unlabelled examples are ignored (e.g. -1).
    unlabeled_weight: `w`, the weight of the consensus term `T^2 * J_soft` of
      unlabelled examples (labelled ones weigh it by `1 - beta`).

  Returns:
    dict of `[H]` float32 arrays: `hard` (J_hard, over the labelled
    examples), `soft` (T^2 * J_soft over all examples, zero when H = 1) and
    `total` (L_h).
  """
  _check_logits(logits)
  _check_hyper(beta, temperature)
  num_heads, batch, num_classes = logits.shape
  targets = label_targets(labels, num_classes, labeled)
  if targets.shape[0] != batch:
    raise ValueError(
        f'labels have batch size {targets.shape[0]} but logits have {batch}.')
  if label_smoothing:
    targets = smooth_labels(targets, label_smoothing)
  weights = _batch_weights(mask, batch)
  if labeled is None:
    hard_weights = weights
  else:
    labeled = jnp.asarray(labeled, jnp.float32)
    if labeled.shape != (batch,):
      raise ValueError(
          f'labeled must be [batch] = ({batch},), got shape {labeled.shape}.')
    # The mean over the labelled (and real) examples; when all are labelled
    # these are exactly `weights` (same operations on the same values).
    hard_weights = _batch_weights(
        labeled if mask is None else jnp.asarray(mask, jnp.float32) * labeled,
        batch)

  hard = _soft_cross_entropy(targets[None], logits) @ hard_weights   # [H]
  if num_heads == 1:
    soft = jnp.zeros_like(hard)
    total = hard  # no consensus: plain cross-entropy, whatever beta is
  else:
    q = consensus_targets(logits, temperature,
                          stop_gradient=not consensus_gradient)
    soft_ce = _soft_cross_entropy(q, logits.astype(jnp.float32) / temperature)
    soft = temperature**2 * (soft_ce @ weights)
    if labeled is None:
      total = beta * hard + (1.0 - beta) * soft
    else:
      # The unlabelled examples' share of the batch mean `soft`; it is
      # exactly 0 when every example is labelled, so `total` is unchanged.
      soft_unl = temperature**2 * ((soft_ce * (1.0 - labeled)) @ weights)
      total = (beta * hard + (1.0 - beta) * (soft - soft_unl)
               + unlabeled_weight * soft_unl)
  return {'hard': hard, 'soft': soft, 'total': total}


def collaborative_loss(logits, labels, *, beta=0.5, temperature=2.0,
                       labeled=None, unlabeled_weight=1.0, **kwargs):
  """The collaborative loss `L = sum_h mean_batch L_h` (paper eq. 4).

  Args:
    logits: `[H, B, C]` logits of the `H` heads (heads first).
    labels: `[B]` integer class ids, or `[B, C]` one-hot / soft labels.
      Concrete labels are checked (ids in [0, C), soft rows non-negative and
      summing to 1: ValueError otherwise); traced ones (inside `jit`) cannot
      be, and an id outside [0, C) then adds nothing to the hard loss.
    beta: weight of the hard (label) loss, in (0, 1]; paper: 0.5.
    temperature: temperature `T > 0` of the soft (consensus) loss; paper: 2.
    labeled: optional `[B]` mask, 1 = labelled (None: all labelled). Unlabelled
      examples get only the consensus term, times `unlabeled_weight`; the hard
      loss is averaged over the labelled examples, the consensus term over all
      (see `collaborative_head_losses`).
    unlabeled_weight: weight of the unlabelled examples' consensus term.
    **kwargs: `label_smoothing`, `mask`, `consensus_gradient`, as in
      `collaborative_head_losses`.

  Returns:
    A float32 scalar. With `H = 1` it is the plain cross-entropy.
  """
  return jnp.sum(collaborative_head_losses(
      logits, labels, beta=beta, temperature=temperature, labeled=labeled,
      unlabeled_weight=unlabeled_weight, **kwargs)['total'])


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
    dict of float32 scalars, as `collaborative_head_losses` gives per head:
    `hard` (CE to the labels), `soft` (T^2 * CE to the teacher) and `total`.
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
  soft = temperature**2 * (_soft_cross_entropy(
      q, student_logits.astype(jnp.float32) / temperature) @ weights)
  return {'hard': hard, 'soft': soft,
          'total': beta * hard + (1.0 - beta) * soft}


def cross_entropy(logits, labels, *, label_smoothing=0.0,
                  mask: Optional[Array] = None):
  """Batch-mean cross-entropy of `[B, C]` logits (optionally smoothed)."""
  return collaborative_loss(logits[None], labels, beta=1.0,
                            label_smoothing=label_smoothing, mask=mask)


def collaborative_regression_loss(preds, targets, *, beta=0.5, mask=None):
  """Collaborative learning for regression (the paper's future work, Sec. 5).

  The classification loss with squared error in place of cross-entropy and
  the other heads' mean prediction in place of their softened consensus:

    `L_h = beta * |p_h - y|^2 + (1 - beta) * |p_h - sg(mean_{j != h} p_j)|^2`

  with `sg` the stop-gradient (the consensus is a target, as `q_h` is) and
  `|.|^2` summed over output dimensions. No temperature: a prediction has no
  softmax to soften. Total: `sum_h mean_batch L_h`; with `H = 1` it is the
  plain squared error, whatever `beta` is.

  Args:
    preds: `[H, B]` or `[H, B, D]` predictions of the `H` heads (heads first).
    targets: `[B]` or `[B, D]`, matching `preds[0]`.
    beta: weight of the squared error to the target, in (0, 1].
    mask: optional `[B]` example weights (1 = real example, 0 = padding).

  Returns:
    A float32 scalar.
  """
  _check_hyper(beta, 1.0)
  if preds.ndim not in (2, 3):
    raise ValueError(
        f'preds must be [heads, batch] or [heads, batch, dims], got shape '
        f'{preds.shape}; for a single network use preds[None].')
  if tuple(targets.shape) != tuple(preds.shape[1:]):
    raise ValueError(
        f'targets have shape {targets.shape} but preds {preds.shape} need '
        f'{preds.shape[1:]} (preds[0]\'s shape).')
  p = preds.astype(jnp.float32)
  if p.ndim == 2:
    p, targets = p[..., None], targets[..., None]
  num_heads, batch = p.shape[:2]
  weights = _batch_weights(mask, batch)
  hard = jnp.sum((p - targets.astype(jnp.float32)[None])**2, axis=-1) @ weights
  if num_heads == 1:
    return jnp.sum(hard)
  others = (jnp.sum(p, axis=0, keepdims=True) - p) / (num_heads - 1)
  soft = jnp.sum((p - jax.lax.stop_gradient(others))**2, axis=-1) @ weights
  return jnp.sum(beta * hard + (1.0 - beta) * soft)
