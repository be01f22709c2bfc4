"""ImageNet (tfds `imagenet2012`) streamed with tf.data, preprocessed on the host."""

import numpy as np

from collab_jax import errors
from collab_jax.data import streams
from collab_jax.data import tfds_io

# ImageNet channel statistics in [0, 1] pixel units (the values used by
# torchvision and the Flax ImageNet example).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _random_resized_crop(jpeg, seed, image_size):
  """Inception crop (area 8-100 %, aspect 3/4-4/3), decoding only the crop."""
  tf = tfds_io.import_tensorflow()
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
  tf = tfds_io.import_tensorflow()
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
  tf = tfds_io.import_tensorflow()
  mean = tf.constant(IMAGENET_MEAN, tf.float32)
  std = tf.constant(IMAGENET_STD, tf.float32)
  return (image / 255.0 - mean) / std


def num_examples(name, split, data_dir=None):
  """Size of a tfds split, from the dataset info or, failing that, counted."""
  tfds = tfds_io.import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError):
    pass
  try:  # e.g. under tfds.testing.mock_data, whose info has no splits
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
  except AssertionError as e:
    raise errors.DatasetError(
        tfds_io.not_prepared_message(name, builder)) from e
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
  tf, tfds = tfds_io.import_tensorflow(), tfds_io.import_tfds()
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
  tf_seed = int(streams.rng('imagenet', seed, process_index).integers(2**31))
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
    raise errors.DatasetError(
        tfds_io.not_prepared_message('imagenet2012', builder)) from e

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
