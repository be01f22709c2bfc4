"""Small image datasets in host memory: Fashion-MNIST's IDX files, small tfds datasets.

Small image datasets (Fashion-MNIST, CIFAR-10/100) live in host memory as
uint8 arrays (`load_dataset`). The batch for a step is a pure function of
`(seed, step)` (`order`), so resuming from a checkpoint needs no iterator
state, and augmentation (`augment`) runs on the device inside the jitted
train step. ImageNet is streamed instead (`imagenet`).
"""

import dataclasses

import numpy as np

from collab_jax import errors
from collab_jax.data import idx
from collab_jax.data import subset
from collab_jax.data import tfds_io

TFDS_DATASETS = ('fashion_mnist', 'cifar10', 'cifar100')

KNOWN_DATASETS = ('fashion_mnist_local',) + TFDS_DATASETS


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory image classification dataset.

  Attributes:
    train_images: uint8 [N, H, W, C].
    train_labels: int32 [N].
    test_images: uint8 [M, H, W, C] (always the whole test set).
    test_labels: int32 [M].
    num_classes: number of classes.
    mean: per-channel mean of the training images, in [0, 1] pixel units.
    std: per-channel standard deviation, in [0, 1] pixel units.
    name: the name given to `load_dataset`.
  """
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  name: str

  @property
  def num_train(self) -> int:
    return int(self.train_images.shape[0])

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train_images.shape[1:])


def load_dataset(name, *, data_dir=None, train_subset=0, subset_seed=0):
  """Loads a small image dataset into host memory.

  Args:
    name: one of `KNOWN_DATASETS`: 'fashion_mnist_local' (the original IDX
      files, e.g. Debian's dataset-fashion-mnist; no network needed) or a tfds
      name ('fashion_mnist', 'cifar10', 'cifar100') that must already be
      prepared in `data_dir` (nothing is downloaded).
    data_dir: for 'fashion_mnist_local' the folder with the IDX files (.gz or
      uncompressed; default `idx.FASHION_MNIST_DIR`); for tfds names the tfds data
      dir (default: tfds's own default, ~/tensorflow_datasets).
    train_subset: if > 0, keep only this many training examples: a fixed,
      class-balanced random subset chosen by `subset_seed`. The test set is
      always whole.
    subset_seed: seed of the subset choice.

  Returns:
    A `Dataset`. `mean` and `std` are computed from the full training set
    (before any subset is taken), so a subset run normalises like a full one.

  Raises:
    errors.DatasetError: with a one-line message naming the problem and the fix.
  """
  if name == 'fashion_mnist_local':
    arrays = idx.load_fashion_mnist(data_dir or idx.FASHION_MNIST_DIR)
    num_classes = 10
  elif name in TFDS_DATASETS:
    arrays, num_classes = tfds_io.load_arrays(name, data_dir)
  else:
    raise errors.DatasetError(
        f'unknown dataset {name!r}: use one of {", ".join(KNOWN_DATASETS)}.')
  train_images, train_labels, test_images, test_labels = arrays
  mean, std = _channel_stats(train_images)
  if train_subset:
    keep = subset.balanced_subset(train_labels, train_subset, seed=subset_seed)
    train_images, train_labels = train_images[keep], train_labels[keep]
  return Dataset(
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=num_classes,
      mean=mean,
      std=std,
      name=name)


def _channel_stats(images):
  """Exact per-channel mean and std in [0, 1] units, via 256-bin histograms."""
  values = np.arange(256, dtype=np.float64) / 255.0
  flat = images.reshape(-1, images.shape[-1])
  mean, std = [], []
  for c in range(flat.shape[1]):
    hist = np.bincount(flat[:, c], minlength=256).astype(np.float64)
    hist /= hist.sum()
    m = float(hist @ values)
    mean.append(m)
    std.append(float(np.sqrt(hist @ (values - m) ** 2)))
  return tuple(mean), tuple(std)


def eval_batches(images, labels, batch_size):
  """Fixed-size batches over an in-memory evaluation set.

  Args:
    images: [N, ...] array.
    labels: [N] array.
    batch_size: examples per batch.

  Yields:
    dicts with 'image' [batch_size, ...], 'label' int32 [batch_size] and
    'mask' float32 [batch_size] (1 for real examples, 0 for the zero padding
    of the last batch), so every batch has the same shape and the jitted eval
    step compiles once. Weight metrics by 'mask'.
  """
  n = images.shape[0]
  for start in range(0, n, batch_size):
    image = images[start:start + batch_size]
    label = np.asarray(labels[start:start + batch_size], np.int32)
    real = image.shape[0]
    mask = np.ones(batch_size, np.float32)
    if real < batch_size:
      pad = batch_size - real
      image = np.concatenate(
          [image, np.zeros((pad,) + image.shape[1:], image.dtype)])
      label = np.concatenate([label, np.zeros(pad, np.int32)])
      mask[real:] = 0
    yield {'image': image, 'label': label, 'mask': mask}
