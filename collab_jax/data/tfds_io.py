"""TensorFlow and tensorflow-datasets, imported only by the paths that use them.

`import_tensorflow` hides the GPUs from TensorFlow before anything else runs
in it, so that tf.data never claims accelerator memory (JAX owns the
accelerators); the offline default never imports TensorFlow.
"""

import functools

import numpy as np

from collab_jax import errors


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


def load_arrays(name, data_dir):
  """Loads both splits of a prepared tfds dataset as uint8/int32 arrays."""
  tf, tfds = import_tensorflow(), import_tfds()
  builder = tfds.builder(name, data_dir=data_dir)
  out = []
  for split in ('train', 'test'):
    try:
      ds = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:  # tfds's "could not find data in ...".
      raise errors.DatasetError(not_prepared_message(name, builder)) from e
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
        f'{where}/downloads/manual, run `{prepare_imagenet_command(where)}` '
        f'and pass --config.data_dir={where}.')
  return (
      f'tfds dataset {name} not found in {where}: download it on a machine '
      'with internet with `python -m '
      'tensorflow_datasets.scripts.download_and_prepare '
      f'--datasets={name}` (or `tfds build {name}`) and pass '
      '--config.data_dir.')


def prepare_imagenet_command(data_dir):
  """The command that makes `data_dir` hold imagenet2012 as the loader reads it."""
  return f'python -m collab_jax.data.prepare_imagenet --data_dir={data_dir}'


def not_random_access_message(builder):
  """One-line fix for a dataset prepared only as TFRecord (no random access)."""
  return (
      f'tfds dataset {builder.name} in {builder.data_dir} is prepared as '
      f'{builder.info.file_format.value} only; the loader reads ArrayRecord '
      'files by index (resuming without reading past records): run '
      f'`{prepare_imagenet_command(builder.data_dir_root)}`, which writes '
      'them beside the existing files.')
