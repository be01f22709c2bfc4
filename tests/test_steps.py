"""The step builders: learning-rate schedules, and the config reaching the step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collab_jax.trainer import parallel
from collab_jax.trainer import steps
import test_methods
import testutil

data_dir = test_methods.data_dir  # the module-scoped fixture


@pytest.mark.parametrize('warmup_epochs', [0.0, 1.5, 7.0])
@pytest.mark.parametrize('schedule', ['cosine', 'step', 'constant'])
def test_learning_rate_schedule_matches_closed_form(schedule, warmup_epochs):
  """optax's warm-up, cosine and piecewise schedules give the recipes' formulas."""
  base, per_epoch, total = 0.4, 10, 60
  config = testutil.tiny_config(
      '', lr_schedule=schedule, warmup_epochs=warmup_epochs, num_epochs=6.0,
      num_train_steps=-1, lr_decay_epochs=(2.0, 4.0), lr_decay_factor=0.1,
      learning_rate=base)
  warm = int(round(warmup_epochs * per_epoch))
  fn = steps.create_learning_rate_fn(config, per_epoch)

  def want(s):
    if schedule == 'step':  # decay epochs count from step 0; ramp from base/warm
      if s < warm:
        return base / warm + (base - base / warm) * s / warm
      return base * 0.1 ** sum(s >= e * per_epoch for e in (2, 4))
    if s < warm:
      return base * s / warm
    if schedule == 'constant':
      return base
    length = max(total - warm, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(s - warm, length) / length))

  got = [float(fn(s)) for s in range(total + 5)]
  np.testing.assert_allclose(got, [want(s) for s in range(total + 5)],
                             rtol=1e-6, atol=1e-7)


def test_loss_rescale_ablation_reaches_the_step_from_the_config(data_dir):
  """model.rescale='loss' divides the summed loss by H inside train_step."""
  losses = {}
  for mode in ('none', 'loss'):
    config = testutil.tiny_config(data_dir, augment=False,
                                  **{'model.rescale': mode})
    built, state, batch = test_methods._setup(config)  # pylint: disable=protected-access
    _, metrics = jax.jit(test_methods._step(built))(state, batch)  # pylint: disable=protected-access
    losses[mode] = float(metrics['loss'][0])
  assert losses['loss'] == pytest.approx(losses['none'] / 2, rel=1e-6)


def test_cpu_only_choices_are_not_applied_on_gpu_or_tpu():
  """Barriers and XLA:CPU options on CPU only; 'auto' per platform."""
  cpu = steps.backend_choices('cpu')
  assert cpu['compiler_options'] and cpu['barriers']
  assert (cpu['dtype'], cpu['branch_impl']) == ('float32', 'loop')
  for platform in ('gpu', 'tpu'):
    choices = steps.backend_choices(platform)
    assert choices['compiler_options'] == {} and not choices['barriers']
    assert choices['dtype'] == 'bfloat16'
  config = testutil.tiny_config('', **{'model.dtype': 'auto',
                                       'model.branch_impl': 'auto'})
  assert steps.create_model(config, 10, 'gpu').stages[0].keywords['dtype'] == jnp.bfloat16
  assert steps.create_model(config, 10, 'cpu').stages[0].keywords['dtype'] == jnp.float32
  assert steps.create_model(config, 10).branch_impl == 'loop'


def test_barriers_are_traced_only_when_asked(data_dir):
  """The step's program holds optimisation barriers on CPU, none otherwise."""
  config = testutil.tiny_config(data_dir, augment=False)
  built, state, batch = test_methods._setup(config)  # pylint: disable=protected-access
  placement = parallel.data_parallel(jax.devices()[:1])
  texts = {}
  for barriers in (True, False):
    step = steps.make_train_step(
        placement, model=built.model, tx=built.tx, method=built.method,
        preprocess=built.data.preprocess, seed=0, barriers=barriers)
    texts[barriers] = step.lower(state, batch, {}).as_text()
  assert 'optimization_barrier' in texts[True]
  assert 'optimization_barrier' not in texts[False]
  default = steps.make_train_step(
      placement, model=built.model, tx=built.tx, method=built.method,
      preprocess=built.data.preprocess, seed=0)
  assert 'optimization_barrier' in default.lower(state, batch, {}).as_text()  # CPU
