"""ImageNet: preparation from the ILSVRC2012 tars, the indexed stream, resume (CPU)."""

import io
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from collab_jax import errors
from collab_jax.data import augment
from collab_jax.data import fake_imagenet
from collab_jax.data import imagenet
from collab_jax.data import prepare_imagenet
from collab_jax.data import tfds_io

tfds = tfds_io.import_tfds()  # Also hides GPUs from TF.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS_DIR = os.path.join(os.path.dirname(tfds.__file__), 'datasets',
                          'imagenet2012')


def _prepare_cli(data_dir):
  """The documented command, run as a user would."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  return subprocess.run(
      [sys.executable, '-m', 'collab_jax.data.prepare_imagenet',
       f'--data_dir={data_dir}'],
      capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """Fake tars -> `python -m collab_jax.data.prepare_imagenet` -> data dir."""
  root = tmp_path_factory.mktemp('imagenet')
  names = fake_imagenet.make_tars(root / 'downloads' / 'manual',
                                  num_classes=4, per_class=3, num_val=8)
  out = _prepare_cli(root)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f'--config.data_dir={root}' in out.stdout
  return str(root), names


def _synsets():
  with open(os.path.join(LABELS_DIR, 'labels.txt')) as f:
    return f.read().split()


def _records(source):
  return [source[i] for i in range(len(source))]


def _name(record):
  name = record['file_name']
  return name.decode() if isinstance(name, bytes) else str(name)


def _batches(data_dir, steps, split='train', **kwargs):
  """The first `steps` batches (all of them where `steps` is None)."""
  kw = dict(global_batch=4, process_index=0, process_count=1, seed=0,
            image_size=16, data_dir=data_dir, parallelism=(0, 2))
  kw.update(kwargs)
  it = imagenet.imagenet_iterator(split, **kw)
  return list(it) if steps is None else [next(it) for _ in range(steps)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------
# Preparation.


def test_prepare_builds_both_splits_with_tfds_labels(data_dir):
  path, (train_names, val_names) = data_dir
  synsets = _synsets()
  train = _records(imagenet.open_split('train', path))
  assert sorted(map(_name, train)) == sorted(train_names)
  for r in train:  # 'n01440764_10026.JPEG' -> index of n01440764
    assert int(r['label']) == synsets.index(_name(r).split('_')[0])
  with open(os.path.join(LABELS_DIR, 'validation_labels.txt')) as f:
    val_synsets = f.read().split()
  val = _records(imagenet.open_split('validation', path))
  assert sorted(map(_name, val)) == val_names
  for r in val:  # 'ILSVRC2012_val_00000003.JPEG' -> line 3 of tfds's file
    line = int(_name(r)[-13:-5])
    assert int(r['label']) == synsets.index(val_synsets[line - 1])
  assert imagenet.num_examples('train', path) == 12
  assert prepare_imagenet.prepare(path, log=lambda _: None) == 'ready'


def test_tfrecord_preparation_is_converted(data_dir, tmp_path):
  path, _ = data_dir
  manual = os.path.join(path, 'downloads', 'manual')
  builder = tfds.builder('imagenet2012', data_dir=str(tmp_path))  # TFRecord,
  builder.download_and_prepare(  # as `tfds build imagenet2012` makes it
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  with pytest.raises(errors.DatasetError) as e:
    imagenet.open_split('train', str(tmp_path))
  msg = str(e.value)
  assert '\n' not in msg and 'tfrecord only' in msg
  assert f'python -m collab_jax.data.prepare_imagenet --data_dir={tmp_path}' in msg
  assert prepare_imagenet.prepare(str(tmp_path), log=lambda _: None) == 'converted'
  converted = _records(imagenet.open_split('train', str(tmp_path)))
  built = _records(imagenet.open_split('train', path))
  key = lambda r: _name(r)
  for a, b in zip(sorted(converted, key=key), sorted(built, key=key)):
    assert a['image'] == b['image'] and a['label'] == b['label']
  # tf.data readers of the TFRecord files keep working.
  ds = tfds.builder('imagenet2012', data_dir=str(tmp_path)).as_dataset('train')
  assert len(list(ds)) == 12


def test_missing_data_messages_name_the_command(tmp_path):
  command = f'python -m collab_jax.data.prepare_imagenet --data_dir={tmp_path}'
  with pytest.raises(errors.DatasetError) as e:
    imagenet.open_split('train', str(tmp_path))
  msg = str(e.value)
  assert '\n' not in msg and command in msg and 'downloads/manual' in msg
  assert f'--config.data_dir={tmp_path}' in msg
  out = _prepare_cli(tmp_path)
  assert out.returncode == 1
  # One line (TensorFlow's start-up lines may stand before it).
  lines = [l for l in out.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1 and out.stderr.strip().endswith(lines[0])
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar not found' in (
      lines[0])
  assert command in lines[0] and 'Traceback' not in out.stderr


# ---------------------------------------------------------------------------
# Decoding and cropping.


def _jpeg(array, **kwargs):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='JPEG', **kwargs)
  return buf.getvalue()


def test_crop_window_within_inception_ranges():
  rng = np.random.default_rng(0)
  for _ in range(200):
    height, width = rng.integers(20, 400, 2)
    top, left, h, w = imagenet.crop_window(rng, height, width)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    if (h, w) != (height, width):
      assert 0.06 < h * w / (height * width) <= 1.02
      assert 0.7 < w / h < 1.4
  # Nothing fits a 1-pixel-high image: the whole image.
  assert imagenet.crop_window(rng, 1, 100) == (0, 0, 1, 100)


def test_scaled_decode_matches_full_decode():
  """The reduced-scale JPEG decode crops the same window as a full decode."""
  yy, xx = np.mgrid[:768, :1024]
  smooth = np.stack([xx / 4, yy / 3, (xx + yy) / 7], -1) % 256
  jpeg = _jpeg(smooth.astype(np.uint8), quality=95)
  window = (100, 300, 400, 500)  # large: decoded at 1/2 scale for 128 px
  fast = imagenet._decode_window(jpeg, lambda h, w: window, 128)
  top, left, h, w = window
  full = np.asarray(Image.open(io.BytesIO(jpeg)).convert('RGB').resize(
      (128, 128), Image.Resampling.BILINEAR,
      box=(left, top, left + w, top + h)), np.float32)
  assert fast.dtype == np.uint8 and fast.shape == (128, 128, 3)
  assert np.abs(fast - full).mean() < 2.0


def test_greyscale_and_small_images_give_rgb():
  grey = _jpeg(np.full((30, 50), 77, np.uint8))
  out = imagenet.random_resized_crop(grey, np.random.default_rng(0), 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  np.testing.assert_allclose(out.astype(int), 77, atol=3)
  out = imagenet.center_crop(grey, 24)
  assert out.shape == (24, 24, 3)


def test_center_crop_is_central():
  image = np.zeros((300, 200, 3), np.uint8)
  image[100:200] = 255  # a white band, the middle third of the height
  out = imagenet.center_crop(_jpeg(image, quality=95), 32)
  # The crop is 200 x 200 * 224 / 256 = 175 px around the center: the band
  # fills the middle 100/175 of its height.
  rows = out.mean(axis=(1, 2))
  assert rows[16] > 240 and rows[0] < 15 and rows[-1] < 15


# ---------------------------------------------------------------------------
# The training stream: a function of (seed, step).


def test_train_batches_cover_each_epoch(data_dir):
  path, _ = data_dir
  batches = _batches(path, 6)
  b = batches[0]
  assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.uint8
  assert b['label'].shape == (4,) and b['label'].dtype == np.int32
  labels = sorted(int(r['label']) for r in
                  _records(imagenet.open_split('train', path)))
  for epoch in range(2):  # 12 examples, 3 steps of 4 per epoch
    seen = np.concatenate([x['label'] for x in batches[3 * epoch:3 * epoch + 3]])
    assert sorted(seen.tolist()) == labels
  other = _batches(path, 1, seed=1)[0]
  assert not np.array_equal(other['image'], b['image'])


def test_resume_equals_uninterrupted(data_dir):
  path, _ = data_dir
  uninterrupted = _batches(path, 7)
  _assert_batches_equal(_batches(path, 3, start_step=4), uninterrupted[4:])
  # Other threads, or 2 processes each reading its half: the same batches.
  _assert_batches_equal(_batches(path, 3, start_step=4, parallelism=(0, 1)),
                        uninterrupted[4:])
  halves = [_batches(path, 3, start_step=4, process_index=p, process_count=2)
            for p in range(2)]
  for step, (h0, h1) in enumerate(zip(*halves)):
    for k in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([h0[k], h1[k]]),
                                    uninterrupted[4 + step][k])


class _CountingSource:
  """A source of `n` records cycling over `records`, counting the reads."""

  def __init__(self, records, n):
    self.records, self.n, self.reads = records, n, []

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    self.reads.append(i)
    return self.records[i % len(self.records)]


def test_resume_reads_no_past_records(data_dir):
  """At epoch 80 of a 1.28M-record set, the first batch reads ~one batch."""
  path, _ = data_dir
  records = _records(imagenet.open_split('train', path))
  source = _CountingSource(records, 1_281_167)
  step = 80 * (1_281_167 // 256)
  it = imagenet.imagenet_iterator(
      'train', global_batch=256, process_index=3, process_count=8, seed=0,
      image_size=8, source=source, start_step=step, parallelism=(0, 1))
  first = next(it)
  assert first['image'].shape == (32, 8, 8, 3)
  assert len(source.reads) <= 3 * 32  # the batch and a small prefetch
  from collab_jax.data import order  # pylint: disable=g-import-not-at-top
  expected = order.process_slice(order.train_indices(
      step, num_examples=1_281_167, global_batch=256, seed=0), 3, 8)
  np.testing.assert_array_equal(source.reads[:32], expected)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data_dir):
  path, _ = data_dir
  _assert_batches_equal(_batches(path, 3, start_step=2, parallelism=(2, 1)),
                        _batches(path, 3, start_step=2))


def test_host_parallelism_follows_cores():
  assert imagenet.host_parallelism(2) == (0, 2)
  assert imagenet.host_parallelism(64) == (63, 2)
  workers, threads = imagenet.host_parallelism()
  assert workers >= 0 and threads >= 1


# ---------------------------------------------------------------------------
# Evaluation: every process runs the same number of batches.


def test_eval_splits_evenly_over_3_processes(data_dir):
  path, _ = data_dir
  val = _records(imagenet.open_split('validation', path))
  shares = [list(imagenet.imagenet_iterator(
      'validation', global_batch=6, process_index=p, process_count=3,
      seed=0, image_size=16, data_dir=path, parallelism=(0, 2)))
            for p in range(3)]
  assert [len(s) for s in shares] == [2, 2, 2]  # 8 -> 2/3/3, batches of 2
  labels = []
  for share in shares:
    for b in share:
      assert b['image'].shape == (2, 16, 16, 3) and b['image'].dtype == np.uint8
      labels += b['label'][b['mask'] > 0].tolist()
      np.testing.assert_array_equal(b['image'][b['mask'] == 0], 0)
  assert labels == [int(r['label']) for r in val]
  assert sum(b['mask'].sum() for s in shares for b in s) == 8


def test_preprocess_normalises_uint8_on_device(data_dir):
  path, _ = data_dir
  batch = _batches(path, 1)[0]
  pre = augment.Preprocess(imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD,
                           augment=False)
  out = pre(None, jnp.asarray(batch['image']), train=True)
  expected = ((batch['image'] / 255.0 - np.array(imagenet.IMAGENET_MEAN))
              / np.array(imagenet.IMAGENET_STD))
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)


def test_measure_host_rate():
  jpegs = imagenet.synthetic_jpegs(count=2, size=(120, 90))
  rate = imagenet.measure_host_rate(jpegs, image_size=32, seconds=0.2)
  assert rate['img_per_s_per_core'] > 0 and rate['images'] >= 2
  kb = np.mean([len(j) for j in imagenet.synthetic_jpegs(count=2)]) / 1e3
  assert 60 < kb < 200  # ImageNet's JPEGs average about 110 kB


# ---------------------------------------------------------------------------
# tfds.testing.mock_data (what the trainer's own test runs on).


def test_imagenet_train_mocked():
  with tfds.testing.mock_data(num_examples=10):
    first = _batches(None, 5, parallelism=(0, 1))
    resumed = _batches(None, 2, start_step=3)
  assert first[0]['image'].shape == (4, 16, 16, 3)
  _assert_batches_equal(first[3:], resumed)


def test_imagenet_eval_mocked_padded():
  with tfds.testing.mock_data(num_examples=10):
    batches = _batches(None, None, split='validation', global_batch=8,
                       process_index=1, process_count=2)
  # Process 1 holds examples 5-9 of 10: 2 batches of 4, the last padded.
  assert [b['image'].shape for b in batches] == [(4, 16, 16, 3)] * 2
  np.testing.assert_array_equal(
      np.concatenate([b['mask'] for b in batches]), [1] * 5 + [0] * 3)
