"""What makes each method itself."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab_jax import heads as heads_lib
from collab_jax import losses
from collab_jax.trainer import methods
from collab_jax.trainer import steps
from collab_jax.trainer import train
import collab_jax
import testutil


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('fmnist')
  testutil.fake_fashion_mnist(str(d), num_train=64, num_test=16, shape=(8, 8))
  return d


def _setup(config):
  """The built run of `config`, its initial state and its first batch."""
  built = train.build(config)
  state = steps.create_train_state(jax.random.key(0), built.model,
                                   built.data.image_shape, built.tx,
                                   built.method.init_opt_state)
  batch = {k: jnp.asarray(v) for k, v in next(built.data.train_iter(0)).items()}
  return built, state, batch


def _step(built, **kwargs):
  """The method's train step (not jitted), as the trainer binds it."""
  step = built.method.train_step or functools.partial(steps.train_step,
                                                      method=built.method)
  return functools.partial(step, model=built.model, tx=built.tx,
                           preprocess=built.data.preprocess, seed=0, **kwargs)


def _loss_terms(config, logits, labels):
  return methods.create(config, logits.shape[0]).loss_terms(logits, labels)


def test_label_smoothing_targets(data_dir):
  config = testutil.tiny_config(data_dir, method='label_smoothing',
                                label_smoothing=0.1)
  config.model.splits = ()
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 10)), jnp.float32)
  labels = jnp.array([1, 2, 3, 4])
  got = _loss_terms(config, logits, labels)['total'][0]
  targets = 0.9 * jax.nn.one_hot(labels, 10) + 0.01
  want = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits[0]), -1))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # ... and the collaborative method does not smooth.
  config.method = 'collaborative'
  plain = _loss_terms(config, logits, labels)['total'][0]
  assert not np.isclose(plain, got)


def _head_loss(model, config, params, batch_stats, images, labels, h):
  logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                          train=True, mutable=['batch_stats'])
  return _loss_terms(config, logits, labels)['total'][h]


def test_alternating_updates_heads_in_turn_with_fresh_predictions(data_dir):
  config = testutil.tiny_config(data_dir, method='alternating', augment=False,
                                learning_rate=0.5)
  config.model.splits = ((0, 2),)
  built, state, batch = _setup(config)
  model, tx = built.model, built.tx
  assert isinstance(built.method, methods.Alternating)
  new_state, _ = jax.jit(_step(built))(state, batch)

  images = built.data.preprocess(None, batch['image'], train=False)
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
  built, state, batch = _setup(config)
  model = built.model
  images = built.data.preprocess(None, batch['image'], train=False)
  # Two teachers, as the trainer loads them: single networks of their own.
  built.method.teachers = [methods.Teacher(model, 0.0), methods.Teacher(model, 0.0)]
  teacher_vars = [model.init(jax.random.key(k), images) for k in (7, 8)]
  before = jax.tree.map(np.array, teacher_vars)
  new_state, metrics = jax.jit(_step(built))(state, batch, teacher_vars)
  # The teacher is an input, never updated.
  for a, b in zip(jax.tree.leaves(teacher_vars), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  # The loss is the distillation loss against the mean of the teachers' logits.
  student, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                           images, train=True, mutable=['batch_stats'])
  ensemble = jnp.mean(jnp.stack([model.apply(v, images)[0] for v in teacher_vars]),
                      axis=0)
  want = losses.distillation_loss(student[0], ensemble, batch['label'],
                                  beta=config.beta, temperature=config.temperature)['total']
  np.testing.assert_allclose(metrics['loss'][0], want, rtol=1e-5)
  one_teacher = model.apply(teacher_vars[0], images)[0]
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
    built, state, batch = _setup(config)
    model = built.model
    images = built.data.preprocess(None, batch['image'], train=False)
    def loss_fn(params):
      logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats},
                              images, train=True, mutable=['batch_stats'])
      parts = built.method.loss_terms(logits, batch['label'])
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
