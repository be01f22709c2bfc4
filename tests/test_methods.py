"""What makes each method itself (issue: every row of the paper's tables)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab_jax import heads as heads_lib
from collab_jax import losses
from collab_jax.data import augment
from collab_jax.data import source as data_lib
from collab_jax.trainer import steps
import collab_jax
import testutil


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('fmnist')
  testutil.fake_fashion_mnist(str(d), num_train=64, num_test=16, shape=(8, 8))
  return d


def _setup(config):
  data = data_lib.create_data_source(config)
  model = steps.create_model(config, data.num_classes)
  tx = steps.create_optimizer(config, lambda s: config.learning_rate)
  state = steps.create_train_state(jax.random.key(0), config, model,
                                   data.image_shape, tx)
  stats = {k: tuple(v) for k, v in data.stats.items()}
  batch = {k: jnp.asarray(v) for k, v in next(data.train_iter(0)).items()}
  return data, model, tx, state, stats, batch


def test_label_smoothing_targets(data_dir):
  config = testutil.tiny_config(data_dir, method='label_smoothing',
                                label_smoothing=0.1)
  config.model.splits = ()
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 10)), jnp.float32)
  labels = jnp.array([1, 2, 3, 4])
  got = steps.loss_terms(logits, labels, config)['total'][0]
  targets = 0.9 * jax.nn.one_hot(labels, 10) + 0.01
  want = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits[0]), -1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # ... and the collaborative method does not smooth.
  config.method = 'collaborative'
  plain = steps.loss_terms(logits, labels, config)['total'][0]
  assert not np.isclose(plain, got)


def _head_loss(model, config, params, batch_stats, images, labels, h):
  logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                          train=True, mutable=['batch_stats'])
  return steps.loss_terms(logits, labels, config)['total'][h]


def test_alternating_updates_heads_in_turn_with_fresh_predictions(data_dir):
  config = testutil.tiny_config(data_dir, method='alternating', augment=False,
                                learning_rate=0.5)
  config.model.splits = ((0, 2),)
  _, model, tx, state, stats, batch = _setup(config)
  step = functools.partial(steps.alternating_train_step, model=model, tx=tx,
                           config=config, data_stats=stats)
  new_state, _ = jax.jit(step)(state, batch)

  images = augment.preprocess(None, batch['image'], config, stats, train=False)
  labels = batch['label']
  p0, bs = state.params, state.batch_stats
  slice_ = lambda tree, h: jax.tree.map(lambda a: a[h], tree)
  def with_head(params, h, head_params):
    level = jax.tree.map(lambda a, p: a.at[h].set(p), params['level_1'], head_params)
    return {**params, 'level_1': level}
  def update(params, opt_state, h):
    g = jax.grad(lambda hp: _head_loss(model, config, with_head(params, h, hp), bs,
                                       images, labels, h))(slice_(params['level_1'], h))
    upd, _ = tx.update(g, slice_(opt_state, h), slice_(params['level_1'], h))
    return with_head(params, h, optax.apply_updates(slice_(params['level_1'], h), upd))
  # Head 1 first, then head 2 against head 1's *updated* prediction.
  p1 = update(p0, state.opt_state, 0)
  p2 = update(p1, state.opt_state, 1)
  for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  # Using head 1's *old* prediction would have given another head 2.
  stale = update(p0, state.opt_state, 1)
  diff = [np.abs(a[1] - b[1]).max() for a, b in zip(
      jax.tree.leaves(new_state.params['level_1']), jax.tree.leaves(stale['level_1']))]
  assert max(diff) > 1e-6
  # Each head has its own optimizer state (stacked per head), both used.
  for leaf in jax.tree.leaves(new_state.opt_state):
    if leaf.ndim > 1:
      assert leaf.shape[0] == 2


def test_distillation_teacher_frozen_and_loss_uses_ensemble_logits(data_dir):
  config = testutil.tiny_config(data_dir, method='distillation', augment=False)
  config.model.splits = ()
  _, model, tx, state, stats, batch = _setup(config)
  teacher_model = collab_jax.HeadTree(model.stages, ((0, 2),))
  images = augment.preprocess(None, batch['image'], config, stats, train=False)
  teacher_vars = teacher_model.init(jax.random.key(7), images)
  before = jax.tree.map(np.array, teacher_vars)
  apply = functools.partial(teacher_model.apply, train=False)
  step = functools.partial(steps.train_step, model=model, tx=tx, config=config,
                           data_stats=stats, teacher_apply=apply)
  new_state, metrics = jax.jit(step)(state, batch, teacher_vars)
  # The teacher is an input, never updated.
  for a, b in zip(jax.tree.leaves(teacher_vars), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  # The loss is the distillation loss against the mean of the teachers' logits.
  student, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                           images, train=True, mutable=['batch_stats'])
  ensemble = jnp.mean(teacher_model.apply(teacher_vars, images), axis=0)
  want = losses.distillation_loss(student[0], ensemble, batch['label'],
                                  beta=config.beta, temperature=config.temperature)['total']
  np.testing.assert_allclose(metrics['loss'][0], want, rtol=1e-5)
  one_teacher = teacher_model.apply(teacher_vars, images)[0]
  other = losses.distillation_loss(student[0], one_teacher, batch['label'])['total']
  assert not np.isclose(other, want)
  assert int(new_state.step) == 1


def test_rescaling_ablation_gradient_ratios(data_dir):
  """H heads sharing one split: shared grads 1 : H : 1, per-head 1 : 1 : 1/H."""
  heads = 4
  grads = {}
  for mode in heads_lib.RESCALE_MODES:
    config = testutil.tiny_config(data_dir, augment=False, **{'model.rescale': mode})
    config.model.splits = ((1, heads),)
    _, model, _, state, stats, batch = _setup(config)
    images = augment.preprocess(None, batch['image'], config, stats, train=False)
    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats},
                              images, train=True, mutable=['batch_stats'])
      parts = steps.loss_terms(logits, batch['label'], config)
      return jnp.sum(parts['total']) * heads_lib.loss_scale(mode, heads)
    grads[mode] = jax.jit(jax.grad(loss_fn))(state.params)
  def ratio(part, a, b):
    x = np.concatenate([np.ravel(l) for l in jax.tree.leaves(grads[a][part])])
    y = np.concatenate([np.ravel(l) for l in jax.tree.leaves(grads[b][part])])
    big = np.abs(y) > 1e-4 * np.abs(y).max()
    return np.median(x[big] / y[big]), np.max(np.abs(x - np.median(x[big] / y[big]) * y))
  for part, want in (('trunk', {'none': heads, 'loss': 1.0}),
                     ('level_1', {'none': 1.0, 'loss': 1.0 / heads})):
    for mode, r in want.items():
      got, err = ratio(part, mode, 'backprop')
      assert got == pytest.approx(r, rel=1e-3), (part, mode)
      assert err < 1e-4
