"""Every config in configs/ loads and builds its model (no training)."""

import glob
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from collab_jax.trainer import config_lib
from collab_jax.trainer import methods
from collab_jax.trainer import steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000,
               'fashion_mnist_local': 10, 'fashion_mnist': 10}


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_every_table_row_has_a_config():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  rows = ['single', 'label_smoothing', 'h2_instances', 'h4_instances', 'h2_simple',
          'h4_hierarchical']
  for net in ('resnet32', 'resnet110', 'densenet40'):
    assert {f'cifar10_{net}_{r}' for r in rows} <= names           # Table 1
  assert {'cifar100_resnet32_single', 'cifar100_resnet32_h2_alternating',
          'cifar100_resnet32_h2_instances_t1', 'cifar100_resnet32_h2_instances'} <= names
  assert {f'cifar10_resnet32_h4_simple_{m}' for m in ('backprop', 'none', 'loss')} <= names
  assert {f'imagenet_resnet50_{r}' for r in ('single', 'label_smoothing', 'distillation',
                                             'h2_instances', 'h2_simple', 'h4')} <= names
  assert 'default' in names


def test_configs_are_what_make_configs_writes():
  # The paper's numbers in the docstrings come from collab_jax/paper.py.
  sys.path.insert(0, os.path.join(REPO, 'experiments'))
  import make_configs  # pylint: disable=g-import-not-at-top
  assert make_configs.CONFIGS
  for config in make_configs.CONFIGS:
    with open(os.path.join(REPO, 'configs', f'{config.name}.py')) as f:
      assert f.read() == make_configs.render(config), (
          f'configs/{config.name}.py is stale: run python experiments/make_configs.py')


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_config_loads_and_builds(path):
  config = _load(path)
  with open(path) as f:
    doc = f.read()
  assert doc.startswith('"""')
  assert 'python -m collab_jax.main --config=configs/' in doc
  config_lib.check(config)
  model = steps.create_model(config, NUM_CLASSES[config.dataset])
  method = methods.create(config, model.num_heads)
  steps.create_optimizer(config, steps.create_learning_rate_fn(config, 100), method)
  size = config.image_size if config.dataset == 'imagenet2012' else (
      28 if 'fashion' in config.dataset else 32)
  channels = 1 if 'fashion' in config.dataset else 3
  x = jax.ShapeDtypeStruct((8, size, size, channels), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (model.num_heads, 8, NUM_CLASSES[config.dataset])
