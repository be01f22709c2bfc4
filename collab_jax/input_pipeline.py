"""In-memory image datasets: Fashion-MNIST's IDX files, small tfds datasets.

Two kinds of data feed the trainer (`data.DataSource` joins them):

* Small image datasets (Fashion-MNIST, CIFAR-10/100) live in host memory as
  uint8 arrays (`load_dataset`, here). The batch for a step is a pure
  function of `(seed, step)` (`sampling`), so resuming from a checkpoint
  needs no iterator state, and augmentation (`augment`) runs on the device
  inside the jitted train step.
* ImageNet is streamed from tfds with tf.data (`imagenet`); preprocessing
  happens on the host and resuming skips batches.

TensorFlow is imported only by the tfds paths (`import_tensorflow`), which
also hides the GPUs from it so that it never claims accelerator memory; the
offline default (the local Fashion-MNIST files) runs without it.
"""

import dataclasses
import functools
import gzip
import math
import os

import numpy as np

from collab_jax import streams

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
TFDS_DATASETS = ('fashion_mnist', 'cifar10', 'cifar100')
KNOWN_DATASETS = ('fashion_mnist_local',) + TFDS_DATASETS

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
_FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}


class DatasetError(ValueError):
  """A dataset is missing, corrupt or unknown; the message says the fix."""


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


# ----------------------------------------------------------------------------
# Loading.


def load_dataset(name, *, data_dir=None, train_subset=0, subset_seed=0):
  """Loads a small image dataset into host memory.

  Args:
    name: one of `KNOWN_DATASETS`: 'fashion_mnist_local' (the original IDX
      files, e.g. Debian's dataset-fashion-mnist; no network needed) or a tfds
      name ('fashion_mnist', 'cifar10', 'cifar100') that must already be
      prepared in `data_dir` (nothing is downloaded).
    data_dir: for 'fashion_mnist_local' the folder with the IDX files (.gz or
      uncompressed; default `FASHION_MNIST_DIR`); for tfds names the tfds data
      dir (default: tfds's own default, ~/tensorflow_datasets).
    train_subset: if > 0, keep only this many training examples: a fixed,
      class-balanced random subset chosen by `subset_seed`. The test set is
      always whole.
    subset_seed: seed of the subset choice.

  Returns:
    A `Dataset`. `mean` and `std` are computed from the full training set
    (before any subset is taken), so a subset run normalises like a full one.

  Raises:
    DatasetError: with a one-line message naming the problem and the fix.
  """
  if name == 'fashion_mnist_local':
    arrays = _load_fashion_mnist_local(data_dir or FASHION_MNIST_DIR)
    num_classes = 10
  elif name in TFDS_DATASETS:
    arrays, num_classes = _load_tfds(name, data_dir)
  else:
    raise DatasetError(
        f'unknown dataset {name!r}: use one of {", ".join(KNOWN_DATASETS)}.')
  train_images, train_labels, test_images, test_labels = arrays
  mean, std = _channel_stats(train_images)
  if train_subset:
    keep = balanced_subset(train_labels, train_subset, seed=subset_seed)
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


def read_idx(path, *, magic):
  """Reads one uint8 IDX file (plain or .gz) into a numpy array.

  Args:
    path: the file.
    magic: the expected magic number: 2051 for images (3 dims), 2049 for
      labels (1 dim).

  Returns:
    A uint8 array with the shape stored in the header.

  Raises:
    DatasetError: unreadable file, bad magic number, truncated or oversized
      data.
  """
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        data = f.read()
    else:
      with open(path, 'rb') as f:
        data = f.read()
  except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError.
    raise DatasetError(
        f'cannot read IDX file {path} ({e}): the file is corrupt, reinstall it '
        '(`sudo apt-get install --reinstall dataset-fashion-mnist`).') from e
  fix = ('the file is corrupt, reinstall it '
         '(`sudo apt-get install --reinstall dataset-fashion-mnist`).')
  if len(data) < 4:
    raise DatasetError(f'IDX file {path} is truncated ({len(data)} bytes): '
                       f'{fix}')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    raise DatasetError(
        f'IDX file {path} has magic number {found}, expected {magic}: {fix}')
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DatasetError(f'IDX file {path} is truncated inside its header: '
                       f'{fix}')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, offset=4))
  size = math.prod(shape)
  if len(data) - header != size:
    what = ('truncated' if len(data) - header < size
            else 'longer than its header says')
    raise DatasetError(
        f'IDX file {path} is {what} ({len(data) - header} data bytes for shape '
        f'{shape}): {fix}')
  return np.frombuffer(data, np.uint8, size, offset=header).reshape(shape)


