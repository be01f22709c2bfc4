"""ImageNet (tfds `imagenet2012`) read by index from ArrayRecord files.

The training batch of step `s` is a pure function of `(seed, s)`: which
examples it holds comes from `order.train_indices` (as for the in-memory
datasets), and each example's random-resized crop and flip from its global
position `s * global_batch + slot`. Resuming at step `s` therefore opens the
stream at `s` directly (a grain `MapDataset` is indexed, not iterated), reads
no earlier record, and yields the batches an uninterrupted run would have
seen, whatever the number of processes or data workers.

Records come from `tfds` data sources (random access needs the ArrayRecord
format; `prepare_imagenet` builds it from the two ILSVRC2012 tars, or adds it
beside an existing TFRecord preparation). JPEGs are decoded on the host with
Pillow, at a reduced scale where the crop allows (JPEG DCT scaling), and
leave as uint8; `augment.Preprocess` normalises them on the device with
`IMAGENET_MEAN` / `IMAGENET_STD`.
"""

import io
import math
import os
import time

import numpy as np
from PIL import Image

from collab_jax import errors
from collab_jax.data import order
from collab_jax.data import streams
from collab_jax.data import tfds_io

# ImageNet channel statistics in [0, 1] pixel units (the values used by
# torchvision and the Flax ImageNet example).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The Inception crop (Szegedy et al. 2015), as in torchvision and the TF
# pipeline this module replaces.
CROP_AREA = (0.08, 1.0)
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10


def open_split(split, data_dir=None):
  """The tfds random-access source of one imagenet2012 split, JPEGs undecoded.

  Raises:
    DatasetError: the dataset is not in `data_dir`, or only as TFRecord; the
      message names the command that fixes it.
  """
  tfds = tfds_io.import_tfds()
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  prepared = is_prepared(builder.data_dir)
  if prepared:  # read from its own metadata: it lists converted formats
    builder = tfds.builder_from_directory(builder.data_dir)
  try:
    return builder.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})
  except (AssertionError, NotImplementedError, ValueError, KeyError) as e:
    if prepared:
      raise errors.DatasetError(
          tfds_io.not_random_access_message(builder)) from e
    raise errors.DatasetError(
        tfds_io.not_prepared_message('imagenet2012', builder)) from e


