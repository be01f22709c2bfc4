"""2-D convolution on CPU through oneDNN: a `jax.ffi` custom call (a spike).

XLA:CPU (jaxlib 0.12) runs the weight gradient of a small-channel 3x3
convolution 1.5-3.4x slower than its forward convolution, and its own
oneDNN path (`xla_cpu_use_onednn` + `xla_cpu_experimental_onednn_custom_call`)
lowers that gradient as a *forward* convolution whose kernel is the
activations (README, "Performance"). Here the three pieces of a convolution
call oneDNN's own primitives (forward, backward data, backward weights) under
a `jax.custom_vjp`, on NHWC activations and HWIO weights.

Opt-in and CPU-only: the C++ source is `csrc/onednn_conv.cc`, built by
`make onednn` into `collab_jax/models/_onednn_conv.so` against the `onednn`
extra (oneDNN 3.2 from PyPI; `$COLLAB_ONEDNN_LIB` names another build).
Without it, `available()` is False and `conv_general_dilated` is `lax`'s.
Nothing in the training path uses this module: it did not bring the step
within 1.2x of PyTorch's (README, "Performance", has what it measured);
`layers.conv_implementation` opens it for the benchmark and the tests.
"""

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

_TARGETS = {'fwd': 'CollabOnednnConvFwd',
            'bwd_data': 'CollabOnednnConvBwdData',
            'bwd_w': 'CollabOnednnConvBwdWeights'}
_PREFIX = 'collab_onednn_conv_'
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def library_path():
  """Where the built extension is looked for."""
  return os.environ.get('COLLAB_ONEDNN_LIB') or os.path.join(
      os.path.dirname(os.path.abspath(__file__)), '_onednn_conv.so')


@functools.lru_cache(maxsize=None)
def _library():
  """The loaded extension with its FFI targets registered, or None."""
  path = library_path()
  if not os.path.exists(path):
    return None
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError:  # e.g. built, but the venv's libdnnl removed since
    return None
  for kind, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(_PREFIX + kind,
                                jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')
  lib.collab_onednn_impl.restype = ctypes.c_char_p
  lib.collab_onednn_impl.argtypes = (ctypes.c_char_p,
                                     ctypes.POINTER(ctypes.c_int64))
  lib.collab_onednn_version.restype = ctypes.c_int
  return lib


def available():
  """Whether the extension is built and loads."""
  return _library() is not None


def version():
  """oneDNN's version as 'major.minor.patch', or None without the extension."""
  lib = _library()
  if lib is None:
    return None
  v = lib.collab_onednn_version()
  return f'{v // 10000}.{v // 100 % 100}.{v % 100}'


def _attrs(strides, padding):
  (pt, pb), (pl, pr) = padding
  return dict(stride_h=np.int64(strides[0]), stride_w=np.int64(strides[1]),
              pad_top=np.int64(pt), pad_bottom=np.int64(pb),
              pad_left=np.int64(pl), pad_right=np.int64(pr))


def _call(kind, shape, a, b, strides, padding):
  _library()
  return jax.ffi.ffi_call(_PREFIX + kind,
                          jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method='sequential')(
                              a, b, **_attrs(strides, padding))


def _out_shape(x_shape, w_shape, strides, padding):
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1,
          (w + pl + pr - kw) // strides[1] + 1, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, w, strides, padding):
  """NHWC x HWIO -> NHWC float32 convolution by oneDNN (forward and VJP).

  Args:
    x: [N, H, W, C] float32.
    w: [KH, KW, C, O] float32.
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)).
  """
  return _call('fwd', _out_shape(x.shape, w.shape, strides, padding), x, w,
               strides, padding)


def _conv_fwd(x, w, strides, padding):
  return conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, res, dy):
  x, w = res
  dx = _call('bwd_data', x.shape, dy, w, strides, padding)
  dw = _call('bwd_w', w.shape, x, dy, strides, padding)
  return dx, dw


conv.defvjp(_conv_fwd, _conv_bwd)


def _explicit_padding(padding, x_shape, w_shape, strides):
  if isinstance(padding, str):
    return tuple(jax.lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides,
                                         padding))
  return tuple(tuple(p) for p in padding)


def supported(lhs, rhs, *, lhs_dilation=None, rhs_dilation=None,
              dimension_numbers=None, feature_group_count=1,
              batch_group_count=1):
  """Whether `conv_general_dilated` with these arguments goes to oneDNN."""
  dn = dimension_numbers
  if isinstance(dn, jax.lax.ConvDimensionNumbers):
    nhwc = dn == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  else:
    nhwc = dn is not None and tuple(dn) == _NHWC
  return (available() and nhwc and lhs.ndim == 4 and
          lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and
          all(d == 1 for d in (lhs_dilation or (1, 1))) and
          all(d == 1 for d in (rhs_dilation or (1, 1))) and
          feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, through oneDNN where `supported` says so.

  A drop-in for flax's `nn.Conv(conv_general_dilated=...)`. Only for CPU
  programs: the custom call has no GPU or TPU implementation.
  """
  if not supported(lhs, rhs, lhs_dilation=lhs_dilation,
                   rhs_dilation=rhs_dilation,
                   dimension_numbers=dimension_numbers,
                   feature_group_count=feature_group_count,
                   batch_group_count=batch_group_count):
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  pads = _explicit_padding(padding, lhs.shape, rhs.shape, strides)
  return conv(lhs, rhs, strides, pads)


def implementation(kind, x_shape, w_shape, strides=(1, 1),
                   padding=((1, 1), (1, 1))):
  """The oneDNN implementation chosen for one piece ('fwd', 'bwd_data',
  'bwd_w'), e.g. 'brg_conv_fwd:avx512_core'; None without the extension."""
  lib = _library()
  if lib is None:
    return None
  n, oh, ow, o = _out_shape(x_shape, w_shape, strides, padding)
  (pt, pb), (pl, pr) = padding
  v = (n, x_shape[1], x_shape[2], x_shape[3], w_shape[0], w_shape[1], o, oh,
       ow, strides[0], strides[1], pt, pb, pl, pr)
  return lib.collab_onednn_impl(kind.encode(),
                                (ctypes.c_int64 * 15)(*v)).decode()