def _load_fashion_mnist_local(data_dir):
  """Reads the four Fashion-MNIST IDX files of `data_dir`."""
  hint = ('run `sudo apt-get install dataset-fashion-mnist` or set '
          '--config.data_dir to the folder holding them')
  if not os.path.isdir(data_dir):
    raise DatasetError(
        f'Fashion-MNIST IDX files not found in {data_dir} (no such directory): '
        f'{hint}.')
  paths, missing = {}, []
  for key, base in _FASHION_MNIST_FILES.items():
    candidates = [os.path.join(data_dir, base + ext) for ext in ('', '.gz')]
    found = [p for p in candidates if os.path.isfile(p)]
    if found:
      paths[key] = found[0]
    else:
      missing.append(base + '[.gz]')
  if missing:
    raise DatasetError(
        f'Fashion-MNIST IDX files not found in {data_dir} (missing '
        f'{", ".join(missing)}): {hint}.')
  out = []
  for split in ('train', 'test'):
    images = read_idx(paths[f'{split}_images'], magic=_IDX_IMAGES_MAGIC)
    labels = read_idx(paths[f'{split}_labels'], magic=_IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
      raise DatasetError(
          f'Fashion-MNIST {split} files in {data_dir} disagree: '
          f'{images.shape[0]} images but {labels.shape[0]} labels: reinstall '
          'them (`sudo apt-get install --reinstall dataset-fashion-mnist`).')
    if labels.size and labels.max() >= 10:
      raise DatasetError(
          f'Fashion-MNIST {split} labels in {data_dir} go up to '
          f'{labels.max()}, expected 0..9: reinstall them '
          '(`sudo apt-get install --reinstall dataset-fashion-mnist`).')
    out += [images[..., None], labels.astype(np.int32)]
  return tuple(out)


def _load_tfds(name, data_dir):
  """Loads both splits of a prepared tfds dataset as uint8/int32 arrays."""
  tf, tfds = import_tensorflow(), import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  out = []
  for split in ('train', 'test'):
    try:
      ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data in ...".
      raise DatasetError(not_prepared_message(name, builder)) from e
    # Chunks rather than `batch_size=-1`: that batches by the split size from
    # the metadata, which `tfds.testing.mock_data` leaves unknown.
    chunks = list(tfds.as_numpy(ds.map(
        lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32))).batch(8192)))
    out.append(np.concatenate([c[0] for c in chunks]))
    out.append(np.concatenate([c[1] for c in chunks]))
  return tuple(out), int(builder.info.features['label'].num_classes)


def not_prepared_message(name, builder):
  """One-line fix for a tfds dataset that is not prepared in the data dir."""
  where = builder.data_dir_root
  if name == 'imagenet2012':
    return (
        f'tfds dataset {name} not found in {where}: put '
        f'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in '
        f'{where}/downloads/manual, run '
        f'`tfds build {name} --data_dir={where}` and pass --config.data_dir.')
  return (
      f'tfds dataset {name} not found in {where}: download it on a machine '
      'with internet with `python -m '
      'tensorflow_datasets.scripts.download_and_prepare '
      f'--datasets={name}` (or `tfds build {name}`) and pass '
      '--config.data_dir.')


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


def balanced_subset(labels, size, *, seed):
  """Sorted indices of a fixed random subset with (near) equal class counts.

  Classes take turns (in a random order) contributing their next random
  example, so counts differ by at most one unless a class runs out.

  Args:
    labels: int [N] class ids.
    size: how many examples to keep, 1 <= size <= N.
    seed: the choice depends on `seed` and `labels` only.

  Returns:
    int64 [size] indices into `labels`, ascending.
  """
  labels = np.asarray(labels)
  if not 0 < size <= labels.shape[0]:
    raise DatasetError(
        f'train_subset={size} but the training set has {labels.shape[0]} '
        'examples: set --config.train_subset between 1 and that (0 = all).')
  rng = streams.rng('subset', seed)
  order = rng.permutation(labels.shape[0])
  shuffled = labels[order]
  # Rank of each example among the examples of its class, in shuffled order.
  by_class = np.argsort(shuffled, kind='stable')
  starts = np.searchsorted(shuffled[by_class], shuffled[by_class])
  rank = np.empty_like(by_class)
  rank[by_class] = np.arange(by_class.size) - starts
  class_turn = rng.permutation(int(labels.max()) + 1)[shuffled]
  chosen = order[np.lexsort((class_turn, rank))[:size]]
  return np.sort(chosen).astype(np.int64)


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


# ----------------------------------------------------------------------------
# TensorFlow, imported only where tfds is used.


@functools.cache
def import_tensorflow():
  """Imports TensorFlow, hiding the GPUs from it (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF was initialised elsewhere first; nothing to do.
    pass
  return tf


@functools.cache
def import_tfds():
  """Imports tensorflow_datasets after TensorFlow has been set up."""
  import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
