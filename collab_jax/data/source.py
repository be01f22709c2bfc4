"""The trainer's view of the data: one `DataSource` per run and process."""

import dataclasses
import hashlib
import itertools
from typing import Callable, Iterator, Optional

import jax
import numpy as np

from collab_jax import errors
from collab_jax.data import augment
from collab_jax.data import imagenet
from collab_jax.data import in_memory
from collab_jax.data import label_noise
from collab_jax.data import labeled_split
from collab_jax.data import order
from collab_jax.data import tfds_io

STREAMING_DATASETS = ('imagenet2012',)
DATASETS = in_memory.KNOWN_DATASETS + STREAMING_DATASETS


@dataclasses.dataclass
class DataSource:
  """What the loop needs from the data: shapes, statistics and batches.

  Batches are this process's share of the global batch, as numpy arrays
  (`parallel.to_global` makes them global arrays).
  """
  num_train: int
  num_classes: int
  image_shape: tuple
  preprocess: augment.Preprocess  # on the device, inside the steps
  steps_per_epoch: int
  train_iter: Callable[[int], Iterator[dict]]  # start step -> batches from it on
  eval_batches: Callable[[], Iterator[dict]]   # the whole test set, once
  # The whole training set (the run's subset), once, with its clean labels;
  # None where the data is streamed.
  train_eval_batches: Optional[Callable[[], Iterator[dict]]] = None
  # The global batch of the evaluations: `config.eval_batch_size`, but never
  # more than the evaluated set (rounded up to the devices); the rest would
  # be padding.
  eval_batch_size: int = 0
  # What the run trains and evaluates on, recorded with its config
  # (`data.json`): the source, split sizes, shapes, classes and content
  # hashes where they are cheap (see `_in_memory` and `_stream`). A resumed
  # run must see the same.
  fingerprint: Optional[dict] = None


def create_data_source(config):
  """Loads the dataset of `config.dataset` for this process.

  Raises ConfigError or DatasetError (one line each) for data settings that
  cannot work.

  In-memory datasets are read here; a stream opens when `train_iter` is
  called, at the step the run starts from.
  """
  if config.dataset not in DATASETS:  # in memory or streamed
    raise errors.ConfigError(
        f'config.dataset: {config.dataset!r} is unknown; choose one of '
        f'{", ".join(DATASETS)}.')
  if config.dataset in STREAMING_DATASETS:
    return _stream(config)
  return _in_memory(config)


def _preprocess(config, mean, std, image_shape):
  if config.augment and config.augment_pad:
    # A crop shifted by up to `pad` pixels keeps at least `size - pad` rows
    # and columns of the image; beyond half the image it is mostly padding.
    limit = min(image_shape[:2]) // 2
    if config.augment_pad > limit:
      raise errors.ConfigError(
          f'config.augment_pad: {config.augment_pad} is more than half the '
          f'{image_shape[0]}x{image_shape[1]} images (at most {limit}): the '
          'random crops would be mostly black padding (the CIFAR recipe pads '
          '4 pixels of 32).')
  return augment.Preprocess(tuple(mean), tuple(std), augment=config.augment,
                            pad=config.augment_pad, flip=config.augment_flip)


