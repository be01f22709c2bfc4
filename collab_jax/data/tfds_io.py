"""TensorFlow and tensorflow-datasets, imported only by the paths that use them.

`import_tensorflow` hides the GPUs from TensorFlow before anything else runs
in it, so that tf.data never claims accelerator memory (JAX owns the
accelerators); the offline default never imports TensorFlow.
"""

import contextlib
import functools
import os
import sys
import tempfile

import numpy as np

from collab_jax import errors


@contextlib.contextmanager
def _native_stderr_to_file():
  """Keeps what native code writes to fd 2 in the block; shown if it raises.

  Loading TensorFlow prints C++ log lines (oneDNN's notice, absl's "All log
  messages before absl::InitializeLog()") whatever TF_CPP_MIN_LOG_LEVEL
  says; an input mistake must end in one `error:` line.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as kept:
    os.dup2(kept.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      kept.seek(0)
      sys.stderr.write(kept.read().decode('utf-8', 'replace'))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


@functools.cache
def import_tensorflow():
  """Imports TensorFlow, hiding the GPUs from it (JAX owns the accelerators)."""
  with _native_stderr_to_file():
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
  with _native_stderr_to_file():
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


def fingerprint(name, data_dir):
  """What identifies a prepared tfds dataset without reading it.

  Its version and, per split, the example and byte counts and the shard
  lengths that tfds recorded when it prepared the data.
  """
  tfds = import_tfds()
  info = tfds.builder(name, data_dir=data_dir).info
  splits = {}
  try:
    for split_name, split in sorted(info.splits.items()):
      splits[split_name] = [int(split.num_examples), int(split.num_bytes),
                            [int(n) for n in split.shard_lengths]]
  except (KeyError, ValueError, TypeError, AttributeError):
    pass  # e.g. under tfds.testing.mock_data, whose info has no splits
  return {'version': str(info.version), 'splits': splits}


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
