"""The collaborative loss and its gradient against an independent NumPy version."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax import losses
import collab_jax


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_softmax(z):
  return np.exp(_np_log_softmax(z))


def np_collaborative(logits, targets, beta, temperature):
  """Paper eq. 2-4 in float64 NumPy: loss and d loss / d logits (q held fixed)."""
  heads, batch, _ = logits.shape
  loss, grad = 0.0, np.zeros_like(logits)
  for h in range(heads):
    p = _np_softmax(logits[h])
    hard = -(targets * _np_log_softmax(logits[h])).sum(-1).mean()
    if heads == 1:
      loss += hard
      grad[h] = (p - targets) / batch
      continue
    others = (logits.sum(0) - logits[h]) / (heads - 1)
    q = _np_softmax(others / temperature)
    pt = _np_softmax(logits[h] / temperature)
    soft = -(q * _np_log_softmax(logits[h] / temperature)).sum(-1).mean()
    loss += beta * hard + (1 - beta) * temperature**2 * soft
    grad[h] = (beta * (p - targets)
               + (1 - beta) * temperature * (pt - q)) / batch
  return loss, grad


@pytest.mark.parametrize('heads,temperature,beta', list(itertools.product(
    [1, 2, 3, 4], [1.0, 2.0, 4.0], [0.5, 0.8, 1.0])))
def test_loss_and_gradient_match_numpy(heads, temperature, beta):
  rng = np.random.default_rng(heads * 100 + int(temperature * 10))
  logits = rng.normal(size=(heads, 6, 5)) * 3
  labels = rng.integers(0, 5, size=6)
  targets = np.eye(5)[labels]
  want_loss, want_grad = np_collaborative(logits, targets, beta, temperature)
  fn = lambda z: collab_jax.collaborative_loss(
      z, labels, beta=beta, temperature=temperature)
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32))
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_soft_labels_accepted_and_equal_to_one_hot():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 4, 6)), jnp.float32)
  labels = np.array([0, 5, 2, 2])
  a = collab_jax.collaborative_loss(logits, labels)
  b = collab_jax.collaborative_loss(logits, jax.nn.one_hot(labels, 6))
  np.testing.assert_allclose(a, b, rtol=1e-6)
  soft = rng.dirichlet(np.ones(6), size=4)
  want, _ = np_collaborative(np.asarray(logits, np.float64), soft, 0.5, 2.0)
  np.testing.assert_allclose(
      collab_jax.collaborative_loss(logits, soft), want, rtol=1e-5)


def test_consensus_excludes_own_head():
  logits = jnp.array([[[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 4.0]]])
  q = collab_jax.consensus_targets(logits, 1.0)
  assert q.shape == (3, 1, 2)
  np.testing.assert_allclose(q[0, 0], jax.nn.softmax(jnp.array([1.0, 2.0])), rtol=1e-6)
  np.testing.assert_allclose(q[1, 0], jax.nn.softmax(jnp.array([0.0, 2.0])), rtol=1e-6)
  np.testing.assert_allclose(q[2, 0], jax.nn.softmax(jnp.array([1.0, 0.0])), rtol=1e-6)


def test_single_head_is_cross_entropy():
  logits = jnp.array([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])
  labels = jnp.array([1, 2])
  want = -np.mean(np.take_along_axis(
      _np_log_softmax(np.asarray(logits[0], np.float64)), np.array([[1], [2]]), 1))
  for beta in (0.3, 1.0):
    np.testing.assert_allclose(
        collab_jax.collaborative_loss(logits, labels, beta=beta), want, rtol=1e-6)


def test_consensus_gradient_option_changes_gradient():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 3, 4)), jnp.float32)
  labels = jnp.array([0, 1, 2])
  g0 = jax.grad(lambda z: collab_jax.collaborative_loss(z, labels))(logits)
  g1 = jax.grad(lambda z: collab_jax.collaborative_loss(
      z, labels, consensus_gradient=True))(logits)
  assert not np.allclose(g0, g1)


def test_stable_for_large_and_bfloat16_logits():
  logits = jnp.array([[[1e4, -1e4, 0.0]], [[-1e4, 1e4, 0.0]]], jnp.bfloat16)
  labels = jnp.array([0])
  loss, grad = jax.value_and_grad(
      lambda z: collab_jax.collaborative_loss(z, labels))(logits)
  assert loss.dtype == jnp.float32 and np.isfinite(loss) and loss > 1000
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


def test_mask_ignores_padding():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
  labels = jnp.array([0, 1, 2, 0, 1])
  mask = jnp.array([1, 1, 1, 0, 0])
  np.testing.assert_allclose(
      collab_jax.collaborative_loss(logits, labels, mask=mask),
      collab_jax.collaborative_loss(logits[:, :3], labels[:3]), rtol=1e-6)


def test_label_smoothing_targets():
  y = jax.nn.one_hot(jnp.array([1]), 4)
  np.testing.assert_allclose(collab_jax.smooth_labels(y, 0.1),
                             [[0.025, 0.925, 0.025, 0.025]], rtol=1e-6)


def test_distillation_loss_matches_numpy_and_freezes_teacher():
  rng = np.random.default_rng(3)
  s = rng.normal(size=(4, 5))
  t = rng.normal(size=(4, 5))
  labels = rng.integers(0, 5, 4)
  y = np.eye(5)[labels]
  hard = -(y * _np_log_softmax(s)).sum(-1).mean()
  soft = -(_np_softmax(t / 2) * _np_log_softmax(s / 2)).sum(-1).mean()
  parts = collab_jax.distillation_loss(jnp.asarray(s), jnp.asarray(t), labels,
                                      beta=0.5, temperature=2.0)
  np.testing.assert_allclose(parts['hard'], hard, rtol=1e-5)
  np.testing.assert_allclose(parts['soft'], 4 * soft, rtol=1e-5)
  np.testing.assert_allclose(parts['total'], 0.5 * hard + 0.5 * 4 * soft, rtol=1e-5)
  fn = lambda s_, t_: collab_jax.distillation_loss(s_, t_, labels, beta=0.5,
                                                   temperature=2.0)['total']
  g_teacher = jax.grad(fn, argnums=1)(jnp.asarray(s), jnp.asarray(t))
  np.testing.assert_array_equal(g_teacher, 0.0)


@pytest.mark.parametrize('kwargs,match', [
    (dict(logits=jnp.zeros((4, 3)), labels=jnp.zeros(4, int)), r'\[heads, batch, classes\]'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(5, int)), 'batch size 5'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros((4, 7))), '7 classes'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(4)), 'integer class ids'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(4, int), beta=0.0), 'beta=0.0'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(4, int), beta=1.5), 'beta=1.5'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(4, int), temperature=0.0), 'temperature=0.0'),
    (dict(logits=jnp.zeros((2, 4, 3)), labels=jnp.zeros(4, int), temperature=-1.0), 'temperature=-1.0'),
])
def test_bad_input_names_the_argument(kwargs, match):
  with pytest.raises(ValueError, match=match):
    collab_jax.collaborative_loss(**kwargs)


def test_consensus_needs_two_heads():
  with pytest.raises(ValueError, match='at least 2 heads'):
    collab_jax.consensus_targets(jnp.zeros((1, 2, 3)), 2.0)


def test_head_losses_breakdown_sums_to_total():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(4, 8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  parts = losses.collaborative_head_losses(logits, labels, beta=0.3, temperature=3.0)
  assert parts['total'].shape == (4,)
  np.testing.assert_allclose(parts['total'], 0.3 * parts['hard'] + 0.7 * parts['soft'], rtol=1e-6)
  np.testing.assert_allclose(parts['total'].sum(), collab_jax.collaborative_loss(
      logits, labels, beta=0.3, temperature=3.0), rtol=1e-6)


def np_semisup(logits, targets, labeled, beta, temperature, w):
  """Semi-supervised L (losses.collaborative_head_losses) in float64 NumPy.

  Hard loss: mean over the labelled examples; consensus term: mean over all,
  weighted 1 - beta (labelled) or w (unlabelled). Returns loss and gradient.
  """
  heads, batch, _ = logits.shape
  lab = labeled.astype(np.float64)
  n_lab = max(lab.sum(), 1.0)
  coef = np.where(lab > 0, 1 - beta, w)
  loss, grad = 0.0, np.zeros_like(logits)
  for h in range(heads):
    p = _np_softmax(logits[h])
    ce = -(targets * _np_log_softmax(logits[h])).sum(-1)
    loss += beta * (lab * ce).sum() / n_lab
    grad[h] = beta * lab[:, None] * (p - targets) / n_lab
    others = (logits.sum(0) - logits[h]) / (heads - 1)
    q = _np_softmax(others / temperature)
    pt = _np_softmax(logits[h] / temperature)
    soft = -(q * _np_log_softmax(logits[h] / temperature)).sum(-1)
    loss += (coef * temperature**2 * soft).sum() / batch
    grad[h] += coef[:, None] * temperature * (pt - q) / batch
  return loss, grad


@pytest.mark.parametrize('heads,beta,w', [(2, 0.5, 1.0), (3, 0.7, 0.3),
                                          (4, 0.5, 2.0)])
def test_semisupervised_loss_and_gradient_match_numpy(heads, beta, w):
  rng = np.random.default_rng(heads)
  logits = rng.normal(size=(heads, 8, 5)) * 3
  labels = rng.integers(0, 5, size=8)
  labeled = np.array([1, 0, 1, 1, 0, 0, 1, 0], bool)
  batch_labels = np.where(labeled, labels, -1)  # unlabelled: no label
  want_loss, want_grad = np_semisup(logits, np.eye(5)[labels] * labeled[:, None],
                                    labeled, beta, 2.0, w)
  fn = jax.jit(lambda z, l, w_: collab_jax.collaborative_loss(
      z, batch_labels, beta=beta, temperature=2.0, labeled=l,
      unlabeled_weight=w_))
  loss, grad = jax.value_and_grad(fn)(jnp.asarray(logits, jnp.float32),
                                      labeled, w)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('heads,batch', [(1, 7), (2, 3), (4, 128), (3, 100)])
def test_all_labeled_equals_supervised_loss_exactly(heads, batch):
  rng = np.random.default_rng(batch)
  logits = jnp.asarray(rng.normal(size=(heads, batch, 10)) * 2, jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, batch))
  mask = jnp.asarray(np.arange(batch) < max(batch - 2, 1), jnp.float32)
  def parts(labeled, mask, w):
    return losses.collaborative_head_losses(
        logits, labels, beta=0.5, temperature=2.0, labeled=labeled, mask=mask,
        unlabeled_weight=w)
  # Like for like: eager against eager, jit against jit (XLA fuses a jitted
  # loss differently from op-by-op execution, for the old loss too).
  for m in (None, mask):
    for fn in (parts, jax.jit(parts)):
      want = fn(None, m, 1.0)
      for labeled in (np.ones(batch, bool), np.ones(batch, np.float32)):
        got = fn(labeled, m, 0.7)
        for k in ('hard', 'soft', 'total'):
          np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for fn in (collab_jax.collaborative_loss, jax.jit(collab_jax.collaborative_loss)):
      np.testing.assert_array_equal(
          fn(logits, labels, labeled=jnp.ones(batch), mask=m),
          fn(logits, labels, mask=m))


def test_unlabeled_examples_only_feel_the_consensus():
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(2, 4, 3)), jnp.float32)
  labeled = jnp.array([1.0, 1.0, 0.0, 0.0])
  loss = lambda z, y: collab_jax.collaborative_loss(z, y, labeled=labeled)
  # The labels of unlabelled examples do not matter.
  a = loss(logits, jnp.array([0, 1, 2, 2]))
  b = loss(logits, jnp.array([0, 1, -1, 0]))
  np.testing.assert_array_equal(a, b)
  # Without any labelled example only the weighted consensus is left.
  none = losses.collaborative_head_losses(logits, jnp.array([-1] * 4),
                                          labeled=jnp.zeros(4),
                                          unlabeled_weight=0.25)
  np.testing.assert_array_equal(none['hard'], 0.0)
  np.testing.assert_allclose(none['total'], 0.25 * none['soft'], rtol=1e-6)
  # A single head has no consensus: unlabelled examples add nothing.
  one = collab_jax.collaborative_loss(logits[:1], jnp.array([0, 1, -1, -1]),
                                      labeled=labeled)
  np.testing.assert_allclose(one, collab_jax.cross_entropy(logits[0, :2],
                                                           jnp.array([0, 1])),
                             rtol=1e-6)
  with pytest.raises(ValueError, match='labeled must be'):
    collab_jax.collaborative_loss(logits, jnp.zeros(4, int), labeled=jnp.ones(3))


@pytest.mark.parametrize('labels,match', [
    (jnp.array([0, 1, 3, 2]), r'label id 3 is outside \[0, 3\)'),
    (np.array([0, -1, 2, 2]), r'label id -1 is outside \[0, 3\)'),
    (jnp.array([[0.5, 0.5, 0.0]] * 3 + [[1.2, -0.2, 0.0]]), 'non-negative'),
    (jnp.array([[0.5, 0.5, 0.0]] * 3 + [[0.5, 0.4, 0.0]]),
     'sum to 1 per row; row 3 sums to 0.9'),
    (jnp.array([[0.5, 0.5, 0.0]] * 3 + [[jnp.nan, 0.5, 0.5]]), 'finite'),
])
def test_concrete_labels_are_checked(labels, match):
  logits = jnp.zeros((2, 4, 3))
  with pytest.raises(ValueError, match=match):
    collab_jax.collaborative_loss(logits, labels)
  with pytest.raises(ValueError, match=match):
    collab_jax.cross_entropy(logits[0], labels)


def test_traced_labels_are_not_checked_and_out_of_range_ids_count_nothing():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 3)), jnp.float32)
  loss = jax.jit(lambda l, y: collab_jax.collaborative_loss(l, y))
  # Documented: under jit an id outside [0, C) is an all-zero one-hot row.
  bad = loss(logits, jnp.array([0, 1, 2, 7]))
  good_three = loss(logits[:, :3], jnp.array([0, 1, 2])) * 3 / 4
  np.testing.assert_allclose(bad, good_three, rtol=1e-6)


def test_valid_soft_labels_in_bfloat16_pass():
  q = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(4, 3))))
  logits = jnp.zeros((2, 4, 3))
  a = collab_jax.collaborative_loss(logits, q.astype(jnp.bfloat16))
  b = collab_jax.collaborative_loss(logits, q)
  np.testing.assert_allclose(a, b, rtol=1e-2)