def _eval_batch_size(config, largest):
  """`config.eval_batch_size`, at most `largest` rounded up to the devices."""
  n = jax.device_count()
  return min(config.eval_batch_size, -(-largest // n) * n)


def _check_classes(config, num_classes, labels):
  """A classifier needs two classes, and its training labels two of them."""
  if num_classes < 2:
    raise errors.DatasetError(
        f'{config.dataset} has {num_classes} class(es): a classifier needs at '
        'least 2.')
  present = np.unique(labels).size
  if present < 2:
    what = (f'{present} class(es) of {num_classes} in its {labels.size} '
            'training examples: a classifier needs examples of at least 2')
    if config.train_subset:
      raise errors.ConfigError(
          f'config.train_subset: {config.train_subset} keeps {what}; train on '
          f'at least {num_classes} examples.')
    raise errors.DatasetError(f'{config.dataset} has {what}; check the data.')


def _digest(*arrays):
  """A content hash of numpy arrays (their shapes, dtypes and bytes)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape}'.encode())
    h.update(memoryview(a).cast('B'))
  return h.hexdigest()[:16]


def _stream(config):
  for key in ('labeled_per_class', 'label_noise', 'eval_train_clean'):
    if config[key]:
      raise errors.ConfigError(
          f'config.{key}: not supported for streamed {config.dataset}; use an '
          'in-memory dataset.')
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  data_dir = config.data_dir or None
  num_train = imagenet.num_examples('train', data_dir)
  num_eval = imagenet.num_examples('validation', data_dir)
  if not num_eval:
    raise errors.DatasetError(
        f'{config.dataset}: the validation split has no examples; prepare it '
        'again.')
  with errors.config_keys('batch_size', global_batch='batch_size'):
    per_epoch = order.steps_per_epoch(num_train, config.batch_size)
  eval_batch = _eval_batch_size(config, num_eval)
  image_shape = (config.image_size, config.image_size, 3)
  # Streamed data: its content is not read here; its prepared version and
  # split sizes stand for it.
  fingerprint = {'dataset': config.dataset, 'num_train': num_train,
                 'num_test': num_eval, 'num_classes': 1000,
                 'image_shape': list(image_shape),
                 **tfds_io.fingerprint(config.dataset, data_dir)}

  def iterator(split, batch, start_step=0):
    return imagenet.imagenet_iterator(
        split, global_batch=batch, process_index=p_idx, process_count=p_cnt,
        seed=config.seed, image_size=config.image_size, data_dir=data_dir,
        start_step=start_step)

  return DataSource(
      num_train, 1000,  # imagenet2012 classes
      image_shape,
      _preprocess(config, imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD,
                  image_shape),
      per_epoch,
      lambda start: iterator('train', config.batch_size, start),
      lambda: iterator('validation', eval_batch),
      eval_batch_size=eval_batch, fingerprint=fingerprint)


def _in_memory(config):
  p_idx, p_cnt = jax.process_index(), jax.process_count()
  ds = in_memory.load_dataset(
      config.dataset, data_dir=config.data_dir or None,
      train_subset=config.train_subset, subset_seed=config.subset_seed)
  if ds.test_images.shape[1:] != ds.image_shape:
    raise errors.DatasetError(
        f'{config.dataset}: test images are {ds.test_images.shape[1:]} but '
        f'training images are {ds.image_shape}; both splits must have one shape.')
  if not len(ds.test_labels):
    raise errors.DatasetError(
        f'{config.dataset}: the test set has no examples, so the run could not '
        'be evaluated; check the data (--config.data_dir).')
  _check_classes(config, ds.num_classes, ds.train_labels)
  with errors.config_keys('batch_size', global_batch='batch_size'):
    per_epoch = order.steps_per_epoch(ds.num_train, config.batch_size)
  with errors.config_keys('label_noise', level='label_noise'):
    noise = label_noise.LabelNoise(
        ds.num_train, ds.num_classes, config.label_noise, config.noise_seed,
        run_seed=config.seed if config.label_noise_draws == 'per_run' else None)
  split = None
  if config.get('labeled_per_class', 0):  # semi-supervised: see LabeledSplit
    with errors.config_keys(
        'labeled_per_class', labeled_per_class='labeled_per_class',
        labeled_fraction_per_batch='labeled_fraction_per_batch'):
      split = labeled_split.LabeledSplit(
          ds.train_labels, config.labeled_per_class, ds.num_classes,
          seed=config.subset_seed, global_batch=config.batch_size,
          labeled_fraction=config.labeled_fraction_per_batch)

  def batch(step):
    if split is None:
      idx = order.train_indices(step, num_examples=ds.num_train,
                                         global_batch=config.batch_size,
                                         seed=config.seed)
    else:
      idx, labeled = split.indices(step, run_seed=config.seed)
      labeled = order.process_slice(labeled, p_idx, p_cnt)
    idx = order.process_slice(idx, p_idx, p_cnt)
    labels = noise.labels(idx, ds.train_labels[idx], step // per_epoch)
    if split is None:
      return {'image': ds.train_images[idx], 'label': labels}
    return {'image': ds.train_images[idx],  # unlabelled examples: label -1
            'label': np.where(labeled, labels, -1).astype(np.int32),
            'labeled': labeled}

  # One eval batch shape for both evaluated sets: one compiled eval step.
  eval_batch = _eval_batch_size(
      config, max(len(ds.test_labels),
                  ds.num_train if config.eval_train_clean else 0))

  def eval_batches(images, labels):
    for b in in_memory.eval_batches(images, labels, eval_batch):
      yield {k: order.process_slice(v, p_idx, p_cnt) for k, v in b.items()}

  fingerprint = {
      'dataset': config.dataset, 'num_train': ds.num_train,
      'num_test': len(ds.test_labels), 'num_classes': ds.num_classes,
      'image_shape': list(ds.image_shape),
      'train_sha256': _digest(ds.train_images, ds.train_labels),
      'test_sha256': _digest(ds.test_images, ds.test_labels),
      'mean': list(ds.mean), 'std': list(ds.std)}
  return DataSource(ds.num_train, ds.num_classes, ds.image_shape,
                    _preprocess(config, ds.mean, ds.std, ds.image_shape),
                    per_epoch,
                    lambda start: map(batch, itertools.count(start)),
                    lambda: eval_batches(ds.test_images, ds.test_labels),
                    lambda: eval_batches(ds.train_images, ds.train_labels),
                    eval_batch_size=eval_batch, fingerprint=fingerprint)
