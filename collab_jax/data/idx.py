"""Fashion-MNIST's original IDX files (Debian's `dataset-fashion-mnist`).

The offline default: no network and no TensorFlow, the files read with numpy.
"""

import gzip
import math
import os
import zlib

import numpy as np

from collab_jax import errors

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions.
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension.
_FASHION_MNIST_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}


def read_idx(path, *, magic):
  """Reads one uint8 IDX file (plain or .gz) into a numpy array.

  Args:
    path: the file.
    magic: the expected magic number: 2051 for images (3 dims), 2049 for
      labels (1 dim).

  Returns:
    A uint8 array with the shape stored in the header.

  Raises:
    errors.DatasetError: unreadable file, bad magic number, truncated or oversized
      data.
  """
  try:
    if path.endswith('.gz'):
      with gzip.open(path, 'rb') as f:
        data = f.read()
    else:
      with open(path, 'rb') as f:
        data = f.read()
  # gzip.BadGzipFile is an OSError; corrupt deflate data inside a valid
  # header is a zlib.error.
  except (OSError, EOFError, zlib.error) as e:
    raise errors.DatasetError(
        f'cannot read IDX file {path} ({e}): the file is corrupt, reinstall it '
        '(`sudo apt-get install --reinstall dataset-fashion-mnist`).') from e
  fix = ('the file is corrupt, reinstall it '
         '(`sudo apt-get install --reinstall dataset-fashion-mnist`).')
  if len(data) < 4:
    raise errors.DatasetError(f'IDX file {path} is truncated ({len(data)} bytes): '
                       f'{fix}')
  found = int.from_bytes(data[:4], 'big')
  if found != magic:
    raise errors.DatasetError(
        f'IDX file {path} has magic number {found}, expected {magic}: {fix}')
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise errors.DatasetError(f'IDX file {path} is truncated inside its header: '
                       f'{fix}')
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', ndim, offset=4))
  size = math.prod(shape)
  if len(data) - header != size:
    what = ('truncated' if len(data) - header < size
            else 'longer than its header says')
    raise errors.DatasetError(
        f'IDX file {path} is {what} ({len(data) - header} data bytes for shape '
        f'{shape}): {fix}')
  return np.frombuffer(data, np.uint8, size, offset=header).reshape(shape)


def load_fashion_mnist(data_dir):
  """Reads the four Fashion-MNIST IDX files of `data_dir`."""
  hint = ('run `sudo apt-get install dataset-fashion-mnist` or set '
          '--config.data_dir to the folder holding them')
  if not os.path.isdir(data_dir):
    raise errors.DatasetError(
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
    raise errors.DatasetError(
        f'Fashion-MNIST IDX files not found in {data_dir} (missing '
        f'{", ".join(missing)}): {hint}.')
  out = []
  for split in ('train', 'test'):
    images = read_idx(paths[f'{split}_images'], magic=_IDX_IMAGES_MAGIC)
    labels = read_idx(paths[f'{split}_labels'], magic=_IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
      raise errors.DatasetError(
          f'Fashion-MNIST {split} files in {data_dir} disagree: '
          f'{images.shape[0]} images but {labels.shape[0]} labels: reinstall '
          'them (`sudo apt-get install --reinstall dataset-fashion-mnist`).')
    if labels.size and labels.max() >= 10:
      raise errors.DatasetError(
          f'Fashion-MNIST {split} labels in {data_dir} go up to '
          f'{labels.max()}, expected 0..9: reinstall them '
          '(`sudo apt-get install --reinstall dataset-fashion-mnist`).')
    out += [images[..., None], labels.astype(np.int32)]
  return tuple(out)
