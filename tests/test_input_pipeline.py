"""Tests of the data package: in-memory datasets, order, label noise, augmentation (CPU).

ImageNet's tests are in test_imagenet.py.
"""

import gzip
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

try:  # Several fake CPU devices for the sharding test (if JAX is still cold).
  jax.config.update('jax_num_cpu_devices', 8)
except RuntimeError:
  pass

from collab_jax import errors  # pylint: disable=g-import-not-at-top
from collab_jax.data import augment  # pylint: disable=g-import-not-at-top
from collab_jax.data import idx  # pylint: disable=g-import-not-at-top
from collab_jax.data import in_memory  # pylint: disable=g-import-not-at-top
from collab_jax.data import label_noise  # pylint: disable=g-import-not-at-top
from collab_jax.data import order  # pylint: disable=g-import-not-at-top
from collab_jax.data import streams  # pylint: disable=g-import-not-at-top
from collab_jax.data import subset  # pylint: disable=g-import-not-at-top
from collab_jax.data import tfds_io  # pylint: disable=g-import-not-at-top
import testutil  # pylint: disable=g-import-not-at-top

tfds = tfds_io.import_tfds()  # Also hides GPUs from TF.


_write_idx = testutil.write_idx
_fake_fashion_mnist = testutil.fake_fashion_mnist


# ---------------------------------------------------------------------------
# IDX reader and the local Fashion-MNIST files.


@pytest.mark.parametrize('gz', [True, False])
def test_load_local_reads_idx(tmp_path, gz):
  arrays = _fake_fashion_mnist(str(tmp_path), gz=gz)
  ds = in_memory.load_dataset('fashion_mnist_local',
                                   data_dir=str(tmp_path))
  np.testing.assert_array_equal(ds.train_images[..., 0], arrays['train'][0])
  np.testing.assert_array_equal(ds.train_labels, arrays['train'][1])
  np.testing.assert_array_equal(ds.test_images[..., 0], arrays['t10k'][0])
  assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
  assert ds.image_shape == (6, 5, 1) and ds.num_classes == 10
  pixels = arrays['train'][0] / 255.0
  np.testing.assert_allclose(ds.mean, [pixels.mean()], rtol=1e-9)
  np.testing.assert_allclose(ds.std, [pixels.std()], rtol=1e-9)


def _assert_error(match, fn, *args, **kwargs):
  with pytest.raises(errors.DatasetError, match=match) as info:
    fn(*args, **kwargs)
  assert '\n' not in str(info.value)  # One line.
  return str(info.value)


def test_local_missing_dir_and_files(tmp_path):
  load = in_memory.load_dataset
  msg = _assert_error('not found in', load, 'fashion_mnist_local',
                      data_dir=str(tmp_path / 'nope'))
  assert 'apt-get install dataset-fashion-mnist' in msg
  assert '--config.data_dir' in msg
  _fake_fashion_mnist(str(tmp_path))
  os.remove(tmp_path / 't10k-labels-idx1-ubyte.gz')
  msg = _assert_error('t10k-labels-idx1-ubyte', load, 'fashion_mnist_local',
                      data_dir=str(tmp_path))
  assert 'apt-get install dataset-fashion-mnist' in msg


