"""The README's code snippets run as written."""

import os
import re

import jax
import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'README.md')


def _snippets():
  with open(README) as f:
    text = f.read()
  return dict(re.findall(
      r'<!-- readme-snippet: (\S+) -->\n```python\n(.*?)```', text, re.S))


def test_snippets_present():
  assert set(_snippets()) == {'plain-jax', 'head-tree', 'nnx'}


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