def is_prepared(version_dir):
  """Whether tfds finished preparing a dataset version in `version_dir`."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  return (epath.Path(version_dir) / 'dataset_info.json').exists()


def num_examples(split, data_dir=None):
  """Number of examples in an imagenet2012 split."""
  return len(open_split(split, data_dir))


# ---------------------------------------------------------------------------
# Decoding and cropping one JPEG (numpy + Pillow; no TensorFlow).


def crop_window(rng, height, width):
  """A random Inception crop `(top, left, h, w)` of a `height x width` image.

  Up to `CROP_ATTEMPTS` tries of an area fraction uniform in `CROP_AREA` and
  an aspect ratio log-uniform in `CROP_ASPECT`; the whole image when none
  fits (as `tf.image.sample_distorted_bounding_box` does).
  """
  for _ in range(CROP_ATTEMPTS):
    area = height * width * rng.uniform(*CROP_AREA)
    aspect = math.exp(rng.uniform(*np.log(CROP_ASPECT)))
    w = int(round(math.sqrt(area * aspect)))
    h = int(round(math.sqrt(area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  return 0, 0, height, width


def _decode_window(jpeg, window_fn, image_size):
  """Decodes the window `window_fn(height, width)` resized to a square, uint8.

  The JPEG decoder is asked for the smallest DCT scale (1, 1/2, 1/4, 1/8)
  that keeps the window at least `image_size` pixels on each side, which
  makes decoding large images several times cheaper; the resize then
  antialiases from there.
  """
  image = Image.open(io.BytesIO(jpeg))
  width, height = image.size
  top, left, h, w = window_fn(height, width)
  image.draft('RGB', (math.ceil(width * image_size / w),
                      math.ceil(height * image_size / h)))
  sx, sy = image.size[0] / width, image.size[1] / height
  if image.mode != 'RGB':  # greyscale or CMYK JPEGs
    image = image.convert('RGB')
  image = image.resize(
      (image_size, image_size), Image.Resampling.BILINEAR,
      box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
  return np.asarray(image, np.uint8)


def random_resized_crop(jpeg, rng, image_size):
  """Training view: Inception crop resized to `image_size`, random flip."""
  image = _decode_window(jpeg, lambda h, w: crop_window(rng, h, w), image_size)
  return image[:, ::-1] if rng.random() < 0.5 else image


def center_crop(jpeg, image_size):
  """Evaluation view: shorter side to `image_size * 256 / 224`, center crop."""

  def window(height, width):
    side = min(height, width) * image_size / round(image_size * 256 / 224)
    h, w = min(height, round(side)), min(width, round(side))
    return (height - h) // 2, (width - w) // 2, h, w

  return _decode_window(jpeg, window, image_size)


# ---------------------------------------------------------------------------
# The streams.


def host_parallelism(cores=None):
  """(worker processes, threads each) for the decoding on this host.

  Decoding and resizing release the GIL but reading and deserialising a
  record do not, so beyond a few cores the work goes to worker processes
  (one per core left to the host, each with 2 threads); small hosts such as
  CI's decode in threads of the training process.
  """
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(
        os, 'sched_getaffinity') else os.cpu_count()
  if cores < 8:
    return 0, max(cores, 1)
  return cores - 1, 2


def _train_dataset(source, *, global_batch, process_index, process_count,
                   seed, image_size):
  """A grain MapDataset whose element `s` is this process's batch of step `s`."""
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  local = global_batch // process_count
  order.steps_per_epoch(n, global_batch)  # a clear error if the batch is too big

  def example(q):
    step, j = divmod(q, local)
    slot = process_index * local + j
    index = order.train_indices(
        step, num_examples=n, global_batch=global_batch, seed=seed)[slot]
    record = source[int(index)]
    rng = streams.rng('imagenet', seed, step * global_batch + slot)
    return {'image': random_resized_crop(record['image'], rng, image_size),
            'label': np.int32(record['label'])}

  # The stream repeats forever: its length is only a bound on the steps.
  return grain.MapDataset.range(2**62).map(example).batch(
      local, drop_remainder=True)


def _eval_dataset(source, *, global_batch, process_index, process_count,
                  image_size):
  """Process `p`'s contiguous share of the split, padded to the largest."""
  import grain  # pylint: disable=g-import-not-at-top
  n = len(source)
  local = global_batch // process_count
  begin = process_index * n // process_count
  size = (process_index + 1) * n // process_count - begin
  largest = -(-n // process_count)
  num_batches = -(-largest // local)  # the same on every process

  def example(q):
    if q >= size:  # padding: masked out of the metrics
      return {'image': np.zeros((image_size, image_size, 3), np.uint8),
              'label': np.int32(0), 'mask': np.float32(0.0)}
    record = source[begin + q]
    return {'image': center_crop(record['image'], image_size),
            'label': np.int32(record['label']), 'mask': np.float32(1.0)}

  return grain.MapDataset.range(num_batches * local).map(example).batch(local)


def imagenet_iterator(split, *, global_batch, process_index, process_count,
                      seed, image_size=224, data_dir=None, start_step=0,
                      training=None, parallelism=None, source=None):
  """Batches of this process's share of tfds `imagenet2012`.

  Training (`split` 'train...'): repeats forever; step `s` trains on the
  examples `order.train_indices(s, ...)` (a new permutation each epoch, from
  `seed`), each with an Inception random-resized crop (area 8-100 %, aspect
  ratio 3/4-4/3) resized to `image_size` and a random flip, drawn from
  `streams.rng('imagenet', seed, position)`. Evaluation: one pass; shorter
  side resized to `image_size * 256 / 224`, center crop `image_size`.

  Resuming at `start_step` indexes the stream there: no earlier record is
  read, and the batches equal those of an uninterrupted run.

  Args:
    split: a split of imagenet2012, e.g. 'train' or 'validation'.
    global_batch: examples per step over all processes; each process yields
      `global_batch // process_count` (assemble with
      `jax.make_array_from_process_local_data`).
    process_index: `jax.process_index()`; picks this process's rows of each
      global training batch, or its contiguous share of an evaluation split.
    process_count: `jax.process_count()`.
    seed: data seed (order and augmentation).
    image_size: output height and width.
    data_dir: tfds data dir holding the prepared imagenet2012 (ArrayRecord).
    start_step: the first batch to yield (the step the run resumes at).
    training: train or eval preprocessing; default: `split` starts with
      'train'.
    parallelism: (worker processes, threads each) decoding the JPEGs;
      default `host_parallelism()`, from this host's cores. The batches do
      not depend on it.
    source: a random-access source to read instead of `open_split(split,
      data_dir)` (tests, benchmarks).

  Returns:
    An iterator of dicts of numpy arrays: 'image' uint8 [b, s, s, 3] (to be
    normalised on the device with `IMAGENET_MEAN`/`IMAGENET_STD`), 'label'
    int32 [b]. Eval batches also hold 'mask' float32 [b] (1 real, 0 padding);
    every process yields the same number of eval batches, the last ones
    padded, so that all processes take part in every eval step.
  """
  import grain  # pylint: disable=g-import-not-at-top
  if global_batch % process_count:
    raise ValueError(
        f'global batch {global_batch} does not divide among {process_count} '
        f'processes: set --config.batch_size to a multiple of {process_count}.')
  if training is None:
    training = split.startswith('train')
  if source is None:
    source = open_split(split, data_dir)
  kwargs = dict(global_batch=global_batch, process_index=process_index,
                process_count=process_count, image_size=image_size)
  if training:
    ds = _train_dataset(source, seed=seed, **kwargs)
  else:
    ds = _eval_dataset(source, **kwargs)
  ds = ds[start_step:]  # an index, not a skip: O(1) at any step
  workers, threads = parallelism or host_parallelism()
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=2 * threads))
  if workers:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags;
      flags.FLAGS.mark_as_parsed()  # outside absl.app they keep defaults
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return iter(ds)


