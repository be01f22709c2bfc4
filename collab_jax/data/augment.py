"""On-device augmentation and normalisation: they run inside the jitted step."""

import dataclasses
from typing import Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """uint8 images -> augmented (train) and normalised float images.

  Built once per run by the data source (its statistics, the config's
  augmentation settings); the steps call it. Images cross to the device as
  uint8 (a quarter of float32's bytes) and are normalised here; ImageNet's
  arrive already cropped on the host (its configs set `augment=False`).
  Float images are taken as normalised by the caller and pass through.
  """
  mean: Tuple[float, ...]
  std: Tuple[float, ...]
  augment: bool = True
  pad: int = 4
  flip: bool = True

  def __call__(self, rng, images, train):
    if images.dtype != jnp.uint8:  # normalised by the caller
      return images.astype(jnp.float32)
    if train and self.augment:
      images = augment(rng, images, pad=self.pad, flip=self.flip)
    return normalize(images, self.mean, self.std)


def augment(rng, images, *, pad=4, flip=True):
  """Random translation by up to `pad` pixels and random horizontal flip.

  The standard CIFAR augmentation (He et al. 2016): zero-pad each side by
  `pad`, crop a random window of the original size, flip left-right with
  probability 1/2; independently per example. Zero padding (black pixels,
  before normalisation) matches `torchvision.transforms.RandomCrop(32, 4)`
  that most reference numbers use. The crop is a per-example `dynamic_slice`
  under `vmap`, so the batch axis stays a batch axis and the function runs
  on a batch sharded across devices without moving data.

  Args:
    rng: a `jax.random.key`; the result is a function of it and `images`.
    images: [B, H, W, C] array, any dtype (uint8 from the host).
    pad: maximum shift in pixels; 0 disables the crop.
    flip: whether to flip horizontally at random.

  Returns:
    An array like `images` (same shape and dtype).
  """
  b, h, w, c = images.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if pad:
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * pad + 1)
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda img, off: jax.lax.dynamic_slice(
        img, (off[0], off[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_rng, 0.5, (b,))
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)
  return images


def normalize(images, mean, std, dtype=jnp.float32):
  """`(images / 255 - mean) / std` per channel, computed in float32.

  Args:
    images: [..., C] pixel values in [0, 255] (uint8 or float).
    mean: per-channel mean in [0, 1] units (e.g. `Dataset.mean`).
    std: per-channel standard deviation in [0, 1] units.
    dtype: the output dtype (e.g. bfloat16 for mixed precision).

  Returns:
    The normalised images in `dtype`.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  x = images.astype(jnp.float32) * (1.0 / 255.0)
  return ((x - mean) / std).astype(dtype)