def test_local_corrupt_files(tmp_path):
  load = in_memory.load_dataset
  arrays = _fake_fashion_mnist(str(tmp_path), gz=False)
  images_path = str(tmp_path / 'train-images-idx3-ubyte')
  labels_path = str(tmp_path / 'train-labels-idx1-ubyte')
  # Bad magic number: labels written where images belong.
  _write_idx(images_path, arrays['train'][1], 2049)
  msg = _assert_error('magic number 2049, expected 2051', load,
                      'fashion_mnist_local', data_dir=str(tmp_path))
  assert 'reinstall' in msg
  # Truncated data.
  _write_idx(images_path, arrays['train'][0], 2051)
  with open(images_path, 'r+b') as f:
    f.truncate(os.path.getsize(images_path) - 7)
  _assert_error('truncated', load, 'fashion_mnist_local',
                data_dir=str(tmp_path))
  # Truncated gzip stream.
  os.remove(images_path)
  _write_idx(images_path + '.gz', arrays['train'][0], 2051)
  with open(images_path + '.gz', 'r+b') as f:
    f.truncate(os.path.getsize(images_path + '.gz') // 2)
  _assert_error('cannot read IDX file', load, 'fashion_mnist_local',
                data_dir=str(tmp_path))
  # Images and labels disagree in number.
  _write_idx(images_path + '.gz', arrays['train'][0], 2051)
  _write_idx(labels_path, arrays['train'][1][:-1], 2049)
  _assert_error('100 images but 99 labels', load, 'fashion_mnist_local',
                data_dir=str(tmp_path))


def test_unknown_dataset():
  msg = _assert_error('unknown dataset', in_memory.load_dataset, 'mnist')
  for name in in_memory.KNOWN_DATASETS:
    assert name in msg


def test_train_subset_fixed_balanced(tmp_path):
  _fake_fashion_mnist(str(tmp_path), num_train=200)
  load = lambda **kw: in_memory.load_dataset(
      'fashion_mnist_local', data_dir=str(tmp_path), **kw)
  full = load()
  a, b = load(train_subset=53, subset_seed=1), load(train_subset=53,
                                                   subset_seed=1)
  c = load(train_subset=53, subset_seed=2)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  assert not np.array_equal(a.train_images, c.train_images)
  counts = np.bincount(a.train_labels, minlength=10)
  assert counts.sum() == 53 and counts.max() - counts.min() <= 1
  assert a.test_images.shape == full.test_images.shape  # Test set whole.
  assert a.mean == full.mean  # Normalised like the full set.
  # The subset's rows really are rows of the full set, labels kept aligned.
  keep = subset.balanced_subset(full.train_labels, 53, seed=1)
  np.testing.assert_array_equal(a.train_images, full.train_images[keep])
  np.testing.assert_array_equal(a.train_labels, full.train_labels[keep])
  _assert_error('train_subset=201', load, train_subset=201)


# ---------------------------------------------------------------------------
# Batch order.


def test_train_indices_epochs_are_permutations():
  kw = dict(num_examples=50, global_batch=8, seed=3)
  per_epoch = order.steps_per_epoch(50, 8)
  assert per_epoch == 6
  epochs = [np.concatenate([order.train_indices(e * 6 + i, **kw)
                            for i in range(per_epoch)]) for e in range(3)]
  for epoch in epochs:
    assert epoch.dtype == np.int64 and len(set(epoch)) == 48  # 2 dropped.
    assert set(epoch) <= set(range(50))
  assert not np.array_equal(epochs[0], epochs[1])
  np.testing.assert_array_equal(
      epochs[1][:8], streams.rng('order', 3, 1).permutation(50)[:8])
  other_seed = order.train_indices(0, num_examples=50, global_batch=8,
                                            seed=4)
  assert not np.array_equal(other_seed, epochs[0][:8])


def test_train_indices_stateless_resume():
  kw = dict(num_examples=37, global_batch=5, seed=0)
  sequence = [order.train_indices(s, **kw) for s in range(30)]
  order._epoch_permutation.cache_clear()  # A fresh process.
  for step in (29, 0, 17, 8):
    np.testing.assert_array_equal(order.train_indices(step, **kw),
                                  sequence[step])


def test_train_indices_errors():
  with pytest.raises(ValueError, match='larger than the 4 training examples'):
    order.train_indices(0, num_examples=4, global_batch=8, seed=0)


def test_process_slice_covers_batch():
  indices = np.arange(100, 124)
  parts = [order.process_slice(indices, p, 4) for p in range(4)]
  np.testing.assert_array_equal(np.concatenate(parts), indices)
  assert all(len(p) == 6 for p in parts)
  with pytest.raises(ValueError, match='multiple of 5'):
    order.process_slice(indices, 0, 5)


# ---------------------------------------------------------------------------
# Label noise.


def test_label_noise_partition_fixed_by_seed():
  a = label_noise.LabelNoise(1000, 10, 0.3, seed=7, run_seed=1)
  b = label_noise.LabelNoise(1000, 10, 0.3, seed=7, run_seed=2)
  np.testing.assert_array_equal(a.corrupted, b.corrupted)
  assert a.corrupted.sum() == 300 == a.num_corrupted
  c = label_noise.LabelNoise(1000, 10, 0.3, seed=8)
  assert not np.array_equal(a.corrupted, c.corrupted)
  assert label_noise.LabelNoise(1001, 10, 0.25, seed=0).num_corrupted == 250


def test_label_noise_labels():
  n, classes = 2000, 10
  true = np.random.default_rng(0).integers(0, classes, n).astype(np.int32)
  noise = label_noise.LabelNoise(n, classes, 0.4, seed=5)
  idx = np.arange(n)
  epoch0, epoch1 = noise.labels(idx, true, 0), noise.labels(idx, true, 1)
  clean = ~noise.corrupted
  np.testing.assert_array_equal(epoch0[clean], true[clean])
  np.testing.assert_array_equal(epoch1[clean], true[clean])
  # Corrupted: uniform over all classes, redrawn every epoch.
  changed = (epoch0 != epoch1)[noise.corrupted].mean()
  assert 0.85 < changed < 0.95  # 1 - 1/10 expected.
  wrong = (epoch0 != true)[noise.corrupted].mean()
  assert 0.85 < wrong < 0.95
  assert np.abs(np.bincount(epoch0[noise.corrupted]) / 800 - 0.1).max() < 0.04
  # Same epoch, same labels, also from a fresh object and for a batch.
  other = label_noise.LabelNoise(n, classes, 0.4, seed=5)
  batch = np.array([5, 17, 3, 1999])
  np.testing.assert_array_equal(other.labels(batch, true[batch], 0),
                                epoch0[batch])
  np.testing.assert_array_equal(other.labels(batch, true, 0), epoch0[batch])
  np.testing.assert_array_equal(noise.labels(idx, true, 0), epoch0)
  # Level 0 is the identity; levels outside [0, 1) fail clearly.
  zero = label_noise.LabelNoise(n, classes, 0.0, seed=5)
  np.testing.assert_array_equal(zero.labels(idx, true, 3), true)
  with pytest.raises(ValueError, match=r'in \[0, 1\)'):
    label_noise.LabelNoise(n, classes, 1.0, seed=0)


def test_label_noise_draws_per_run():
  """Same partition for every training seed, own draws per seed, same on resume."""
  n, classes = 2000, 10
  true = np.random.default_rng(0).integers(0, classes, n).astype(np.int32)
  idx = np.arange(n)
  run = {s: label_noise.LabelNoise(n, classes, 0.4, seed=5, run_seed=s)
         for s in (0, 1)}
  np.testing.assert_array_equal(run[0].corrupted, run[1].corrupted)
  bad = run[0].corrupted
  for epoch in (0, 7):
    a, b = run[0].labels(idx, true, epoch), run[1].labels(idx, true, epoch)
    np.testing.assert_array_equal(a[~bad], true[~bad])
    np.testing.assert_array_equal(b[~bad], true[~bad])
    # Independent uniform draws agree on about 1/10 of the corrupted examples.
    assert 0.05 < (a == b)[bad].mean() < 0.15
    # A resumed run (a fresh object, any epoch order) draws the same labels.
    resumed = label_noise.LabelNoise(n, classes, 0.4, seed=5, run_seed=0)
    resumed.labels(idx, true, epoch + 1)
    np.testing.assert_array_equal(resumed.labels(idx, true, epoch), a)
  # Shared draws (run_seed=None) are one sequence for every run, unchanged.
  shared = label_noise.LabelNoise(n, classes, 0.4, seed=5)
  expected = np.where(bad, streams.rng('noise_shared', 5, 3).integers(
      0, classes, n, dtype=np.int32), true)
  np.testing.assert_array_equal(shared.labels(idx, true, 3), expected)


# ---------------------------------------------------------------------------
# On-device augmentation.


def _position_images(batch, h=8, w=8):
  """uint8 images whose pixel value encodes its position (1 + y * w + x)."""
  image = 1 + np.arange(h * w, dtype=np.uint8).reshape(h, w, 1)
  return np.broadcast_to(image, (batch, h, w, 1)).copy()


def test_augment_crop_shifts_content():
  images = _position_images(64)
  crop = jax.jit(lambda k, x: augment.augment(k, x, flip=False))
  out = np.asarray(crop(jax.random.key(0), images))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images[0], ((4, 4), (4, 4), (0, 0)))
  shifts = set()
  for img in out:
    found = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.array_equal(img, padded[dy:dy + 8, dx:dx + 8])]
    assert len(found) == 1
    shifts.add(found[0])
  assert len(shifts) > 20  # 64 draws from 81 shifts.


