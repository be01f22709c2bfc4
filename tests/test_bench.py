"""The benchmark runs end to end (tiny settings), and its options keep the maths.

No timing assertions: timings on shared CI machines mean nothing.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collab_jax
from collab_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import bench  # noqa: E402


def test_quick_bench_writes_every_section(tmp_path):
  result = bench.main(['--quick', f'--out={tmp_path}'])
  with open(tmp_path / 'bench.json') as f:
    saved = json.load(f)
  report = (tmp_path / 'bench.md').read_text()
  for section in ('CIFAR ResNet-32', 'ImageNet-shaped ResNet-50'):
    rows = saved['graphs'][section]['rows']
    assert [r['graph'] for r in rows] == ['single', 'h4_hierarchical']
    assert rows[0]['time_ratio'] == 1.0 and rows[1]['heads'] == 4
    assert rows[1]['flop_ratio'] > 1.0  # four heads cost more than one
    assert rows[1]['bytes_ratio'] > 1.0 and 'bytes ratio' in report
    assert section in report
  assert {r['branch_impl'] for r in saved['impl']} == {'loop', 'vmap'}
  assert saved['pipeline']['host']['images_per_s'] > 0
  assert {r['variant'] for r in saved['options']} >= {'float32', 'bfloat16', 'remat'}
  assert saved['goals'] and '## Goals' in report
  if bench.torch_reference.torch_available():
    assert {r['memory_format'] for r in saved['torch']} == {'channels_last', 'nchw'}
  assert result['total_s'] > 0


@pytest.mark.parametrize('impl', ['loop', 'vmap'])
def test_remat_keeps_variables_outputs_and_gradients(impl):
  stages = models.get_stages('tiny_resnet', 10)
  splits = ((1, 2), (2, 2))
  plain = collab_jax.HeadTree(stages, splits, branch_impl=impl)
  remat = collab_jax.HeadTree(stages, splits, branch_impl=impl, remat=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)
  variables = plain.init(jax.random.key(0), x)
  assert (jax.tree.structure(remat.init(jax.random.key(0), x)) ==
          jax.tree.structure(variables))
  labels = jnp.arange(4)

  def loss_and_grads(tree):
    def loss_fn(params):
      logits, new = tree.apply({'params': params,
                                'batch_stats': variables['batch_stats']},
                               x, train=True, mutable=['batch_stats'])
      return collab_jax.collaborative_loss(logits, labels), new
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])

  (loss_a, new_a), grads_a = loss_and_grads(plain)
  (loss_b, new_b), grads_b = loss_and_grads(remat)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-6)
  for a, b in zip(jax.tree.leaves((grads_a, new_a)), jax.tree.leaves((grads_b, new_b))):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_residual_barriers_keep_the_maths_under_the_recommended_options():
  """`models.compiler_options` keeps XLA:CPU's barriers; results are unchanged."""
  stages = models.get_stages('tiny_resnet', 10)
  tree = collab_jax.HeadTree(stages, ((1, 2),))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 12, 12, 3)), jnp.float32)
  variables = tree.init(jax.random.key(0), x)

  def loss_fn(params):
    logits, _ = tree.apply({'params': params, 'batch_stats': variables['batch_stats']},
                           x, train=True, mutable=['batch_stats'])
    return collab_jax.collaborative_loss(logits, jnp.arange(4))

  grad = jax.value_and_grad(loss_fn)
  options = models.compiler_options('cpu')
  assert options  # on CPU the barriers need them
  kept = jax.jit(grad).lower(variables['params']).compile(compiler_options=options)
  assert 'opt-barrier' in kept.as_text()
  want = jax.jit(grad)(variables['params'])
  got = kept(variables['params'])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  assert models.compiler_options('gpu') == {}