# ---------------------------------------------------------------------------
# The host's rate.


def synthetic_jpegs(count=16, size=(500, 375), seed=0):
  """JPEGs of ImageNet's typical size and file size (about 110 kB)."""
  rng = np.random.default_rng(seed)
  w, h = size
  yy, xx = np.mgrid[:h, :w]
  out = []
  for _ in range(count):
    phase = rng.uniform(0, 6, 3)
    pixels = (128 + 60 * np.sin(xx[..., None] / 9 + yy[..., None] / 13 + phase)
              + rng.normal(0, 25, (h, w, 3)))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        buf, format='JPEG', quality=90)
    out.append(buf.getvalue())
  return out


def measure_host_rate(jpegs=None, *, image_size=224, seconds=5.0,
                      data_dir=None, num_images=64):
  """Training decode + random-resized-crop rate of one host core, img/s.

  Runs `random_resized_crop` in this thread over `jpegs`, or the first
  `num_images` training JPEGs in `data_dir`, or `synthetic_jpegs()`, for
  about `seconds`. The rate per core divides the images by the CPU time of
  this thread, so other load on the host does not lower it; the wall-clock
  rate is reported beside it. Divide a step rate (img/s) by it for the cores
  the host side needs.

  Returns:
    dict: 'img_per_s_per_core' (per CPU second), 'img_per_s_wall', 'images',
    'cpu_seconds', 'image_size', 'mean_jpeg_kb', 'source'.
  """
  where = 'synthetic 500x375'
  if jpegs is None and data_dir is not None:
    src = open_split('train', data_dir)
    jpegs = [src[i]['image'] for i in range(min(num_images, len(src)))]
    where = f'{data_dir} train'
  if jpegs is None:
    jpegs = synthetic_jpegs()
  done = 0
  wall, cpu = time.perf_counter(), time.thread_time()
  while time.perf_counter() - wall < seconds or not done:
    for jpeg in jpegs:
      random_resized_crop(jpeg, streams.rng('imagenet', 0, done), image_size)
      done += 1
  cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
  return {'img_per_s_per_core': done / cpu, 'img_per_s_wall': done / wall,
          'images': done, 'cpu_seconds': cpu, 'image_size': image_size,
          'mean_jpeg_kb': sum(map(len, jpegs)) / len(jpegs) / 1e3,
          'source': where}