def test_augment_flips_half_and_is_deterministic():
  images = _position_images(1000, 3, 4)
  out = np.asarray(augment.augment(jax.random.key(1), images, pad=0))
  flipped = np.all(out == images[:, :, ::-1], axis=(1, 2, 3))
  kept = np.all(out == images, axis=(1, 2, 3))
  assert np.all(flipped ^ kept)
  assert 0.43 < flipped.mean() < 0.57
  again = np.asarray(augment.augment(jax.random.key(1), images, pad=0))
  np.testing.assert_array_equal(out, again)
  other = np.asarray(augment.augment(jax.random.key(2), images, pad=0))
  assert not np.array_equal(out, other)
  none = augment.augment(jax.random.key(1), images, pad=0, flip=False)
  np.testing.assert_array_equal(np.asarray(none), images)


def test_augment_and_normalize_sharded():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  images = np.random.default_rng(0).integers(
      0, 256, (2 * len(jax.devices()), 8, 8, 3), dtype=np.uint8)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

  def step(rng, x):
    return augment.normalize(augment.augment(rng, x), mean, std,
                                    dtype=jnp.bfloat16)

  sharded = jax.jit(step, out_shardings=batch)
  x = jax.device_put(images, batch)
  out = sharded(jax.random.key(3), x)
  assert out.sharding.is_equivalent_to(batch, 4) and out.dtype == jnp.bfloat16
  compiled = sharded.lower(jax.random.key(3), x).compile().as_text()
  assert 'all-gather' not in compiled  # The batch never leaves its device.
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(
      jax.jit(step)(jax.random.key(3), images), np.float32))


