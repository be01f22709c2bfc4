"""Prepares tfds `imagenet2012` in the format the trainer reads (ArrayRecord).

  python -m collab_jax.data.prepare_imagenet --data_dir=DIR

* From the two manual tars, `ILSVRC2012_img_train.tar` and
  `ILSVRC2012_img_val.tar` in `DIR/downloads/manual` (or `--manual_dir`):
  tfds's own `imagenet2012` builder writes `DIR/imagenet2012/5.1.0/` as
  ArrayRecord files (labels, the validation labels and the fixes of the few
  CMYK/PNG images are tfds's).
* A `DIR` already prepared as TFRecord (e.g. by `tfds build imagenet2012`):
  each shard is copied record for record into an ArrayRecord shard beside it
  and `dataset_info.json` lists `array_record` as an alternative format, so
  readers of the TFRecord files keep working. No JPEG is decoded again.
* Already readable: nothing to do.

It needs what the `[train]` extra installs (tensorflow-datasets,
array-record, importlib_resources); unlike `tfds build`, not apache-beam.
"""

import argparse
import os
import sys

from collab_jax import errors
from collab_jax.data import imagenet
from collab_jax.data import tfds_io

NAME = 'imagenet2012'
TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


def prepare(data_dir, manual_dir=None, log=print):
  """Makes `data_dir` hold imagenet2012 in ArrayRecord format.

  Args:
    data_dir: the tfds data dir (`--config.data_dir` of the run).
    manual_dir: where the two ILSVRC2012 tars are; default
      `data_dir/downloads/manual`.
    log: where progress lines go.

  Returns:
    What was done: 'built', 'converted' or 'ready'.

  Raises:
    DatasetError: neither a preparation nor the tars are there.
  """
  tfds = tfds_io.import_tfds()
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  builder = tfds.builder(NAME, data_dir=data_dir)
  if imagenet.is_prepared(builder.data_dir):
    # Its own metadata (the code's builder ignores converted formats).
    builder = tfds.builder_from_directory(builder.data_dir)
    if file_adapters.FileFormat.ARRAY_RECORD in (
        builder.info.available_file_formats()):
      log(f'{builder.data_dir}: already in ArrayRecord format.')
      return 'ready'
    convert_to_array_record(builder, log=log)
    return 'converted'
  manual_dir = manual_dir or os.path.join(data_dir, 'downloads', 'manual')
  missing = [t for t in TARS
             if not os.path.exists(os.path.join(manual_dir, t))]
  if missing:
    raise errors.DatasetError(
        f'{" and ".join(missing)} not found in {manual_dir}: download them '
        'from https://image-net.org (registration needed), put them there '
        f'and run `{tfds_io.prepare_imagenet_command(data_dir)}` again '
        '(or pass --manual_dir=<their folder>).')
  builder = tfds.builder(NAME, data_dir=data_dir, file_format='array_record')
  log(f'Building {NAME} in {builder.data_dir} from {manual_dir} '
      '(ImageNet: hours, single process) ...')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return 'built'


def convert_to_array_record(builder, log=print):
  """Writes an ArrayRecord copy of each TFRecord shard of a prepared dataset."""
  from tensorflow_datasets.core import file_adapters  # pylint: disable=g-import-not-at-top
  formats = file_adapters.FileFormat
  reader = file_adapters.ADAPTER_FOR_FORMAT[builder.info.file_format]
  writer = file_adapters.ADAPTER_FOR_FORMAT[formats.ARRAY_RECORD]
  gfile = tfds_io.import_tensorflow().io.gfile
  for split, info in builder.info.splits.items():
    template = info.filename_template.replace(
        filetype_suffix=formats.ARRAY_RECORD.value)
    sources = info.filepaths
    for src, dst in zip(sources, template.sharded_filepaths(len(sources))):
      if gfile.exists(os.fspath(dst)):  # done by an interrupted earlier run
        continue
      log(f'{split}: {src.name} -> {dst.name}')
      records = reader.make_tf_data(src).as_numpy_iterator()
      partial = os.fspath(dst) + '.incomplete'
      writer.write_examples(partial, ((None, r) for r in records))
      gfile.rename(partial, os.fspath(dst), overwrite=True)
  builder.info.add_alternative_file_format(formats.ARRAY_RECORD)
  builder.info.write_to_directory(builder.data_dir)
  log(f'{builder.data_dir}: ArrayRecord shards written beside the '
      f'{builder.info.file_format.value} ones.')


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog='python -m collab_jax.data.prepare_imagenet',
      description=__doc__.split('\n\n')[0])
  parser.add_argument('--data_dir', required=True,
                      help='tfds data dir; pass it to --config.data_dir.')
  parser.add_argument('--manual_dir', default=None,
                      help='folder of the two ILSVRC2012 tars; default '
                      'DATA_DIR/downloads/manual.')
  args = parser.parse_args(argv)
  try:
    prepare(args.data_dir, args.manual_dir)
  except errors.DatasetError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print(f'Ready: pass --config.data_dir={args.data_dir}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
