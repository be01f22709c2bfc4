"""Every config in configs/, with every argument of a family, loads and builds its model."""

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

from collab_jax import paper
from collab_jax.trainer import config_lib
from collab_jax.trainer import methods
from collab_jax.trainer import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000,
               'fashion_mnist_local': 10, 'fashion_mnist': 10}


def _module(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _family(name):
  return _module(os.path.join(REPO, 'configs', f'{name}.py'))


def _cases():
  """(file, argument or None) for every file and every argument of a family."""
  cases = []
  for path in CONFIGS:
    arguments = getattr(_module(path), 'ARGUMENTS', None)
    cases += [(path, a) for a in arguments] if arguments else [(path, None)]
  return cases


CASES = _cases()


def test_every_paper_table_row_is_an_argument():
  cifar10 = set(_family('cifar10').ARGUMENTS)
  for net in ('resnet32', 'resnet110', 'densenet40'):
    assert {f'{net},{row}' for row in paper.TABLE1.rows} <= cifar10     # Table 1
  assert {f'resnet32,h4_simple_{m}' for m in paper.TABLE3.rows} <= cifar10  # Table 3
  assert {'single', 'h2_alternating', 'h2_instances_t1', 'h2_instances'} <= set(
      _family('cifar100').ARGUMENTS)                                    # Table 2
  assert set(_family('imagenet').ARGUMENTS) == set(paper.TABLE4.rows)  # Table 4
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  # The files users run by name (README, DESIGN.md) stay.
  assert {'default', 'imagenet_resnet50_h4'} <= names


def test_a_familys_docstring_quotes_the_papers_numbers_for_each_argument():
  # The docstrings copy each row's numbers from collab_jax/paper.py (the one
  # table of the paper's numbers): the line that starts with the row's name
  # holds them.
  for name in ('cifar10', 'cifar100', 'imagenet'):
    family = _family(name)
    lines = family.__doc__.splitlines()
    assert f'python -m collab_jax.main --config=configs/{name}.py:' in family.__doc__
    assert 'Expected runtime' in family.__doc__
    for arg in family.ARGUMENTS:
      row = arg.split(',')[-1]
      matching = [l for l in lines if l.startswith(f'  {row} ')]
      assert len(matching) == 1, (name, row)
      _, text = family.paper_row(arg)
      for number in text.split(' / ') if text else ['not in the paper']:
        assert number in matching[0], (name, arg, number, matching[0])
  for row, cells in paper.TABLE4.rows.items():  # time and memory too
    line = next(l for l in _family('imagenet').__doc__.splitlines()
                if l.startswith(f'  {row} '))
    assert all(c in line for c in cells), line


def test_unknown_family_arguments_are_refused():
  for name, arg in (('cifar10', 'resnet110,h4_simple_none'), ('cifar100', 'bogus'),
                    ('imagenet', 'h4')):
    with pytest.raises(ValueError, match=f'configs/{name}.py: unknown'):
      _family(name).get_config(arg)


def test_alias_files_are_their_family_argument():
  alias = _module(os.path.join(REPO, 'configs', 'imagenet_resnet50_h4.py'))
  assert alias.get_config() == _family('imagenet').get_config('h4_hierarchical')
  assert 'configs/imagenet.py:h4_hierarchical' in alias.__doc__


@pytest.mark.parametrize('path,arg', CASES, ids=[
    os.path.basename(p)[:-3] + (f':{a}' if a else '') for p, a in CASES])
def test_config_loads_and_builds(path, arg):
  module = _module(path)
  config = module.get_config(arg) if arg else module.get_config()
  assert module.__doc__ and 'python -m collab_jax.main --config=configs/' in module.__doc__
  config_lib.check(config)
  model = steps.create_model(config, NUM_CLASSES[config.dataset])
  method = methods.create(config, model.num_heads)
  steps.create_optimizer(config, steps.create_learning_rate_fn(config, 100), method)
  size = config.image_size if config.dataset == 'imagenet2012' else (
      28 if 'fashion' in config.dataset else 32)
  channels = 1 if 'fashion' in config.dataset else 3
  x = jax.ShapeDtypeStruct((8, size, size, channels), jnp.float32)
  # One trace: init runs the forward pass and returns its output too.
  logits, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.key(0), x), x)
  assert variables['params']
  assert logits.shape == (model.num_heads, 8, NUM_CLASSES[config.dataset])
