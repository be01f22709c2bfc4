"""The README's code snippets run as written."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax import losses
from collab_jax.data import streams
from collab_jax.trainer import steps
from collab_jax.trainer import train
import testutil

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'README.md')


def _snippets():
  with open(README) as f:
    text = f.read()
  return dict(re.findall(
      r'<!-- readme-snippet: (\S+) -->\n```python\n(.*?)```', text, re.S))


def test_snippets_present():
  assert set(_snippets()) == {'plain-jax', 'head-tree', 'nnx', 'new-method'}


@pytest.mark.parametrize('name', ['plain-jax', 'head-tree', 'nnx'])
def test_snippet_runs(name):
  namespace = {}
  # As a user runs them: with XLA's optimisations, which conftest turns off
  # for speed (the snippets compare two programs' outputs bit for bit).
  fast = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    exec(compile(_snippets()[name], f'README:{name}', 'exec'), namespace)  # pylint: disable=exec-used
  finally:
    jax.config.update('jax_disable_most_optimizations', fast)
  if name in ('plain-jax', 'nnx'):
    assert namespace['loss'] < 0.7 * namespace['first_loss']


def test_new_method_snippet_registers_and_trains(tmp_path):
  """The README's method, through the public registry: 3 steps of its own loss."""
  namespace = {}
  exec(compile(_snippets()['new-method'], 'README:new-method', 'exec'), namespace)  # pylint: disable=exec-used
  config = namespace['get_config']()
  testutil.fake_fashion_mnist(str(tmp_path / 'data'), num_train=64, num_test=16,
                              shape=(8, 8))
  tiny = testutil.tiny_config(str(tmp_path / 'data'), num_train_steps=3,
                              log_every_steps=1, augment=False)
  # Tiny sizes; its method and a 4-head tree (with 2 heads the other heads'
  # mean probability is the other head's own, the collaborative target).
  tiny.model.splits = ((1, 2), (2, 2))
  config.model.kwargs = tiny.model.kwargs  # tiny_resnet's own (no width)
  config.update(tiny.to_dict(), method=config.method)
  assert config.method == 'prob_consensus'
  built = train.build(config)
  assert type(built.method).__name__ == 'ProbConsensus'
  # The first step's logged terms are this method's loss of the initial
  # network on the first batch, not the collaborative loss.
  state = steps.create_train_state(streams.init_key(config.seed), built.model,
                                   built.data.image_shape, built.tx)
  batch = next(built.data.train_iter(0))
  images = built.data.preprocess(None, jnp.asarray(batch['image']), train=True)
  logits, _ = built.model.apply(
      {'params': state.params, 'batch_stats': state.batch_stats}, images,
      train=True, mutable=['batch_stats'])
  want = built.method.loss_terms(logits, jnp.asarray(batch['label']))
  plain = losses.collaborative_head_losses(logits, jnp.asarray(batch['label']))
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['steps'] == 3 and results['heads'] == 4
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    first = json.loads(f.readline())
  assert first['step'] == 1
  for h in range(4):
    np.testing.assert_allclose(first[f'head_{h + 1}/soft'], want['soft'][h], rtol=1e-5)
    np.testing.assert_allclose(first[f'head_{h + 1}/hard'], want['hard'][h], rtol=1e-5)
  gap = np.abs(np.asarray(plain['soft']) - np.asarray(want['soft']))
  assert gap.max() > 100 * 1e-5 * np.abs(want['soft']).max(), gap
