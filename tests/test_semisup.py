"""Semi-supervised training: labelled split, batches, ramp-up, Mean Teacher."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from collab_jax import errors
from collab_jax import losses
from collab_jax.data import labeled_split
from collab_jax.data import source as data_lib
from collab_jax.data import subset
from collab_jax.trainer import methods
from collab_jax.trainer import steps
from collab_jax.trainer import train
import testutil


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp('fmnist')
  testutil.fake_fashion_mnist(str(d), num_train=96, num_test=40, shape=(12, 12))
  return d


def _split(labels, per_class=3, **kwargs):
  kwargs = {'seed': 0, 'global_batch': 16, 'labeled_fraction': 0.25, **kwargs}
  return labeled_split.LabeledSplit(labels, per_class, 10, **kwargs)


def test_labeled_subset_fixed_balanced_and_the_supervised_subset():
  labels = np.random.default_rng(0).permutation(np.arange(200) % 10)
  split = _split(labels)
  # Balanced: exactly 3 per class; the rest is the unlabelled pool.
  np.testing.assert_array_equal(np.bincount(labels[split.labeled]), [3] * 10)
  assert sorted(np.concatenate([split.labeled, split.unlabeled]).tolist()) == list(range(200))
  # Fixed: independent of the run seed, batch size and mix (only `seed` chooses).
  other = _split(labels, global_batch=32, labeled_fraction=0.5)
  np.testing.assert_array_equal(other.labeled, split.labeled)
  for run_seed in (0, 1, 7):
    idx, lab = split.indices(5, run_seed=run_seed)
    assert set(idx[lab].tolist()) <= set(split.labeled.tolist())
  assert not np.array_equal(_split(labels, seed=1).labeled, split.labeled)
  # The very subset a supervised run with train_subset = 30 trains on.
  np.testing.assert_array_equal(
      split.labeled, subset.balanced_subset(labels, 30, seed=0))


def test_batches_mix_in_the_documented_ratio_and_cover_each_pool():
  labels = np.arange(200) % 10
  split = _split(labels, per_class=4)  # 40 labelled, 160 unlabelled
  assert split.labeled_per_batch == 4  # round(0.25 * 16)
  lab_seen, unl_seen = [], []
  for step in range(10):  # labelled epoch = 10 steps, unlabelled = 13
    idx, lab = split.indices(step, run_seed=3)
    assert idx.shape == lab.shape == (16,)
    np.testing.assert_array_equal(lab, np.arange(16) < 4)  # labelled first
    assert set(idx[:4]) <= set(split.labeled) and set(idx[4:]) <= set(split.unlabeled)
    lab_seen += idx[:4].tolist()
    unl_seen += idx[4:].tolist()
  # One labelled epoch visits every labelled example once; no unlabelled repeats.
  assert sorted(lab_seen) == sorted(split.labeled.tolist())
  assert len(set(unl_seen)) == len(unl_seen)
  # A pure function of (run_seed, step): any order, fresh object, same batch.
  again = _split(labels, per_class=4)
  for step in (23, 0, 11):
    for a, b in zip(again.indices(step, run_seed=3), split.indices(step, run_seed=3)):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(split.indices(0, run_seed=4)[0], split.indices(0, run_seed=3)[0])


@pytest.mark.parametrize('kwargs,match', [
    (dict(per_class=20), 'some, but not all'),
    (dict(labeled_fraction=1.0), r'\(0, 1\)'),
    (dict(labeled_fraction=0.01), 'at least one labelled'),
    (dict(per_class=1, global_batch=64), 'larger than the 10'),
])
def test_split_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _split(np.arange(200) % 10, **kwargs)


def test_trainer_batches_carry_mask_and_unknown_labels(data_dir):
  config = testutil.tiny_config(data_dir, labeled_per_class=2,
                                labeled_fraction_per_batch=0.25)
  data = data_lib.create_data_source(config)
  batch = next(data.train_iter(3))
  np.testing.assert_array_equal(batch['labeled'], np.arange(16) < 4)
  assert batch['label'].dtype == np.int32
  assert np.all(batch['label'][4:] == -1) and np.all(batch['label'][:4] >= 0)
  # Plain runs keep their batches (no mask).
  plain = data_lib.create_data_source(testutil.tiny_config(data_dir))
  assert set(next(plain.train_iter(0))) == {'image', 'label'}


def test_rampup():
  steps = np.array([0, 25, 50, 100, 150])
  np.testing.assert_allclose(methods.rampup(steps, 100, 'linear'),
                             [0, 0.25, 0.5, 1, 1], rtol=1e-6)
  np.testing.assert_allclose(methods.rampup(steps, 100, 'sigmoid'),
                             np.exp(-5 * (1 - np.minimum(steps / 100, 1)) ** 2),
                             rtol=1e-6)
  assert methods.rampup(0, 0) == 1.0
  config = testutil.tiny_config('', unlabeled_weight=2.0, unlabeled_rampup='linear',
                                unlabeled_rampup_epochs=0.5)
  fn = jax.jit(methods.unlabeled_weight_fn(config, steps_per_epoch=40))
  np.testing.assert_allclose([fn(0), fn(10), fn(20), fn(99)], [0, 1, 2, 2], rtol=1e-6)


def test_ema_teacher_is_the_average_of_the_parameters():
  tx = optax.chain(optax.sgd(0.5), methods.ema_teacher(0.9))
  params = {'w': jnp.array([1.0, -2.0])}
  state = tx.init(params)
  want, history = np.array(params['w']), []
  for t in range(30):
    grads = {'w': jnp.array([0.3, 0.1]) * (t + 1)}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    a = min(0.9, 1 - 1 / (t + 2))  # warm-up: plain mean of the first ones
    want = a * want + (1 - a) * np.array(params['w'])
    history.append(np.array(params['w']))
    if t == 2:
      np.testing.assert_allclose(methods.teacher_params(state)['w'],
                                 np.mean([[1.0, -2.0]] + history, 0), rtol=1e-6)
  np.testing.assert_allclose(methods.teacher_params(state)['w'], want, rtol=1e-5)
  with pytest.raises(ValueError, match='no Mean Teacher'):
    methods.teacher_params(optax.sgd(0.1).init(params))


def test_mean_teacher_loss_is_the_collaborative_loss_against_the_teacher(data_dir):
  config = testutil.tiny_config(data_dir, method='mean_teacher')
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(1, 6, 10)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(6, 10)), jnp.float32)
  labels = jnp.array([1, 2, 3, -1, -1, -1])
  labeled = jnp.arange(6) < 3
  method = methods.create(config, 1)
  loss = lambda t: method.loss_terms(student, labels, teacher_logits=t, labeled=labeled,
                                     unlabeled_weight=0.7)['total'][0]
  got = loss(teacher)
  y = jax.nn.one_hot(labels[:3], 10)
  hard = -jnp.mean(jnp.sum(y * jax.nn.log_softmax(student[0, :3]), -1))
  soft = -jnp.sum(jax.nn.softmax(teacher / 2) * jax.nn.log_softmax(student[0] / 2), -1)
  coef = jnp.where(labeled, 0.5, 0.7)
  np.testing.assert_allclose(got, 0.5 * hard + jnp.mean(coef * 4 * soft), rtol=1e-5)
  # No gradient reaches the teacher.
  g = jax.grad(loss)(teacher)
  np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize('overrides,match', [
    (dict(labeled_per_class=2, method='alternating', **{'model.splits': ((0, 2),)}),
     'does not take unlabelled'),
    (dict(method='mean_teacher'), "'mean_teacher' trains one student"),
    (dict(labeled_per_class=-1), 'must be >= 0'),
    (dict(labeled_fraction_per_batch=1.0), 'labeled_fraction_per_batch'),
    (dict(unlabeled_rampup='cosine'), 'unlabeled_rampup'),
])
def test_bad_semisup_config(data_dir, overrides, match):
  config = testutil.tiny_config(data_dir, **overrides)  # 2 heads
  with pytest.raises(errors.ConfigError, match=match):
    train.build(config)


def _final_params(workdir, config):
  _, variables = train.load_run_variables(config, workdir)
  return variables


@pytest.mark.parametrize('method,splits', [('collaborative', ((1, 2),)),
                                           ('mean_teacher', ())])
def test_semisup_halt_and_resume_is_exact(data_dir, tmp_path, method, splits):
  def config(**kw):
    c = testutil.tiny_config(data_dir, labeled_per_class=2, method=method,
                             unlabeled_rampup_epochs=0.1, label_noise=0.2, **kw)
    c.model.splits = splits
    return c
  full = train.train_and_evaluate(config(), str(tmp_path / 'full'))
  halted = config(halt_after_steps=3)
  assert train.train_and_evaluate(halted, str(tmp_path / 'split')) is None
  resumed = train.train_and_evaluate(halted, str(tmp_path / 'split'))
  a = _final_params(tmp_path / 'full', config())
  b = _final_params(tmp_path / 'split', config())
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert resumed['head_1_test_error'] == full['head_1_test_error']
