"""The head tree: topology validation, parameter layout, rescaled gradients, export."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax import heads as heads_lib
from collab_jax import models
import collab_jax

TOPOLOGIES = [(), ((0, 2),), ((0, 4),), ((1, 2),), ((1, 4),), ((1, 2), (2, 2)),
              ((0, 2), (2, 3))]


def _init(tree, shape=(4, 16, 16, 3), seed=0):
  return jax.jit(tree.init)(jax.random.key(seed), jnp.zeros(shape, jnp.float32))


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.mark.parametrize('splits', TOPOLOGIES)
@pytest.mark.parametrize('impl', ['vmap', 'loop'])
def test_parameter_count_is_shared_plus_branch_copies(splits, impl):
  stages = models.get_stages('tiny_resnet', 10)
  single = jax.eval_shape(lambda: _init(collab_jax.StageNetwork(stages)))['params']
  per_stage = [_count(single[f'stage_{i}']) for i in range(len(stages))]
  tree = collab_jax.HeadTree(stages, splits, branch_impl=impl)
  params = jax.eval_shape(lambda: _init(tree))['params']
  # Stage s is copied once per branch path that exists before it.
  copies = [math.prod(b for i, b in splits if i <= s) for s in range(len(stages))]
  assert _count(params) == sum(c * n for c, n in zip(copies, per_stage))
  logits = jax.eval_shape(lambda p: tree.apply(p, jnp.zeros((4, 16, 16, 3))),
                          {'params': params, 'batch_stats': jax.eval_shape(
                              lambda: _init(tree))['batch_stats']})
  assert logits.shape == (collab_jax.num_heads(splits), 4, 10)


@pytest.mark.parametrize('splits,match', [
    (((3, 2),), 'out of range'),
    (((-1, 2),), 'out of range'),
    (((1, 1),), 'at least 2 branches'),
    (((1, 2), (1, 2)), 'strictly increasing'),
    (((2, 2), (1, 2)), 'strictly increasing'),
    (((1.0, 2),), 'must be ints'),
    ((1, 2), 'sequence of'),
])
def test_bad_topology_fails_at_construction(splits, match):
  with pytest.raises(ValueError, match=match):
    collab_jax.HeadTree(models.get_stages('tiny_resnet', 10), splits)


def test_bad_options_fail_at_construction():
  stages = models.get_stages('tiny_resnet', 10)
  with pytest.raises(ValueError, match='rescale'):
    collab_jax.HeadTree(stages, (), rescale='half')
  with pytest.raises(ValueError, match='branch_impl'):
    collab_jax.HeadTree(stages, (), branch_impl='scan')
  with pytest.raises(ValueError, match='unknown network'):
    models.get_stages('resnet9000', 10)


def _grads(tree, variables, x, labels, head=None):
  """Gradients of the collaborative loss (or of head `head`'s term only)."""
  def loss_fn(params):
    logits, _ = tree.apply({'params': params, 'batch_stats': variables['batch_stats']},
                           x, train=True, mutable=['batch_stats'])
    terms = collab_jax.collaborative_head_losses(logits, labels)['total']
    return jnp.sum(terms) if head is None else terms[head]
  return jax.jit(jax.grad(loss_fn))(variables['params'])


@pytest.mark.parametrize('splits', [((1, 4),), ((1, 2), (2, 2))])
def test_shared_gradient_is_mean_of_heads_with_backprop_and_sum_without(splits):
  stages = models.get_stages('tiny_resnet', 5)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))
  tree_bp = collab_jax.HeadTree(stages, splits, rescale='backprop')
  tree_none = collab_jax.HeadTree(stages, splits, rescale='none')
  variables = _init(tree_bp, x.shape)
  h = collab_jax.num_heads(splits)
  per_head = [_grads(tree_none, variables, x, labels, head=k) for k in range(h)]
  g_bp = _grads(tree_bp, variables, x, labels)
  g_none = _grads(tree_none, variables, x, labels)
  mean_trunk = jax.tree.map(lambda *g: sum(g) / h, *[g['trunk'] for g in per_head])
  sum_trunk = jax.tree.map(lambda *g: sum(g), *[g['trunk'] for g in per_head])
  for got, want in zip(jax.tree.leaves(g_bp['trunk']), jax.tree.leaves(mean_trunk)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  for got, want in zip(jax.tree.leaves(g_none['trunk']), jax.tree.leaves(sum_trunk)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
  # Each head's own (last-level) layers see the single-model gradient either way.
  last = f'level_{len(splits)}'
  for got, want in zip(jax.tree.leaves(g_bp[last]), jax.tree.leaves(g_none[last])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert any(np.abs(l).max() > 0 for l in jax.tree.leaves(g_bp['trunk']))


def test_hierarchical_middle_level_gets_mean_of_its_children():
  stages = models.get_stages('tiny_resnet', 5)
  splits = ((1, 2), (2, 2))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(8, 12, 12, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8))
  tree_bp = collab_jax.HeadTree(stages, splits)
  tree_none = collab_jax.HeadTree(stages, splits, rescale='none')
  variables = _init(tree_bp, x.shape)
  g_bp = _grads(tree_bp, variables, x, labels)['level_1']
  g_none = _grads(tree_none, variables, x, labels)['level_1']
  # Level-1 branch i feeds heads 2i, 2i+1: rescaled by 1/2, i.e. their mean.
  for got, want in zip(jax.tree.leaves(g_bp), jax.tree.leaves(g_none)):
    np.testing.assert_allclose(got, want / 2, rtol=1e-4, atol=1e-7)


def _trained_variables(tree, x):
  """Variables after one SGD step, so BatchNorm statistics are not trivial."""
  variables = _init(tree, x.shape)
  labels = jnp.arange(x.shape[0]) % 10
  stats = variables.get('batch_stats', {})  # none in a ViT (LayerNorm only)
  def loss_fn(params):
    logits, new = tree.apply({'params': params, 'batch_stats': stats},
                             x, train=True, mutable=['batch_stats'])
    return collab_jax.collaborative_loss(logits, labels), new
  grads, new = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
  params = jax.tree.map(lambda p, g: p - 0.5 * g, variables['params'], grads)
  return {'params': params, 'batch_stats': new['batch_stats']}


@pytest.mark.parametrize('name,splits,impl', [
    ('tiny_resnet', ((1, 2),), 'vmap'), ('tiny_resnet', ((1, 2),), 'loop'),
    ('tiny_resnet', ((1, 2), (2, 2)), 'vmap'), ('tiny_resnet', ((1, 2), (2, 2)), 'loop'),
    ('tiny_resnet', ((0, 3),), 'vmap'), ('tiny_resnet', ((0, 2), (2, 2)), 'loop'),
    ('tiny_densenet', ((1, 2), (2, 2)), 'vmap'), ('tiny_densenet', ((0, 2),), 'loop'),
    ('tiny_vit', ((1, 2), (2, 2)), 'loop'), ('tiny_vit', ((0, 2),), 'vmap'),
])
def test_export_reproduces_every_head(name, splits, impl):
  stages = models.get_stages(name, 10)
  tree = collab_jax.HeadTree(stages, splits, branch_impl=impl)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 16, 16, 3)), jnp.float32)
  variables = _trained_variables(tree, x)
  tree_logits = jax.jit(tree.apply)(variables, x)
  network = collab_jax.StageNetwork(stages)
  network_apply = jax.jit(network.apply)
  for head in range(collab_jax.num_heads(splits)):
    exported = collab_jax.export_head(variables, splits, head)
    # Exactly the plain network's variable structure ...
    plain = jax.eval_shape(lambda: _init(network, x.shape))
    assert jax.tree.structure(exported) == jax.tree.structure(plain)
    # ... and head `head`'s outputs: bit for bit when the tree ran the same
    # convolutions (loop); the vmapped tree runs them batched over branches,
    # which XLA may sum in another order, so there the tolerance is float32's.
    got = network_apply(exported, x)
    if impl == 'loop':
      np.testing.assert_array_equal(got, tree_logits[head])
    else:
      np.testing.assert_allclose(got, tree_logits[head], rtol=1e-5, atol=2e-6)
  # Heads really differ (they are different parameters).
  assert not np.allclose(tree_logits[0], tree_logits[-1])


