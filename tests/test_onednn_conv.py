"""The oneDNN convolution custom call (collab_jax/models/onednn_conv.py).

Values and gradients against XLA's convolution to float tolerance. Tests that
need the built extension (`make onednn`) skip without it; the fallback and the
layer hook are tested always.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import collab_jax
from collab_jax import models
from collab_jax.models import layers
from collab_jax.models import onednn_conv

needs_extension = pytest.mark.skipif(
    not onednn_conv.available(),
    reason='oneDNN extension not built (make onednn)')
DN = ('NHWC', 'HWIO', 'NHWC')


def _random(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape),
                     jnp.float32)


def _xla(x, w, strides, padding):
  return jax.lax.conv_general_dilated(x, w, strides, padding,
                                      dimension_numbers=DN,
                                      precision=jax.lax.Precision.HIGHEST)


def _values_and_grads(conv, x, w, cotangent):
  def loss(x, w):
    return jnp.sum(conv(x, w) * cotangent)
  y = jax.jit(conv)(x, w)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  return y, dx, dw


@needs_extension
@pytest.mark.parametrize('x_shape, w_shape, strides, padding', [
    ((4, 8, 8, 3), (3, 3, 3, 16), (1, 1), 'SAME'),       # CIFAR stem
    ((4, 8, 8, 16), (3, 3, 16, 32), (2, 2), ((1, 1), (1, 1))),  # stage start
    ((3, 7, 9, 8), (3, 3, 8, 8), (2, 2), 'SAME'),         # odd, (0, 1) pads
    ((2, 6, 6, 5), (1, 1, 5, 7), (1, 1), 'VALID'),        # 1x1
    ((2, 9, 9, 4), (5, 3, 4, 6), (1, 2), ((2, 1), (0, 3))),  # uneven
])
def test_values_and_gradients_match_xla(x_shape, w_shape, strides, padding):
  x, w = _random(x_shape, 0), _random(w_shape, 1)
  ours = functools.partial(onednn_conv.conv_general_dilated,
                           window_strides=strides, padding=padding,
                           dimension_numbers=DN)
  want = _values_and_grads(
      functools.partial(_xla, strides=strides, padding=padding), x, w,
      _random(jax.eval_shape(ours, x, w).shape, 2))
  got = _values_and_grads(ours, x, w, _random(want[0].shape, 2))
  for a, b in zip(want, got):
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
  text = jax.jit(ours).lower(x, w).as_text()
  assert 'collab_onednn_conv_fwd' in text


@needs_extension
def test_a_resnet_step_through_onednn_matches_xla():
  """The same head tree, loss and gradients with the hook on and off."""
  stages = models.get_stages('cifar_resnet8', 10)
  tree = collab_jax.HeadTree(stages, ((1, 2),))
  x = _random((8, 16, 16, 3), 3)
  variables = tree.init(jax.random.key(0), x)

  def loss_fn(params):
    logits, _ = tree.apply({'params': params,
                            'batch_stats': variables['batch_stats']},
                           x, train=True, mutable=['batch_stats'])
    return collab_jax.collaborative_loss(logits, jnp.arange(8) % 10)

  def compiled(conv):
    with layers.conv_implementation(conv):
      return jax.jit(jax.value_and_grad(loss_fn)).lower(
          variables['params']).compile(
              compiler_options=models.compiler_options('cpu'))

  xla = compiled(None)
  ours = compiled(onednn_conv.conv_general_dilated)
  assert 'collab_onednn_conv_bwd_w' in ours.as_text()
  assert 'collab_onednn' not in xla.as_text()
  (loss_a, grads_a), (loss_b, grads_b) = (xla(variables['params']),
                                          ours(variables['params']))
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_a), jax.tree.leaves(grads_b)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


@needs_extension
def test_implementation_names_onednn_kernels():
  impl = onednn_conv.implementation('bwd_w', (8, 8, 8, 16), (3, 3, 16, 16))
  assert impl and not impl.startswith('error'), impl
  assert onednn_conv.version().count('.') == 2


def test_unsupported_calls_and_a_missing_extension_fall_back_to_lax(
    monkeypatch):
  x, w = _random((2, 6, 6, 4), 0), _random((3, 3, 4, 4), 1)
  want = _xla(x, w, (1, 1), 'SAME')
  # Dilation is not sent to oneDNN: lax's convolution, same values.
  dilated = onednn_conv.conv_general_dilated(
      x, w, (1, 1), 'SAME', rhs_dilation=(2, 2), dimension_numbers=DN)
  np.testing.assert_allclose(dilated, _xla_dilated(x, w), rtol=1e-6)
  monkeypatch.setattr(onednn_conv, '_library', lambda: None)
  assert not onednn_conv.available() and onednn_conv.version() is None
  got = onednn_conv.conv_general_dilated(x, w, (1, 1), 'SAME',
                                         dimension_numbers=DN)
  assert 'collab_onednn' not in jax.jit(
      lambda x, w: onednn_conv.conv_general_dilated(
          x, w, (1, 1), 'SAME', dimension_numbers=DN)).lower(x, w).as_text()
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _xla_dilated(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', rhs_dilation=(2, 2),
                                      dimension_numbers=DN)


def test_conv_layers_call_the_implementation_in_the_context():
  """layers.conv_implementation swaps the function, not the parameters."""
  calls = []

  def recording(*args, **kwargs):
    calls.append(kwargs.get('dimension_numbers'))
    return jax.lax.conv_general_dilated(*args, **kwargs)

  stages = models.get_stages('tiny_resnet', 10)
  tree = collab_jax.HeadTree(stages, ())
  x = _random((2, 12, 12, 3), 0)
  variables = tree.init(jax.random.key(0), x)
  plain = tree.apply(variables, x)
  assert not calls
  with layers.conv_implementation(recording):
    hooked = tree.apply(variables, x)
    shapes = jax.tree.map(jnp.shape, tree.init(jax.random.key(0), x))
  assert calls and shapes == jax.tree.map(jnp.shape, variables)
  np.testing.assert_allclose(hooked, plain, rtol=1e-6)
  seen = len(calls)
  tree.apply(variables, x)  # the context is gone: no more calls
  assert len(calls) == seen
