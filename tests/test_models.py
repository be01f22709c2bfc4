"""Stage-list networks: parameter counts against the published ones."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax import models
from collab_jax import paper
import collab_jax


def _params(name, num_classes, shape):
  net = collab_jax.StageNetwork(models.get_stages(name, num_classes))
  v = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(v['params']))


@pytest.mark.parametrize('name,millions', [
    # He et al. 2016, Table 6 (CIFAR-10): 0.27M, 0.46M, 0.66M, 0.85M, 1.7M.
    ('cifar_resnet20', 0.27), ('cifar_resnet32', 0.46), ('cifar_resnet44', 0.66),
    ('cifar_resnet56', 0.85), ('cifar_resnet110', 1.7),
    # Huang et al. 2017, Table 2: DenseNet (L=40, k=12) 1.0M.
    ('densenet40_12', 1.0),
])
def test_cifar_parameter_counts(name, millions):
  assert _params(name, 10, (1, 32, 32, 3)) / 1e6 == pytest.approx(millions, abs=0.05)


def test_resnet50_parameter_count():
  # torchvision / He et al. ResNet-50: 25.6M parameters with 1000 classes.
  assert _params('resnet50', 1000, (1, 64, 64, 3)) / 1e6 == pytest.approx(25.6, abs=0.1)


@pytest.mark.parametrize('name,stages', [('cifar_resnet32', 3), ('densenet40_12', 3),
                                         ('resnet50', 4)])
def test_stage_counts_and_paper_splits(name, stages):
  assert len(models.get_stages(name, 10)) == stages
  for graph in ('single', 'h2_instances', 'h4_instances', 'h2_simple', 'h4_hierarchical'):
    collab_jax.validate_splits(models.paper_splits(name, graph), stages)
  assert models.paper_splits('resnet50', 'h4_hierarchical') == ((2, 2), (3, 2))


def test_paper_splits_of_every_graph_and_bad_names():
  assert models.paper_splits('cifar_resnet32', 'h4_simple') == ((1, 4),)
  assert models.paper_splits('tiny_resnet50', 'h2_simple') == ((2, 2),)
  for graph in ('single', 'label_smoothing', 'distillation'):
    assert models.paper_splits('resnet50', graph) == ()
  with pytest.raises(ValueError, match="unknown training graph 'h3'"):
    models.paper_splits('cifar_resnet32', 'h3')
  with pytest.raises(ValueError, match='3 or 4 stages, not 5'):
    paper.splits('h2_simple', 5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  net = collab_jax.HeadTree(models.get_stages('tiny_resnet', 10, dtype=jnp.bfloat16), ((1, 2),))
  v = net.init(jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v['params']))
  assert net.apply(v, jnp.zeros((2, 8, 8, 3))).dtype == jnp.float32


def test_bad_depth():
  with pytest.raises(ValueError, match='6n \\+ 2'):
    models.get_stages('cifar_resnet8', 10, width=0) if False else \
        models.NETWORKS['cifar_resnet8'].func(33, 10)


def test_vit_stages_and_paper_splits():
  # 6 blocks in 3 stages; the CIFAR split table carries over.
  assert len(models.get_stages('vit_tiny', 10)) == 3
  assert models.paper_splits('vit_tiny', 'h4_hierarchical') == ((1, 2), (2, 2))
  # 28x28 in 4x4 patches: 49 tokens of width 64; 0.30M parameters.
  assert _params('vit_tiny', 10, (1, 28, 28, 1)) == 304906
  with pytest.raises(ValueError, match='equal stages'):
    models.get_stages('vit_tiny', 10, depth=7)


def test_vit_training_step_runs_and_learns():
  """A few SGD steps of a 4-head tiny ViT tree on one batch lower the loss."""
  import optax
  tree = collab_jax.HeadTree(models.get_stages('tiny_vit', 3), ((1, 2), (2, 2)))
  x = jax.random.normal(jax.random.key(1), (12, 8, 8, 1))
  labels = jnp.arange(12) % 3
  x = x + labels[:, None, None, None]  # learnable: brightness is the class
  params = tree.init(jax.random.key(0), x)['params']
  tx = optax.sgd(0.3, momentum=0.9)

  @jax.jit
  def step(params, opt_state):
    loss_fn = lambda p: collab_jax.collaborative_loss(
        tree.apply({'params': p}, x, train=True), labels)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(12):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]


def test_vit_trains_in_the_trainer(tmp_path):
  """The trainer runs, checkpoints and exports a network without BatchNorm."""
  import testutil
  from collab_jax.trainer import train
  testutil.fake_fashion_mnist(str(tmp_path / 'data'), num_train=32, num_test=16,
                              shape=(8, 8))
  config = testutil.tiny_config(tmp_path / 'data', num_train_steps=2,
                                log_every_steps=1, checkpoint_every_steps=2)
  config.model.name = 'tiny_vit'
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == 2 and len(results['head_test_errors']) == 2
  assert os.path.isdir(tmp_path / 'run' / 'export' / 'head_1')