def test_heads_own_their_batchnorm_statistics():
  stages = models.get_stages('tiny_resnet', 10)
  tree = collab_jax.HeadTree(stages, ((1, 2),))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  stats = _trained_variables(tree, x)['batch_stats']
  mean = jax.tree.leaves(stats['level_1'])[0]
  assert mean.shape[0] == 2 and not np.allclose(mean[0], mean[1])
  assert jax.tree.leaves(stats['trunk'])[0].ndim == 1


def test_vmap_and_loop_compute_the_same_function():
  """Both branch implementations share one parameter layout and one function."""
  stages = models.get_stages('tiny_resnet', 10)
  splits = ((1, 2), (2, 2))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 3)), jnp.float32)
  tree_v = collab_jax.HeadTree(stages, splits, branch_impl='vmap')
  tree_l = collab_jax.HeadTree(stages, splits, branch_impl='loop')
  variables = _trained_variables(tree_v, x)
  assert (jax.tree.structure(variables) ==
          jax.tree.structure(_init(tree_l, x.shape)))
  np.testing.assert_allclose(jax.jit(tree_l.apply)(variables, x),
                             jax.jit(tree_v.apply)(variables, x),
                             rtol=1e-5, atol=1e-5)
  # The gradients agree too (one is a batched, one a sequential computation).
  labels = jnp.arange(4)
  g_v = _grads(tree_v, variables, x, labels)
  g_l = _grads(tree_l, variables, x, labels)
  for a, b in zip(jax.tree.leaves(g_v), jax.tree.leaves(g_l)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_head_path_row_major():
  assert heads_lib.head_path(0, ((1, 2), (2, 2))) == (0, 0)
  assert heads_lib.head_path(3, ((1, 2), (2, 2))) == (1, 1)
  assert heads_lib.head_path(2, ((1, 2), (2, 2))) == (1, 0)
  with pytest.raises(ValueError, match='head 1 is index 0'):
    heads_lib.head_path(4, ((1, 2), (2, 2)))


def test_works_with_any_stage_list():
  """A network is just its stages: a 2-stage MLP needs nothing else."""
  class Dense(nn.Module):
    features: int
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(self.features)(x.reshape(x.shape[0], -1))
  stages = (functools.partial(Dense, 8), functools.partial(Dense, 3))
  tree = collab_jax.HeadTree(stages, ((1, 3),))
  variables = tree.init(jax.random.key(0), jnp.ones((2, 5)))
  assert tree.apply(variables, jnp.ones((2, 5))).shape == (3, 2, 3)
  assert variables['params']['level_1']['stage_1']['Dense_0']['kernel'].shape == (3, 8, 3)


@pytest.mark.parametrize('built,given,match', [
    (((1, 2), (2, 2)), ((1, 2),), r'1 split level\(s\) but the .(params|batch_stats). '
     r'variables have 2 \(level_1, level_2\)'),
    (((1, 2),), (), '0 split level'),
    (((1, 2), (2, 2)), ((1, 2), (2, 3)), r'level_2 variables are stacked as '
     r'\(2, 2\), not over the branches \(2, 3\)'),
    (((0, 4),), ((0, 2),), r'stacked as \(4,\), not over the branches \(2,\)'),
])
def test_export_checks_that_splits_match_the_variables(built, given, match):
  stages = models.get_stages('tiny_resnet', 10)
  variables = jax.eval_shape(lambda: _init(collab_jax.HeadTree(stages, built)))
  with pytest.raises(ValueError, match=match):
    collab_jax.export_head(variables, given, 0)
  # (The right splits pass: test_export_reproduces_every_head.)


# ----------------------------------------------------------------------------
# Reliability: bad trees, heads and exports.


def test_empty_or_non_callable_stages_fail_at_construction():
  """#26 item 18: HeadTree((), ()) was accepted (and returned its input)."""
  with pytest.raises(ValueError, match=r"^stages=\(\) is empty; a network "
                     r"needs at least one stage, e.g. collab_jax.get_stages"):
    collab_jax.HeadTree((), ())
  with pytest.raises(ValueError, match=r'^stages=\[\] is empty'):
    collab_jax.StageNetwork([])
  stages = models.get_stages('tiny_resnet', 10)
  with pytest.raises(TypeError, match=r'^stages\[1\]=3 is not callable; '
                     'expected a stage factory'):
    collab_jax.HeadTree((stages[0], 3, stages[2]), ((1, 2),))


def test_numpy_int_splits_are_normalised():
  stages = models.get_stages('tiny_resnet', 10)
  for splits in [((np.int64(1), np.int32(2)),), [[1, 2]], np.array([[1, 2]])]:
    tree = collab_jax.HeadTree(stages, splits)
    assert tree.splits == ((1, 2),)
    assert all(type(v) is int for pair in tree.splits for v in pair)
    assert type(collab_jax.num_heads(splits)) is int
  assert collab_jax.num_heads(np.array([[1, 2], [2, 3]])) == 6
  with pytest.raises(ValueError, match='sequence of'):
    collab_jax.num_heads((1, 2))


@pytest.mark.parametrize('head,error,match', [
    (1.0, TypeError, r'^head=1.0 has type float; expected an int in \[0, 4\) '
     r'\(0-based: head 1 is index 0\)\.$'),
    (True, TypeError, r'^head=True has type bool'),
    ('0', TypeError, r"^head='0' has type str"),
    (4, ValueError, r'^head=4 is out of range for 4 heads; expected an int in '
     r'\[0, 4\)'),
    (-1, ValueError, r'^head=-1 is out of range'),
], ids=['float', 'bool', 'str', 'too-large', 'negative'])
def test_bad_head_index_is_named(head, error, match):
  """#26 item 17: head=1.0 gave numpy's 'only int indices permitted'."""
  splits = ((1, 2), (2, 2))
  with pytest.raises(error, match=match):
    heads_lib.head_path(head, splits)
  variables = jax.eval_shape(lambda: _init(collab_jax.HeadTree(
      models.get_stages('tiny_resnet', 10), splits)))
  with pytest.raises(error, match=match):
    collab_jax.export_head(variables, splits, head)


def test_numpy_head_index_is_accepted():
  assert heads_lib.head_path(np.int64(3), ((1, 2), (2, 2))) == (1, 1)
  assert heads_lib.head_path(0, ()) == ()


def _tree_variables(splits=((1, 2),)):
  return jax.eval_shape(lambda: _init(collab_jax.HeadTree(
      models.get_stages('tiny_resnet', 10), splits)))


@pytest.mark.parametrize('variables,error,match', [
    ({}, ValueError, r"^variables=\{\} is empty; expected the tree's "
     r"variables, e.g. \{'params': \.\.\., 'batch_stats': \.\.\.\}"),
    (lambda: _tree_variables()['params'], ValueError,
     r'^variables has the keys level_1, trunk of one collection; expected '
     r".*: pass \{'params': params\} \(and the other collections\), not "
     r'params alone\.$'),
    (lambda: jax.eval_shape(lambda: _init(collab_jax.StageNetwork(
        models.get_stages('tiny_resnet', 10)))), ValueError,
     r"^variables\['(params|batch_stats)'\] has keys stage_0, stage_1, "
     r"stage_2, not those of a HeadTree \(trunk, level_1, \.\.\.\); a "
     r"StageNetwork's variables need no export"),
    ([1, 2], TypeError, r'^variables has type list'),
    ({'params': np.zeros(3)}, TypeError,
     r"^variables\['params'\] has type ndarray; expected a dict of the "
     r"tree's modules"),
], ids=['empty', 'params-alone', 'stage-network', 'list', 'array'])
def test_bad_variables_are_named(variables, error, match):
  """#26 item 18: export_head({}) returned {}; the others gave a confusing
  message or an empty export."""
  if callable(variables):
    variables = variables()
  with pytest.raises(error, match=match):
    collab_jax.export_head(variables, ((1, 2),) if variables else ())


@pytest.mark.parametrize('num_classes,error,match', [
    (0, ValueError, r'^num_classes=0 must be >= 1\.$'),
    (10.0, TypeError, r'^num_classes=10.0 has type float; expected an int'),
    (True, TypeError, r'^num_classes=True has type bool'),
])
def test_bad_class_count_is_named(num_classes, error, match):
  with pytest.raises(error, match=match):
    models.get_stages('tiny_resnet', num_classes)
  assert len(models.get_stages('tiny_resnet', np.int64(3))) == 3
