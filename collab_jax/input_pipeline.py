"""Input pipeline: datasets, batch order, label noise, augmentation.

Two kinds of data:

* Small image datasets (Fashion-MNIST, CIFAR-10/100) live in host memory as
  uint8 arrays (`load_dataset`). The batch for a step is a pure function of
  `(seed, step)` (`train_indices`; `LabeledSplit` for semi-supervised
  batches), so resuming from a checkpoint needs no iterator state, and augmentation (`augment`, `normalize`) runs on the device
  inside the jitted train step.
* ImageNet is streamed from tfds with tf.data (`imagenet_iterator`);
  preprocessing happens on the host and resuming skips batches.

TensorFlow is imported only by the tfds paths (`_tf`), which also hides the
GPUs from it so that it never claims accelerator memory; the offline default
(the local Fashion-MNIST files) runs without it.
"""

import dataclasses
import functools
import gzip
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
TFDS_DATASETS = ('fashion_mnist', 'cifar10', 'cifar100')
KNOWN_DATASETS = ('fashion_mnist_local',) + TFDS_DATASETS

# ImageNet channel statistics in [0, 1] pixel units (the values used by
# torchvision and the Flax ImageNet example).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

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
  tf, tfds = _tf(), _tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  out = []
  for split in ('train', 'test'):
    try:
      ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data in ...".
      raise DatasetError(_not_prepared_message(name, builder)) from e
    # Chunks rather than `batch_size=-1`: that batches by the split size from
    # the metadata, which `tfds.testing.mock_data` leaves unknown.
    chunks = list(tfds.as_numpy(ds.map(
        lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32))).batch(8192)))
    out.append(np.concatenate([c[0] for c in chunks]))
    out.append(np.concatenate([c[1] for c in chunks]))
  return tuple(out), int(builder.info.features['label'].num_classes)


def _not_prepared_message(name, builder):
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
  rng = np.random.default_rng([seed, 0x5eb5e7])
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


# ----------------------------------------------------------------------------
# Batch order: a pure function of (seed, step), so resuming needs no state.


def steps_per_epoch(num_examples, global_batch):
  """Number of full batches in one pass over the data (remainder dropped)."""
  if global_batch <= 0:
    raise ValueError(f'global_batch must be positive, got {global_batch}.')
  if global_batch > num_examples:
    raise ValueError(
        f'global_batch={global_batch} is larger than the {num_examples} '
        'training examples: lower --config.batch_size or train_subset=0.')
  return num_examples // global_batch


@functools.lru_cache(maxsize=2)
def _epoch_permutation(seed, epoch, num_examples):
  """The example order of one epoch (cached: consecutive steps share it)."""
  perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


def train_indices(step, *, num_examples, global_batch, seed):
  """Indices of the training examples of global batch `step`.

  Epoch `e = step // steps_per_epoch` visits the examples in the order of
  `np.random.default_rng([seed, e]).permutation(num_examples)`, dropping the
  last incomplete batch. Being a function of `step` alone, a resumed run sees
  exactly the batches an uninterrupted run would.

  Args:
    step: the global optimizer step (0-based).
    num_examples: size of the training set.
    global_batch: examples per step over all processes.
    seed: data-order seed.

  Returns:
    int64 [global_batch] indices.
  """
  if step < 0:
    raise ValueError(f'step must be >= 0, got {step}.')
  per_epoch = steps_per_epoch(num_examples, global_batch)
  epoch, i = divmod(int(step), per_epoch)
  perm = _epoch_permutation(int(seed), epoch, int(num_examples))
  return perm[i * global_batch:(i + 1) * global_batch].astype(np.int64)


@functools.lru_cache(maxsize=4)
def _stream_permutation(seed, stream, epoch, num_examples):
  """`_epoch_permutation` of one of several independent example streams."""
  perm = np.random.default_rng([seed, stream, epoch]).permutation(num_examples)
  perm.flags.writeable = False
  return perm