def test_normalize():
  images = np.array([[[[0, 255, 51]]]], np.uint8)
  out = augment.normalize(images, (0.0, 0.5, 0.2), (1.0, 0.5, 0.1))
  np.testing.assert_allclose(np.asarray(out), [[[[0.0, 1.0, 0.0]]]], atol=1e-6)
  assert out.dtype == jnp.float32


def test_eval_batches_pad_last():
  images = np.arange(10 * 2 * 2 * 1, dtype=np.uint8).reshape(10, 2, 2, 1)
  labels = np.arange(10)
  batches = list(in_memory.eval_batches(images, labels, 4))
  assert [b['image'].shape for b in batches] == [(4, 2, 2, 1)] * 3
  np.testing.assert_array_equal(batches[2]['mask'], [1, 1, 0, 0])
  np.testing.assert_array_equal(
      np.concatenate([b['label'][b['mask'] > 0] for b in batches]), labels)
  np.testing.assert_array_equal(batches[2]['image'][2:], 0)
  assert batches[0]['label'].dtype == np.int32


# ---------------------------------------------------------------------------
# tfds paths (mocked: nothing is downloaded).


def test_load_cifar10_mocked():
  with tfds.testing.mock_data(num_examples=24):
    ds = in_memory.load_dataset('cifar10', train_subset=12)
  assert ds.train_images.shape == (12, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.test_images.shape == (24, 32, 32, 3)
  assert ds.num_classes == 10 and len(ds.mean) == 3
  assert np.all((ds.train_labels >= 0) & (ds.train_labels < 10))


def test_tfds_not_prepared(tmp_path):
  msg = _assert_error('tfds dataset cifar10 not found in',
                      in_memory.load_dataset, 'cifar10',
                      data_dir=str(tmp_path))
  assert str(tmp_path) in msg and '--datasets=cifar10' in msg
  assert '--config.data_dir' in msg


# ---------------------------------------------------------------------------
# The real Debian files, when installed.


@pytest.mark.skipif(
    not os.path.exists(os.path.join(idx.FASHION_MNIST_DIR,
                                    'train-images-idx3-ubyte.gz')),
    reason='dataset-fashion-mnist is not installed')
def test_fashion_mnist_local_real_files():
  ds = in_memory.load_dataset('fashion_mnist_local')
  assert ds.train_images.shape == (60000, 28, 28, 1)
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.num_classes == 10
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_allclose(ds.mean, [0.2860], atol=1e-3)
  np.testing.assert_allclose(ds.std, [0.3530], atol=1e-3)