class LabeledSplit:
  """Semi-supervised data: a fixed labelled subset, mixed batches.

  The labelled subset is `balanced_subset(labels, labeled_per_class *
  num_classes, seed=seed)`: a function of the seed and the labels alone, the
  same for every run (any training seed, model or method), with exactly
  `labeled_per_class` examples of each class. It is the very subset that
  `load_dataset(train_subset=labeled_per_class * num_classes,
  subset_seed=seed)` trains on, so a supervised run on that subset is the
  matching baseline. The other examples are unlabelled.

  Every global batch holds `labeled_per_batch = round(labeled_fraction *
  global_batch)` labelled examples first, then `global_batch -
  labeled_per_batch` unlabelled ones. Each part walks through its own pool in
  epochs, with its own permutation per epoch (as `train_indices`, from
  `(run_seed, stream, epoch)`), so the batch of a step is a pure function of
  `(run_seed, step)` and a resumed run sees exactly the same batches.
  """

  _LABELED_STREAM, _UNLABELED_STREAM = 0x1abe1ed, 0x0b1abe1

  def __init__(self, labels, labeled_per_class, num_classes, *, seed,
               global_batch, labeled_fraction):
    """Chooses the labelled subset.

    Args:
      labels: int [N] class ids of the training set.
      labeled_per_class: labelled examples kept per class (>= 1).
      num_classes: number of classes.
      seed: chooses the labelled subset (e.g. `config.subset_seed`).
      global_batch: examples per step over all processes.
      labeled_fraction: share of labelled examples in every batch, in (0, 1).
    """
    labels = np.asarray(labels)
    size = int(labeled_per_class) * int(num_classes)
    if not 0 < size < labels.shape[0]:
      raise DatasetError(
          f'labeled_per_class={labeled_per_class} keeps {size} of the '
          f'{labels.shape[0]} training labels: set --config.labeled_per_class '
          'so that some, but not all, examples are labelled (0 = all).')
    if not 0.0 < labeled_fraction < 1.0:
      raise ValueError(
          f'labeled_fraction_per_batch={labeled_fraction} must be in (0, 1).')
    self.labeled = balanced_subset(labels, size, seed=seed)
    self.labeled.flags.writeable = False
    self.unlabeled = np.setdiff1d(np.arange(labels.shape[0]), self.labeled)
    self.unlabeled.flags.writeable = False
    self.global_batch = int(global_batch)
    self.labeled_per_batch = int(round(labeled_fraction * global_batch))
    if not 0 < self.labeled_per_batch < self.global_batch:
      raise ValueError(
          f'labeled_fraction_per_batch={labeled_fraction} of batch '
          f'{global_batch} gives {self.labeled_per_batch} labelled examples; '
          'a batch needs at least one labelled and one unlabelled example.')
    # Both pools must hold at least one batch part (steps_per_epoch checks).
    steps_per_epoch(self.labeled.size, self.labeled_per_batch)
    steps_per_epoch(self.unlabeled.size, self.global_batch - self.labeled_per_batch)

  def _part(self, pool, stream, per_batch, step, run_seed):
    per_epoch = steps_per_epoch(pool.size, per_batch)
    epoch, i = divmod(int(step), per_epoch)
    perm = _stream_permutation(int(run_seed), stream, epoch, pool.size)
    return pool[perm[i * per_batch:(i + 1) * per_batch]]

  def indices(self, step, *, run_seed):
    """Global batch `step`: (int64 [B] example indices, bool [B] labelled)."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}.')
    n_lab = self.labeled_per_batch
    lab = self._part(self.labeled, self._LABELED_STREAM, n_lab, step, run_seed)
    unl = self._part(self.unlabeled, self._UNLABELED_STREAM,
                     self.global_batch - n_lab, step, run_seed)
    is_labeled = np.arange(self.global_batch) < n_lab
    return np.concatenate([lab, unl]).astype(np.int64), is_labeled


def process_slice(indices, process_index, process_count):
  """This process's contiguous share of a global batch.

  Process `p` gets rows `[p * b, (p + 1) * b)` with `b = len / process_count`,
  matching a batch axis sharded over `jax.devices()` (ordered by process).

  Args:
    indices: any array whose leading axis is the global batch.
    process_index: `jax.process_index()`.
    process_count: `jax.process_count()`.

  Returns:
    `indices[p * b:(p + 1) * b]`.
  """
  n = len(indices)
  if n % process_count:
    raise ValueError(
        f'global batch {n} does not divide among {process_count} processes: '
        f'set --config.batch_size to a multiple of {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} outside [0, {process_count}).')
  b = n // process_count
  return indices[process_index * b:(process_index + 1) * b]


# ----------------------------------------------------------------------------
# Label noise (paper Sec. 3.4).


class LabelNoise:
  """Label noise: a fixed corrupted set, fresh uniform labels every epoch.

  Paper Sec. 3.4/4.1: "The partition for images with corruption or not is
  fixed for all runs; their noisy labels are randomly generated every epoch."
  The corrupted set is exactly `round(level * N)` examples chosen from `seed`
  alone, so every run of a sweep (any training seed, model or head tree) uses
  the same partition. In each epoch a corrupted example gets a label drawn
  uniformly over *all* classes, so it keeps its true label with probability
  `1 / num_classes`. The draws are a pure function of
  `(seed, run_seed, epoch)`: runs with different training seeds see different
  draws, and a resumed run sees the same ones. `run_seed=None` gives the
  draws of `(seed, epoch)` alone, shared by every run (the protocol of the
  first Fashion-MNIST study, kept so that its runs stay reproducible).
  """

  def __init__(self, num_examples, num_classes, level, seed, *,
               run_seed=None):
    """Chooses the corrupted set.

    Args:
      num_examples: size of the training set N.
      num_classes: labels are drawn from `range(num_classes)`.
      level: fraction of corrupted examples, in [0, 1).
      seed: the noise seed; chooses the corrupted set.
      run_seed: the training run's seed, mixed into the per-epoch draws;
        None shares one draw sequence between all runs.
    """
    if not 0.0 <= level < 1.0:
      raise ValueError(f'level={level} must be a fraction in [0, 1), e.g. 0.2.')
    self.num_examples = int(num_examples)
    self.num_classes = int(num_classes)
    self.level = float(level)
    self.seed = int(seed)
    self.run_seed = None if run_seed is None else int(run_seed)
    self.num_corrupted = int(round(level * num_examples))
    rng = np.random.default_rng([self.seed, 0])
    chosen = rng.choice(self.num_examples, self.num_corrupted, replace=False)
    self.corrupted = np.zeros(self.num_examples, bool)
    self.corrupted[chosen] = True
    self.corrupted.flags.writeable = False
    self._cached_epoch, self._cached_draw = None, None

  def _draw(self, epoch):
    """Noisy labels of all N examples for `epoch` (the last epoch is cached)."""
    if epoch != self._cached_epoch:
      if self.run_seed is None:
        rng = np.random.default_rng([self.seed, 1, epoch])
      else:
        rng = np.random.default_rng([self.seed, 2, self.run_seed, epoch])
      self._cached_draw = rng.integers(
          0, self.num_classes, self.num_examples, dtype=np.int32)
      self._cached_epoch = epoch
    return self._cached_draw

  def labels(self, indices, true_labels, epoch):
    """Training labels of examples `indices` in `epoch`.

    Args:
      indices: int [B] example indices (e.g. from `train_indices`).
      true_labels: int [B] clean labels of those examples (aligned with
        `indices`), or the whole clean label array [N].
      epoch: the epoch (`step // steps_per_epoch`).

    Returns:
      int32 [B]: the clean label, or this epoch's random label where the
      example is corrupted.
    """
    indices = np.asarray(indices)
    true_labels = np.asarray(true_labels)
    if true_labels.shape != indices.shape:
      if true_labels.shape != (self.num_examples,):
        raise ValueError(
            f'true_labels has shape {true_labels.shape}: pass the labels of '
            f'the batch {indices.shape} or of the whole training set '
            f'({self.num_examples},).')
      true_labels = true_labels[indices]
    if not self.num_corrupted:
      return true_labels.astype(np.int32)
    return np.where(self.corrupted[indices], self._draw(int(epoch))[indices],
                    true_labels).astype(np.int32)


# ----------------------------------------------------------------------------
# On-device augmentation (inside the jitted train step).


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
# ImageNet: streaming tf.data pipeline.


@functools.cache
def _tf():
  """Imports TensorFlow, hiding the GPUs from it (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF was initialised elsewhere first; nothing to do.
    pass
  return tf


@functools.cache
def _tfds():
  """Imports tensorflow_datasets after TensorFlow has been set up by `_tf`."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def _random_resized_crop(jpeg, seed, image_size):
  """Inception crop (area 8-100 %, aspect 3/4-4/3), decoding only the crop."""
  tf = _tf()
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.image.extract_jpeg_shape(jpeg),
      bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
      seed=seed,
      min_object_covered=0.08,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True)  # The whole image when all fail.
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  image = tf.image.decode_and_crop_jpeg(jpeg, window, channels=3)
  return tf.image.resize(image, [image_size, image_size], antialias=True)


def _resize_center_crop(jpeg, image_size):
  """Resizes the shorter side to image_size * 256 / 224, then center-crops."""
  tf = _tf()
  image = tf.io.decode_jpeg(jpeg, channels=3)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  resize = float(round(image_size * 256 / 224))
  new_hw = tf.maximum(
      tf.cast(tf.round(hw * resize / tf.reduce_min(hw)), tf.int32), image_size)
  image = tf.image.resize(image, new_hw, antialias=True)
  top, left = (new_hw[0] - image_size) // 2, (new_hw[1] - image_size) // 2
  return image[top:top + image_size, left:left + image_size]


def _normalize_tf(image):
  """ImageNet mean/std normalisation of a float [0, 255] image."""
  tf = _tf()
  mean = tf.constant(IMAGENET_MEAN, tf.float32)
  std = tf.constant(IMAGENET_STD, tf.float32)
  return (image / 255.0 - mean) / std


def num_examples(name, split, data_dir=None):
  """Size of a tfds split, from the dataset info or, failing that, counted."""
  tfds = _tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    pass
  try:  # e.g. under tfds.testing.mock_data, whose info has no splits
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError as e:
    raise DatasetError(_not_prepared_message(name, builder)) from e
  n = int(ds.cardinality())
  return n if n >= 0 else int(ds.reduce(0, lambda c, _: c + 1))


def imagenet_iterator(split, *, global_batch, process_index, process_count,
                      seed, image_size=224, data_dir=None, start_step=0,
                      training=None, shuffle_buffer=None):
  """Batches of this process's share of tfds `imagenet2012`.

  Training (`split` 'train...'): repeats forever; files and examples are
  shuffled from `seed`; each example gets an Inception random-resized crop
  (area 8-100 %, aspect ratio 3/4-4/3) resized to `image_size` and a random
  flip, seeded by its position in the stream. Evaluation: one pass; shorter
  side resized to `image_size * 256 / 224`, center crop `image_size`.

  The order is a deterministic function of `seed`, `process_index` and
  `process_count` (deterministic tf.data, seeded shuffles, stateless random
  ops). Resuming: streaming data has no index to jump to, so the pipeline
  is rebuilt and its first `start_step` batches are skipped. The skip happens
  before JPEG decoding, so it costs reading the records only; the resumed
  stream equals the uninterrupted one.

  Args:
    split: a tfds split of imagenet2012, e.g. 'train' or 'validation'.
    global_batch: examples per step over all processes; each process yields
      `global_batch // process_count` (assemble with
      `jax.make_array_from_process_local_data`).
    process_index: `jax.process_index()`; picks this process's even share of
      the split (`tfds.split_for_jax_process`).
    process_count: `jax.process_count()`.
    seed: data seed (shuffling and augmentation).
    image_size: output height and width.
    data_dir: tfds data dir holding the prepared imagenet2012.
    start_step: number of batches to skip (the step the run resumes at).
    training: train or eval preprocessing; default: `split` starts with
      'train'.
    shuffle_buffer: examples in the shuffle buffer (of encoded JPEGs);
      default `16 * local batch`.

  Returns:
    An iterator of dicts of numpy arrays: 'image' float32 [b, s, s, 3]
    normalised with `IMAGENET_MEAN`/`IMAGENET_STD`, 'label' int32 [b]. Eval
    batches also hold 'mask' float32 [b] (1 real, 0 padding); every process
    yields the same number of eval batches, the last ones padded, so that
    all processes take part in every eval step.
  """
  tf, tfds = _tf(), _tfds()
  if global_batch % process_count:
    raise ValueError(
        f'global batch {global_batch} does not divide among {process_count} '
        f'processes: set --config.batch_size to a multiple of {process_count}.')
  local_batch = global_batch // process_count
  if training is None:
    training = split.startswith('train')
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  process_split = tfds.split_for_jax_process(
      split, process_index=process_index, process_count=process_count,
      drop_remainder=training)
  # Per-process seeds: shares must not be shuffled/augmented in lockstep.
  tf_seed = int(np.random.default_rng([seed, process_index]).integers(2**31))
  options = tf.data.Options()
  options.deterministic = True
  try:
    ds = builder.as_dataset(
        split=process_split,
        shuffle_files=training,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(
            shuffle_seed=tf_seed, options=options, try_autocache=False))
  except AssertionError as e:  # tfds's "could not find data in ...".
    raise DatasetError(_not_prepared_message('imagenet2012', builder)) from e

  if training:
    ds = ds.repeat()
    ds = ds.shuffle(shuffle_buffer or 16 * local_batch, seed=tf_seed)
    ds = ds.enumerate()  # The position seeds the example's augmentation.
    ds = ds.skip(start_step * local_batch)

    def preprocess(i, ex):
      seeds = tf.random.experimental.stateless_split(
          tf.stack([tf.constant(tf_seed, tf.int64), i]), num=2)
      image = _random_resized_crop(ex['image'], seeds[0], image_size)
      image = tf.image.stateless_random_flip_left_right(image, seeds[1])
      return {'image': _normalize_tf(image),
              'label': tf.cast(ex['label'], tf.int32)}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
  else:
    num_local = int(ds.cardinality())
    if num_local < 0:  # Unknown: count the (still encoded) records once.
      num_local = int(ds.reduce(0, lambda n, _: n + 1))
    try:
      num_split = builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError):
      num_split = 0
    # Every process runs as many batches as the largest share needs.
    largest = max(-(-num_split // process_count), num_local)
    num_batches = -(-largest // local_batch)

    def preprocess(ex):
      return {'image': _normalize_tf(_resize_center_crop(ex['image'],
                                                         image_size)),
              'label': tf.cast(ex['label'], tf.int32),
              'mask': tf.constant(1.0, tf.float32)}

    padding = tf.data.Dataset.from_tensors({
        'image': tf.zeros([image_size, image_size, 3], tf.float32),
        'label': tf.constant(0, tf.int32),
        'mask': tf.constant(0.0, tf.float32),
    }).repeat(num_batches * local_batch - num_local)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
    ds = ds.skip(start_step)
  ds = ds.prefetch(tf.data.AUTOTUNE).with_options(options)
  return iter(tfds.as_numpy(ds))
